"""Builds the study's model for a scheme: a longreach.nn.LocalTransformerLM configuration.

All schemes share the architecture (pre-norm blocks, tied byte embeddings,
LocalSelfAttention in every layer); a scheme only chooses the window, the
score function and the positional signal. Eval-time RoPE scaling (PI, YaRN)
swaps the model's RoPE tables through ``LocalTransformerLM.set_rope_scaling``;
the weights are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from longreach.nn import LocalTransformerConfig, LocalTransformerLM

from .schemes import Scheme, rope_scaling

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class ModelDims:
    d_model: int = 128
    layers: int = 2
    heads: int = 4


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
    )


def build_model(scheme: Scheme, dims: ModelDims, window: Optional[int], train_len: int, seed: int):
    """A freshly initialised model for ``scheme``; the same seed gives every scheme the same start."""
    torch.manual_seed(seed)
    return LocalTransformerLM(model_config(scheme, dims, window, train_len))


def configure_for_length(model: LocalTransformerLM, scheme: Scheme, train_len: int, eval_len: int,
                         finetune_len: Optional[int] = None) -> None:
    """Give the model the RoPE tables ``scheme`` evaluates with at ``eval_len`` (plain RoPE for most;
    fine-tuned schemes need the length they were fine-tuned at)."""
    if model.rotary is None:
        return
    model.set_rope_scaling(rope_scaling(scheme, train_len, eval_len, finetune_len), max(train_len, eval_len))
