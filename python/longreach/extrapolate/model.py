"""Builds the study's model for a scheme (adapter over the model in longreach.nn).

INTERIM: longreach.nn.LocalTransformerLM and longreach.rope_frequencies are
being written; until they land this file holds a minimal stand-in with the
same structure (pre-norm blocks, tied byte embeddings, longreach.local_attention
in every layer) so the rest of the study can be built and tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import longreach

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


def _alibi_slopes(heads: int, kind: str) -> torch.Tensor:
    # Stand-in for longreach.alibi_slopes (standard power-of-two rule; balanced = SWAT's +/- halves).
    if kind == "standard":
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
    half = heads // 2
    base = [2.0 ** (-8.0 * (i + 1) / half) for i in range(half)]
    return torch.tensor(base + [-s for s in base])


def _rope_tables(head_dim: int, length: int, scaling: Optional[dict]):
    # Stand-in for longreach.rope_frequencies: default / linear here, yarn through transformers.
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    attention_factor = 1.0
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["rope_type"] == "yarn":
        from transformers import PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = PretrainedConfig()
        cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim = head_dim, 1, head_dim
        cfg.max_position_embeddings = length
        cfg.rope_parameters = dict(scaling, rope_theta=ROPE_BASE)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


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
        slopes = _alibi_slopes(dims.heads, scheme.alibi) if scheme.alibi else None
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, x, rope):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        a = longreach.local_attention(
            q, k, v, window=self.window, causal=True, alibi_slopes=self.slopes, score=self.score
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class StudyModel(nn.Module):
    """Byte-level causal LM: embeddings, pre-norm blocks, final norm, tied output."""

    def __init__(self, dims: ModelDims, scheme: Scheme, window: Optional[int]):
        super().__init__()
        self.dims = dims
        self.use_rope = scheme.rope
        self.embed = nn.Embedding(VOCAB_SIZE, dims.d_model)
        self.blocks = nn.ModuleList(_Block(dims, scheme, window) for _ in range(dims.layers))
        self.norm = nn.LayerNorm(dims.d_model)
        self.rope_scaling: Optional[dict] = None
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids):
        x = self.embed(ids)
        rope = _rope_tables(self.dims.head_dim, ids.shape[1], self.rope_scaling) if self.use_rope else None
        for blk in self.blocks:
            x = blk(x, rope)
        return self.norm(x) @ self.embed.weight.t()


def build_model(scheme: Scheme, dims: ModelDims, window: Optional[int], seed: int) -> nn.Module:
    """A freshly initialised model for ``scheme`` (window used only by sliding schemes)."""
    if dims.d_model % dims.heads or dims.head_dim % 2:
        raise ValueError(f"d_model {dims.d_model} must split into {dims.heads} heads of even size")
    torch.manual_seed(seed)
    return StudyModel(dims, scheme, window if scheme.sliding else None)


def configure_for_length(model: nn.Module, scheme: Scheme, train_len: int, eval_len: int) -> None:
    """Set the eval-time RoPE scaling the scheme uses at ``eval_len`` (none for most schemes)."""
    model.rope_scaling = rope_scaling(scheme, train_len, eval_len)
