"""`longreach.hf.patch` for Longformer: swaps longreach's LongformerSelfAttention
into a transformers Longformer model (LongformerModel and every head built on
it) in place.

The new modules reuse the model's own projection layers, so parameter names,
`state_dict`, optimizers created before the patch and `save_pretrained`
checkpoints are unchanged: a checkpoint saved from a patched model loads into
plain transformers.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn.longformer import LongformerSelfAttention, _check_dilation


def _hf_self_attention_class():
    """transformers' LongformerSelfAttention, or None when transformers is not installed."""
    try:
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFSelfAttention
    except ImportError:
        return None
    return HFSelfAttention


def is_longformer_model(model) -> bool:
    """True for a module holding transformers' (or longreach's) Longformer self-attention."""
    if not isinstance(model, nn.Module):
        return False
    hf_class = _hf_self_attention_class()
    classes = (LongformerSelfAttention,) if hf_class is None else (LongformerSelfAttention, hf_class)
    return any(isinstance(m, classes) for m in model.modules())


def hf_self_attention_children(model: nn.Module):
    """(parent, name, module) of every transformers LongformerSelfAttention in `model`."""
    hf_class = _hf_self_attention_class()
    if hf_class is None:
        return []
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, hf_class)]


def patch_longformer(model: nn.Module, *, attention_dropout: Optional[float] = None,
                     dilation: Optional[int] = None) -> nn.Module:
    """Replace every transformers LongformerSelfAttention in `model` with longreach's; returns `model`.

    attention_dropout: if given, the attention dropout probability of the new
        modules (the fused op has none, so training with a positive value
        raises; pass 0.0 to fine-tune a checkpoint whose config has 0.1).
    dilation: spacing of the window's keys (the Longformer paper's dilated
        window); 1, the default, is exactly Hugging Face's model.
    Patching twice is harmless: modules that are already longreach's are kept.
    """
    if not is_longformer_model(model):
        raise TypeError(
            f"longreach.hf.patch_longformer: expected a transformers Longformer model (LongformerModel or a "
            f"Longformer head such as LongformerForMaskedLM), got {type(model).__name__} with no "
            "LongformerSelfAttention inside"
        )
    if attention_dropout is not None and not 0.0 <= attention_dropout < 1.0:
        raise ValueError(f"longreach.hf.patch_longformer: attention_dropout must be in [0, 1), got {attention_dropout!r}")
    hf_class = _hf_self_attention_class()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hf_class is not None and isinstance(child, hf_class):
                child = LongformerSelfAttention.from_hf(child, dilation=dilation)
                setattr(parent, name, child)
            elif isinstance(child, LongformerSelfAttention) and dilation is not None:
                child.dilation = _check_dilation(dilation, child.layer_id)
            if isinstance(child, LongformerSelfAttention) and attention_dropout is not None:
                child.dropout = attention_dropout
    return model
