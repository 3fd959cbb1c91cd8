// An empty Python module named longreach._C. Importing it loads this shared
// library, whose static initialisers register the TORCH_LIBRARY ops; the ops
// themselves are reached through torch.ops.longreach (no pybind bindings, so
// torch.compile sees them as ordinary dispatcher ops).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "longreach native ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
