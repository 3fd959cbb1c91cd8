"""Switching longreach.nn attention modules to the context-parallel op."""

from __future__ import annotations

import torch


def enable_context_parallel(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Make every LocalSelfAttention in `model` attend with longreach.distributed.local_attention
    over `group` (None = the world): its input is then this rank's shard of the sequence, and
    position_ids must give the shard's true positions (shard_sequence does). Returns the model."""
    from ..nn.local_attention import LocalSelfAttention

    found = 0
    for module in model.modules():
        if isinstance(module, LocalSelfAttention):
            module.context_parallel = ContextParallel(group)
            found += 1
    if not found:
        raise ValueError(f"enable_context_parallel: {type(model).__name__} holds no LocalSelfAttention")
    return model


class ContextParallel:
    """What a LocalSelfAttention needs to attend across ranks: the group."""

    def __init__(self, group=None):
        self.group = group

    def attend(self, q, k, v, **options):
        from .attention import local_attention

        return local_attention(q, k, v, group=self.group, **options)
