"""Builds the study's model for a scheme (adapter over the model in longreach.nn).

INTERIM: longreach.nn.LocalTransformerLM is being written; until it lands this
file holds a minimal stand-in with the same structure (pre-norm blocks, tied
byte embeddings, longreach.local_attention in every layer, RoPE from
longreach.nn.RotaryEmbedding, slopes from longreach.alibi_slopes) so the rest
of the study can be built and tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import longreach
from longreach.nn import RotaryEmbedding

from .schemes import Scheme, rope_scaling

VOCAB_SIZE = 256  # bytes
ROPE_BASE = 10000.0


@dataclass(frozen=True)
class ModelDims:
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


class _Block(nn.Module):
    def __init__(self, dims: ModelDims, scheme: Scheme, window: Optional[int]):
        super().__init__()
        d = dims.d_model
        self.heads = dims.heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, dims.mlp_ratio * d), nn.GELU(), nn.Linear(dims.mlp_ratio * d, d))
        self.window = (window - 1, 0) if window is not None else (None, 0)
        self.score = scheme.score
        slopes = longreach.alibi_slopes(dims.heads, scheme.alibi) if scheme.alibi else None
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, x, rope):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q, k)
        a = longreach.local_attention(
            q, k, v, window=self.window, causal=True, alibi_slopes=self.slopes, score=self.score
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class StudyModel(nn.Module):
    """Byte-level causal LM: embeddings, pre-norm blocks, final norm, tied output."""

    def __init__(self, dims: ModelDims, scheme: Scheme, window: Optional[int], train_len: int):
        super().__init__()
        self.dims = dims
        self.embed = nn.Embedding(VOCAB_SIZE, dims.d_model)
        self.blocks = nn.ModuleList(_Block(dims, scheme, window) for _ in range(dims.layers))
        self.norm = nn.LayerNorm(dims.d_model)
        self.train_len = train_len
        self.rope = RotaryEmbedding(dims.head_dim, ROPE_BASE, train_len) if scheme.rope else None
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, self.rope)
        return self.norm(x) @ self.embed.weight.t()


def build_model(scheme: Scheme, dims: ModelDims, window: Optional[int], train_len: int, seed: int) -> nn.Module:
    """A freshly initialised model for ``scheme`` (window used only by sliding schemes)."""
    if dims.d_model % dims.heads or dims.head_dim % 2:
        raise ValueError(f"d_model {dims.d_model} must split into {dims.heads} heads of even size")
    torch.manual_seed(seed)
    return StudyModel(dims, scheme, window if scheme.sliding else None, train_len)


def configure_for_length(model: nn.Module, scheme: Scheme, train_len: int, eval_len: int) -> None:
    """Set the eval-time RoPE scaling the scheme uses at ``eval_len`` (none for most schemes)."""
    if model.rope is not None:
        scaling = rope_scaling(scheme, train_len, eval_len)
        model.rope = RotaryEmbedding(model.dims.head_dim, ROPE_BASE, max(train_len, eval_len), scaling)
