"""Print the include/library paths and ABI of the installed torch for CMakeLists.txt.

Uses torch.utils.cpp_extension's own path helpers, which work for CPU and CUDA
builds of torch alike, even on a machine without a CUDA toolkit.

longreach compiles against the torch it will run with, so the build must see that torch:
when torch cannot be imported here (pip's default build isolation builds in a fresh
environment without it), or the torch imported here is not the one of the interpreter's
own environment, this says what to run instead and exits with status 1, before anything
is compiled.
"""
import subprocess
import sys


def _installed_torch() -> str:
    """The torch this interpreter has outside the build environment (python -I ignores the
    PYTHONPATH through which pip's isolated build environment hides it), or ''."""
    try:
        probe = subprocess.run([sys.executable, "-I", "-c", "import torch; print(torch.__version__)"],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    return probe.stdout.strip() if probe.returncode == 0 else ""


try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:
    installed = _installed_torch()
    seen = (f"Your environment has torch {installed}, but the build cannot see it: pip's default build "
            "isolation builds in a fresh environment without your torch." if installed else
            "Install torch first (any torch >= 2.4, the CPU or the CUDA build).")
    sys.stderr.write(
        f"longreach: the build cannot import torch ({error}) with {sys.executable}.\n"
        "longreach is compiled against the torch it will run with. " + seen + "\n"
        "Run instead:\n"
        "    pip install torch scikit-build-core cmake ninja   # if not installed yet\n"
        "    pip install --no-build-isolation .\n"
    )
    sys.exit(1)

installed = _installed_torch()
if installed and installed != torch.__version__:
    # torch X in the build environment (pip's isolation installed one), torch Y in the environment
    # the package goes into: the extension would not load there.
    sys.stderr.write(
        f"longreach: the build sees torch {torch.__version__} ({torch.__file__}), but the environment of "
        f"{sys.executable} has torch {installed}: the extension would be compiled against the wrong torch. "
        "Build against the installed one, without build isolation:\n"
        "    pip install scikit-build-core cmake ninja   # if not installed yet\n"
        "    pip install --no-build-isolation .\n"
    )
    sys.exit(1)

print("TORCH_VERSION=" + torch.__version__)
print("TORCH_CUDA_VERSION=" + (torch.version.cuda or ""))
print("TORCH_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()))
print("TORCH_LIBRARY_DIRS=" + ";".join(cpp_extension.library_paths()))
