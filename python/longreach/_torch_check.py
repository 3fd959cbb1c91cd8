"""Refuse to load the compiled extension into a torch other than the one it was built against.

The extension links against torch's C++ libraries, whose ABI changes between releases: loaded
into another torch it fails with an undefined symbol, or worse, loads and misbehaves. The build
records the torch it saw (longreach/_build_config.py, written by CMakeLists.txt); this compares
it with the torch being imported before longreach._C is loaded.
"""

from __future__ import annotations

from typing import Optional

import torch

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall <path to the longreach source>"


def _release(version: str) -> str:
    """'2.13.0+cu128' -> '2.13.0': the local label names the wheel's flavour, not another ABI."""
    return version.split("+", 1)[0]


def mismatch(built_version: str, built_cuda: str, with_cuda_kernels: bool, torch_version: str,
             torch_cuda: Optional[str]) -> Optional[str]:
    """Why an extension built against `built_*` cannot run in a torch `torch_*`, or None if it can.

    A CPU-only build runs in the CUDA build of the same torch (without CUDA kernels); a build
    with CUDA kernels needs torch's CUDA build of the same CUDA major version.
    """
    if _release(built_version) != _release(torch_version):
        return f"longreach was built against torch {built_version}, but torch {torch_version} is installed"
    if with_cuda_kernels:
        if not torch_cuda:
            return (f"longreach was built with CUDA kernels against torch {built_version} (CUDA {built_cuda}), "
                    f"but the installed torch {torch_version} is a CPU build")
        if built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            return (f"longreach was built against torch {built_version} with CUDA {built_cuda}, but the installed "
                    f"torch {torch_version} uses CUDA {torch_cuda}")
    return None


def check_torch_matches_build() -> None:
    """Raise ImportError naming both torch versions and the rebuild command on a mismatch."""
    try:
        from . import _build_config
    except ImportError:  # not built (a source tree on sys.path): importing _C fails with its own error
        return
    reason = mismatch(_build_config.TORCH_VERSION, _build_config.TORCH_CUDA_VERSION,
                      _build_config.WITH_CUDA_KERNELS, torch.__version__, torch.version.cuda)
    if reason is not None:
        raise ImportError(
            f"{reason}. Its compiled kernels only load into the torch they were built against: rebuild "
            f"longreach in this environment ({REBUILD_COMMAND}; add -e for an editable checkout), or "
            f"install torch=={_release(_build_config.TORCH_VERSION)}."
        )
