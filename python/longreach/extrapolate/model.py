"""Builds the study's model for a scheme: a longreach.nn.LocalTransformerLM configuration.

All schemes share the architecture (pre-norm blocks, tied byte embeddings,
LocalSelfAttention in every layer); a scheme only chooses the window, the
score function and the positional signal. Eval-time RoPE scaling (PI, YaRN,
dynamic NTK) swaps the model's RoPE tables through
``LocalTransformerLM.set_rope_scaling``, and ALiBi-PI divides each layer's ALiBi
slopes; the weights are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from longreach.nn import LocalTransformerConfig, LocalTransformerLM
from longreach.positional import alibi_slopes

from .schemes import Scheme, alibi_interpolation, rope_scaling

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class ModelDims:
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    # Magnitude of SWAT's balanced ALiBi slopes: +-S * 2^-k, k = 1..heads/2 (S = 1 is
    # longreach.alibi_slopes("balanced")). --swat-slope-scale; the paper's value is not pinned
    # down by its text, so the study states the one it uses.
    balanced_slope_scale: float = 1.0
    # Standard deviation of the initial weights (LocalTransformerConfig.init_std, GPT-2's 0.02 by
    # default there). At this width 0.05 learns faster: rope after 500 steps of 8 x 256 bytes,
    # 2.26 held-out bits per byte against 2.40 with 0.02 (docs/extrapolation.md).
    init_std: float = 0.05


def model_config(scheme: Scheme, dims: ModelDims, window: Optional[int], train_len: int) -> LocalTransformerConfig:
    """The LocalTransformerConfig of ``scheme`` (``window`` applies to sliding schemes only)."""
    if scheme.rope and scheme.alibi:
        positional = "alibi+rope"
    elif scheme.rope:
        positional = "rope"
    elif scheme.alibi:
        positional = "alibi"
    else:
        positional = None
    return LocalTransformerConfig(
        vocab_size=VOCAB_SIZE,
        d_model=dims.d_model,
        n_layers=dims.layers,
        n_heads=dims.heads,
        window=window if scheme.sliding else None,
        score=scheme.score,
        positional=positional,
        alibi=scheme.alibi or "standard",
        # RoPE tables start at the training length; "original length" of length-dependent scalings.
        max_position_embeddings=train_len,
        init_std=dims.init_std,
    )


def scheme_slopes(scheme: Scheme, dims: ModelDims, interpolation: float = 1.0) -> torch.Tensor:
    """The ALiBi slopes of ``scheme``'s layers: Press et al.'s (standard) or SWAT's balanced ones
    times ``dims.balanced_slope_scale``, divided by ``interpolation`` (ALiBi-PI)."""
    slopes = alibi_slopes(dims.heads, scheme.alibi, interpolation)
    if scheme.alibi == "balanced":
        slopes = slopes * dims.balanced_slope_scale
    return slopes


def set_alibi(model: LocalTransformerLM, scheme: Scheme, dims: ModelDims, interpolation: float = 1.0) -> None:
    """Give every layer ``scheme_slopes`` (the slopes are a non-persistent buffer, not weights)."""
    for block in model.blocks:
        if block.attn.alibi is not None:
            alibi = block.attn.alibi
            alibi.slopes = scheme_slopes(scheme, dims, interpolation).to(alibi.slopes.device)
            alibi.interpolation = interpolation


def build_model(scheme: Scheme, dims: ModelDims, window: Optional[int], train_len: int, seed: int):
    """A freshly initialised model for ``scheme``; the same seed gives every scheme the same start."""
    torch.manual_seed(seed)
    model = LocalTransformerLM(model_config(scheme, dims, window, train_len))
    if scheme.alibi:
        set_alibi(model, scheme, dims)
    return model


def configure_for_length(model: LocalTransformerLM, scheme: Scheme, train_len: int, eval_len: int,
                         finetune_len: Optional[int] = None, dims: Optional[ModelDims] = None) -> None:
    """Give the model the RoPE tables and ALiBi slopes ``scheme`` evaluates with at ``eval_len``
    (plain RoPE for most; fine-tuned schemes need the length they were fine-tuned at; alibi-pi
    needs ``dims`` for its slopes)."""
    if scheme.eval_alibi_interpolation:
        if dims is None:
            raise ValueError(f"configure_for_length: scheme {scheme.name!r} divides its ALiBi slopes; pass dims")
        set_alibi(model, scheme, dims, alibi_interpolation(scheme, train_len, eval_len))
    if model.rotary is None:
        return
    scaling = rope_scaling(scheme, train_len, eval_len, finetune_len)
    # Dynamic NTK reads the pretraining length from max_position_embeddings (as Hugging Face does)
    # and grows its base with each input's length; the others get tables long enough up front.
    rows = train_len if scaling is not None and scaling["rope_type"] == "dynamic" else max(train_len, eval_len)
    model.set_rope_scaling(scaling, rows)
