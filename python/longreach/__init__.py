"""longreach: long-context attention for PyTorch.

Sliding-window (local) attention with dilation and global tokens, softmax or
sigmoid scores, fused ALiBi and soft-capping, with forward and backward
kernels, plus the RoPE family of positional schemes.
"""

import importlib

from . import _vml_warmup  # first: before any threaded elementwise call (see the module)
from . import reference
from .ops import local_attention
from .position_ids import pose_position_ids, segment_position_ids
from .positional import alibi_slopes, rope_frequencies
from .ops import apply_rotary, apply_rotary_qk
from .ops import local_attention_varlen, local_attention_with_kvcache, merge_attention
from ._library import cmake_prefix_path  # the C++ API's CMake prefix (docs/cpp.md)

__version__ = "0.1.0"

__all__ = ["local_attention", "local_attention_varlen", "merge_attention", "local_attention_with_kvcache", "reference", "__version__"]
__all__ += ["apply_rotary", "apply_rotary_qk", "rope_frequencies", "alibi_slopes", "pose_position_ids",
            "segment_position_ids"]

# Subpackages imported on first use (`longreach.nn.X` after `import longreach`), so that
# `import longreach` stays light: hf needs transformers, extrapolate matplotlib.
_LAZY_SUBMODULES = ("nn", "hf", "extrapolate", "padding", "benchmark", "ops", "positional",
                    "position_ids", "reference")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
