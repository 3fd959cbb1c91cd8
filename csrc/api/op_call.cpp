#include "api/op_call.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

namespace longreach::api {

torch::jit::Stack call_op(const char* op, const NamedArgs& args) {
  const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow((std::string("longreach::") + op).c_str(), "");
  const c10::FunctionSchema& schema = handle.schema();
  torch::jit::Stack stack;
  size_t used = 0;
  for (const c10::Argument& arg : schema.arguments()) {
    const std::pair<const char*, c10::IValue>* given = nullptr;
    for (const auto& a : args) {
      if (arg.name() == a.first) given = &a;
    }
    if (given != nullptr) {
      stack.push_back(given->second);
      ++used;
    } else {
      TORCH_INTERNAL_ASSERT(arg.default_value().has_value(), "longreach C++ API: ", op, " needs argument ",
                            arg.name());
      stack.push_back(*arg.default_value());
    }
  }
  TORCH_INTERNAL_ASSERT(used == args.size(), "longreach C++ API: ", op, " got an argument its schema lacks");
  // Below autograd, as Python's _autograd.forward_below_autograd: the Autograd kernels are the
  // Python package's (registered from Python), this call's derivative is the caller's Function.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  handle.callBoxed(stack);
  return stack;
}

}  // namespace longreach::api
