"""The fused ops' Python side, one module per op family: argument checks, the calls into the C++
library (torch.ops.longreach), their fake (meta) kernels for tracing, and their autograd.

- attention.py  local_attention (dense (B, H, L, D) batches, key padding) and the shared pieces
                of the attention ops (option checks, autograd.Function factory)
- varlen.py     local_attention_varlen (packed (total, H, D) sequences, flash-attn's layout)
- rotary.py     apply_rotary / apply_rotary_qk (the RoPE rotation)
- kvcache.py    local_attention_with_kvcache (decoding against contiguous, rolling or paged KV caches)
- merge.py      merge_attention (partial results over disjoint key sets -> the exact result)
- autocast.py   the attention ops' Autocast kernels (q, k, v in the autocast dtype, as SDPA)
"""

from .attention import OWNER, Window, attention_autograd, kernel_options, local_attention, normalize_window
from .rotary import apply_rotary, apply_rotary_qk
from .kvcache import local_attention_with_kvcache, rolling_cache_capacity
from .merge import merge_attention
from .varlen import local_attention_varlen

__all__ = ["local_attention", "local_attention_varlen", "merge_attention", "local_attention_with_kvcache", "rolling_cache_capacity", "apply_rotary", "apply_rotary_qk", "normalize_window",
           "kernel_options", "attention_autograd", "Window", "OWNER"]
