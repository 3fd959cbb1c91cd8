"""Context parallelism over torch.distributed: sliding-window attention with the sequence
sharded across ranks (docs/distributed.md)."""

from .attention import local_attention
from .modules import enable_context_parallel
from .sharding import SequenceShard, next_token_labels, shard_lengths, shard_sequence

__all__ = ["local_attention", "shard_sequence", "shard_lengths", "next_token_labels", "SequenceShard",
           "enable_context_parallel"]
