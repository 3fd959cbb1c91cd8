"""Hugging Face integration: `longreach.hf.patch(model, ...)` swaps longreach's
kernels into a `transformers` model in place, keeping its weights.

`patch` dispatches on the model: Longformer models get longreach's Longformer
self-attention (hf/longformer.py); decoder models whose attention goes through
transformers' AttentionInterface get the `longreach` attention function
(hf/decoder.py).
"""

__all__ = ["patch"]


def patch(model, **options):
    """Replace the attention of a transformers model with longreach's, in place; returns the model."""
    from .longformer import is_longformer_model, patch_longformer

    if is_longformer_model(model):
        return patch_longformer(model, **options)
    from .decoder import patch_decoder

    return patch_decoder(model, **options)
