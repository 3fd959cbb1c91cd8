"""Switching longreach.nn attention modules to the context-parallel op."""

from __future__ import annotations

import torch


def enable_context_parallel(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Make the attention layers of `model` attend with longreach.distributed.local_attention over
    `group` (None = the world): every LocalSelfAttention (LocalTransformerLM and friends), or
    every attention layer of a Hugging Face decoder patched with longreach.hf.patch. The input is
    then this rank's shard of the sequence, and position_ids must give the shard's true
    positions (shard_sequence does; HF models take them as position_ids, with use_cache=False).
    Returns the model."""
    from ..nn.local_attention import LocalSelfAttention

    switch = ContextParallel(group)
    found = 0
    for module in model.modules():
        if isinstance(module, LocalSelfAttention):
            module.context_parallel = switch
            found += 1
    if not found and _is_patched_hf_decoder(model):
        # HF calls the registered attention function with the layer itself (LlamaAttention,
        # Qwen2Attention, ...): those layers carry the switch longreach_attention_forward reads.
        for module in model.modules():
            if type(module).__name__.endswith("Attention") and hasattr(module, "config"):
                module.longreach_context_parallel = switch
                found += 1
    if not found:
        raise ValueError(f"enable_context_parallel: {type(model).__name__} holds no LocalSelfAttention and is not "
                         f"a Hugging Face decoder patched with longreach.hf.patch")
    return model


def _is_patched_hf_decoder(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "longreach"


class ContextParallel:
    """What a LocalSelfAttention needs to attend across ranks: the group."""

    def __init__(self, group=None):
        self.group = group

    def attend(self, q, k, v, **options):
        from .attention import local_attention

        return local_attention(q, k, v, group=self.group, **options)
