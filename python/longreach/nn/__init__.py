"""torch.nn modules built on longreach's fused ops.

One file per module family; this package only re-exports them.
"""

__all__: list = []
