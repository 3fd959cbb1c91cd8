"""torch.nn modules built on longreach's fused ops.

One file per module family; this package only re-exports them.
"""

from .longformer import LongformerSelfAttention

__all__: list = ["LongformerSelfAttention"]
