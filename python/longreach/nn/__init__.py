"""torch.nn modules built on longreach's fused ops.

One file per module family; this package only re-exports them.
"""

from .longformer import LongformerSelfAttention
from .alibi import ALiBi
from .rotary import RotaryEmbedding

__all__: list = ["LongformerSelfAttention"]
__all__ += ["ALiBi", "RotaryEmbedding"]
from .kv_cache import SlidingKVCache
from .local_attention import LocalSelfAttention
from .transformer import KVCache, LocalTransformerConfig, LocalTransformerLM, TransformerBlock

__all__ += ["LocalSelfAttention", "SlidingKVCache", "TransformerBlock", "LocalTransformerConfig",
            "LocalTransformerLM", "KVCache"]
