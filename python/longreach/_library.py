"""Loads the native library and answers which devices it has kernels for."""

import torch

from ._torch_check import check_torch_matches_build

check_torch_matches_build()  # before loading _C: a mismatched torch fails there with an undefined symbol
from . import _C  # noqa: E402, F401  (importing it registers the torch.ops.longreach ops)

_REBUILD_HINT = (
    "this build of longreach has no CUDA kernels. Rebuild it against a CUDA build of torch with nvcc "
    "available: LONGREACH_WITH_CUDA=ON pip install --no-build-isolation -e ."
)


def check_device_supported(op_name: str, tensor: torch.Tensor) -> None:
    """Raise a clear error when `tensor` lives on a device this build has no kernel for."""
    if tensor.device.type in ("cpu", "meta"):
        return
    key = {"cuda": "CUDA"}.get(tensor.device.type)
    if key is None:
        raise RuntimeError(f"longreach.{op_name}: tensors on {tensor.device} are not supported (CPU and CUDA only)")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"longreach::{op_name}", key):
        raise RuntimeError(f"longreach.{op_name}: got a tensor on {tensor.device}, but {_REBUILD_HINT}")


# The CMake prefix of the C++ API (docs/cpp.md): the installed package directory holds
# liblongreach.so, include/longreach/longreach.h and share/cmake/longreach/, as
# torch.utils.cmake_prefix_path does for Torch.
import os as _os  # noqa: E402

cmake_prefix_path = _os.path.dirname(_os.path.abspath(_C.__file__))
