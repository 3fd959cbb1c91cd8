"""Builds the host emulation of the CUDA attention kernels (tests/emulation/).

The CUDA kernels' block functions are written so they also compile as plain
C++ and run with one host "thread" per block; this module JIT-builds that
emulation with torch.utils.cpp_extension and exposes `forward` / `backward`
with the signatures of torch.ops.longreach.local_attention_fwd / _bwd.
The build takes about a minute the first time and is cached in build/.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def load():
    import torch
    from torch.utils import cpp_extension

    # One build per torch version (its headers and C++ standard differ).
    build_dir = ROOT / "build" / "cuda_emulation" / torch.__version__.replace("+", "_")
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="longreach_cuda_emulation",
        sources=[str(ROOT / "tests" / "emulation" / "attention_emulation.cpp"), str(ROOT / "csrc" / "attention_params.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2"],  # the C++ standard is the one torch asks for
        build_directory=str(build_dir),
        verbose=bool(os.environ.get("LONGREACH_VERBOSE_BUILD")),
    )


@functools.lru_cache(maxsize=None)
def load_decode():
    """The host emulation of the CUDA decode kernels (tests/emulation/decode_emulation.cpp):
    `kvcache_fwd` with the signature of torch.ops.longreach.local_attention_kvcache_fwd, run on
    CPU tensors through the CUDA entry's host logic and block functions. A separate extension, so
    that building it does not rebuild the attention emulation (and the other way round)."""
    import torch
    from torch.utils import cpp_extension

    build_dir = ROOT / "build" / "cuda_decode_emulation" / torch.__version__.replace("+", "_")
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="longreach_cuda_decode_emulation",
        sources=[str(ROOT / "tests" / "emulation" / "decode_emulation.cpp"),
                 str(ROOT / "csrc" / "attention_params.cpp"), str(ROOT / "csrc" / "kvcache_params.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2"],
        build_directory=str(build_dir),
        verbose=bool(os.environ.get("LONGREACH_VERBOSE_BUILD")),
    )
