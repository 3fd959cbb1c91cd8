"""Hugging Face integration: `longreach.hf.patch(model, ...)` swaps longreach's kernels into a
`transformers` model in place, keeping its weights; `longreach.hf.unpatch(model)` undoes it.

`patch` dispatches on the model: Longformer models get longreach's Longformer
self-attention (hf/longformer.py); decoder models whose attention goes through
transformers' AttentionInterface get the `longreach` attention function
(hf/decoder.py). Importing this package registers `longreach` in transformers'
attention and mask registries, so that `from_pretrained(..., attn_implementation="longreach")`,
`model.set_attn_implementation("longreach")` and patched checkpoints work without `patch`.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping, Optional

from .._extras import require
from . import state

__all__ = ["patch", "unpatch", "LongreachCache"]

_DECODER_OPTIONS = ("window", "sink_tokens", "rope_scaling", "softcap", "score", "alibi", "chunk", "chunk_shift")
_LONGFORMER_OPTIONS = ("attention_dropout", "dilation")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers


def patch(
    model,
    *,
    window: Optional[int] = None,
    sink_tokens: Optional[int] = None,
    rope_scaling: Optional[Mapping[str, Any]] = None,
    softcap: Optional[float] = None,
    score: Optional[str] = None,
    alibi: Optional[str] = None,
    chunk: Optional[int] = None,
    chunk_shift=None,
    attention_dropout: Optional[float] = None,
    dilation: Optional[int] = None,
):
    """Replace the attention of a transformers model with longreach's, in place; returns the model.

    Decoder models (Llama, Mistral, Qwen2, Gemma2/3 and others whose attention goes through
    transformers' AttentionInterface); every option defaults to None, "keep the model's":

    - window: int W, every layer attends to the last W keys, the current token included
      (Hugging Face's ``sliding_window=W``); full-attention layers become sliding ones.
    - sink_tokens: int n, the first n tokens of each sequence stay visible to every later
      token on top of the window (StreamingLLM's attention sinks).
    - rope_scaling: a Hugging Face rope-scaling dict (``{"rope_type": "yarn", "factor": 4.0}``;
      linear, dynamic, yarn, longrope, llama3), flat or keyed by layer type.
    - softcap: positive float, the attention-logit soft-cap ``c * tanh(s / c)``.
    - score: "softmax" or "sigmoid".
    - alibi: "standard" or "balanced" ALiBi slopes added to the scores.
    - chunk: int c, in training mode (``model.train()``) every token attends only to the keys of
      its chunk of c positions, within the window (LongLoRA's S2-Attn, with ``chunk_shift``);
      in eval mode (``model.eval()``, generate) the full or windowed attention runs, as LongLoRA
      infers. docs/huggingface.md "Chunked fine-tuning".
    - chunk_shift: "half" (LongLoRA: the chunks of the second half of the heads shifted by
      c // 2), a list of one int per query head, an int tensor, or None (no shift).

    The options are stored in ``config.longreach`` and travel with ``save_pretrained``; with no
    option, a model loaded from a patched checkpoint gets its saved ones back.

    Longformer models (LongformerModel and its heads):

    - attention_dropout: the attention dropout probability of the new modules.
    - dilation: spacing of the window's keys (1 is Hugging Face's model).

    The model's config object is not changed: the model gets a private copy first, so another
    model built from the same config is unaffected. An option that does not apply to the model's
    kind raises TypeError; a bad value raises ValueError naming the option.
    """
    require(("transformers",), "longreach.hf.patch")
    from .longformer import is_longformer_model, patch_longformer

    options = dict(window=window, sink_tokens=sink_tokens, rope_scaling=rope_scaling, softcap=softcap, score=score, alibi=alibi,
                   chunk=chunk, chunk_shift=chunk_shift, attention_dropout=attention_dropout, dilation=dilation)
    longformer = is_longformer_model(model)
    foreign = _DECODER_OPTIONS if longformer else _LONGFORMER_OPTIONS
    given = [name for name in foreign if options[name] is not None]
    if given:
        kind = "decoder models" if longformer else "Longformer models"
        raise TypeError(f"longreach.hf.patch: option {given[0]}={options[given[0]]!r} applies to {kind} only, "
                        f"not to {type(_base(model)).__name__}")
    if longformer:
        from .longformer import hf_self_attention_children

        state.remember_children(_base(model), hf_self_attention_children(model))
        return patch_longformer(model, attention_dropout=attention_dropout, dilation=dilation)
    from .decoder import is_decoder_model, patch_decoder
    from .rope import rotary_children

    base = _base(model)
    first = not state.is_patched(base)
    if is_decoder_model(base):  # else patch_decoder raises its TypeError, with nothing changed
        state.detach_config(base)
        if rope_scaling is not None:
            state.remember_children(base, rotary_children(base))
    try:
        return patch_decoder(model, window=window, sink_tokens=sink_tokens, score=score, alibi=alibi, rope_scaling=rope_scaling,
                             softcap=softcap, chunk=chunk, chunk_shift=chunk_shift)
    except Exception:
        if first and state.is_patched(base):  # a bad option: leave the model as it was
            state.restore(base)
        raise


def unpatch(model):
    """Undo `patch` on this model, in place; returns the model.

    The model gets back the config object it had before (the options, the window, the rope
    scaling and the attention implementation go with it) and the modules `patch` replaced
    (rotary embeddings, Longformer self-attention); the weights, shared all along, keep any
    training done in between. A model that was not patched in this process raises ValueError.
    """
    state.restore(_base(model))
    return model


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


def __getattr__(name):  # LongreachCache subclasses transformers' Cache: import it only when asked for
    if name == "LongreachCache":
        from .cache import LongreachCache

        return LongreachCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
