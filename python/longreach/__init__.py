"""longreach: long-context attention for PyTorch.

Sliding-window (local) attention with dilation and global tokens, softmax or
sigmoid scores, fused ALiBi and soft-capping, with forward and backward
kernels, plus the RoPE family of positional schemes.
"""

from . import reference
from .ops import local_attention

__version__ = "0.1.0"

__all__ = ["local_attention", "reference", "__version__"]
