"""Hugging Face integration: `longreach.hf.patch(model, ...)` swaps longreach's
kernels into a `transformers` model in place, keeping its weights.

`patch` dispatches on the model: Longformer models get longreach's Longformer
self-attention (hf/longformer.py); decoder models whose attention goes through
transformers' AttentionInterface get the `longreach` attention function
(hf/decoder.py). Importing this package registers `longreach` in transformers'
attention registries, so that patched checkpoints load with a plain from_pretrained.
"""

import importlib.util

__all__ = ["patch"]


def patch(model, **options):
    """Replace the attention of a transformers model with longreach's, in place; returns the model."""
    from .longformer import is_longformer_model, patch_longformer

    if is_longformer_model(model):
        return patch_longformer(model, **options)
    from .decoder import patch_decoder

    return patch_decoder(model, **options)


def _register_with_transformers() -> None:
    """Register the `longreach` attention and mask functions in transformers on import.

    A checkpoint saved from a model patched with attention options names
    attn_implementation="longreach" in its config.json (hf/decoder.py), and transformers
    only accepts that name if it is registered when from_pretrained runs.
    """
    if importlib.util.find_spec("transformers") is not None:
        from .decoder import register

        register()


_register_with_transformers()
