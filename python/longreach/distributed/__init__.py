"""Context parallelism over torch.distributed: sliding-window attention with the sequence
sharded across ranks (docs/distributed.md)."""

from .attention import local_attention

__all__ = ["local_attention"]
