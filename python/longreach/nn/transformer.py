"""A small decoder-only language model built from LocalSelfAttention.

`LocalTransformerConfig` holds every choice (width, depth, window, score, positional scheme);
`LocalTransformerLM(config)` is: token embedding -> `TransformerBlock` x n_layers (pre-norm
attention and MLP, residuals) -> final norm -> output projection tied to the embedding.
Generation keeps a `SlidingKVCache` per layer holding only the keys its window can reach.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .kv_cache import SlidingKVCache
from ..position_ids import packed_position_ids
from .local_attention import LocalSelfAttention, check_packed, resolve_key_padding
from .rotary import RotaryEmbedding

__all__ = ["LocalTransformerConfig", "TransformerBlock", "LocalTransformerLM", "KVCache"]


@dataclass
class LocalTransformerConfig:
    """Everything that defines a LocalTransformerLM (see LocalSelfAttention for the attention fields).

    window: None (full causal attention) or W, the last W keys including the current one.
    positional: "rope", "alibi", "alibi+rope" or None. rope_scaling: Hugging Face dict, or
    None. max_position_embeddings: the RoPE tables' initial length (they grow on demand) and
    the "original length" of length-dependent scalings. mlp_ratio: hidden width / d_model.
    dropout: residual dropout on the output of each attention and MLP branch (GPT-2's
    resid_pdrop). attention_dropout: LocalSelfAttention's dropout of the attention weights
    (Hugging Face's config.attention_dropout); both only in training mode.
    chunk, chunk_shift: chunked attention in every layer (LocalSelfAttention's; chunk_shift
    "half", a list of n_heads ints or None, so the config stays a plain dict).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    window: Optional[int] = None
    dilation: int = 1
    score: str = "softmax"
    sigmoid_bias: Optional[float] = None
    positional: Optional[str] = "rope"
    alibi: str = "standard"
    rope_base: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 2048
    softcap: Optional[float] = None
    bias: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention_dropout: float = 0.0
    chunk: int = 0
    chunk_shift: Optional[Any] = None

    @classmethod
    def swat(cls, window: int, **overrides) -> "LocalTransformerConfig":
        """SWAT: causal window, sigmoid scores, balanced ALiBi plus RoPE."""
        return cls(**{"window": window, "score": "sigmoid", "positional": "alibi+rope", "alibi": "balanced",
                      **overrides})

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable; ``LocalTransformerConfig(**d)`` rebuilds it)."""
        return dataclasses.asdict(self)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is Linear-GELU-Linear."""

    def __init__(self, config: LocalTransformerConfig, rotary: Optional[RotaryEmbedding] = None):
        super().__init__()
        c = config
        self.attn_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.attn = LocalSelfAttention(
            c.d_model, c.n_heads, c.n_kv_heads, window=c.window, causal=True, dilation=c.dilation, score=c.score,
            positional=c.positional, rope_scaling=c.rope_scaling, alibi=c.alibi, softcap=c.softcap, bias=c.bias,
            dropout=c.attention_dropout, rope_base=c.rope_base, max_position_embeddings=c.max_position_embeddings,
            sigmoid_bias=c.sigmoid_bias, rotary=rotary, chunk=c.chunk, chunk_shift=c.chunk_shift,
        )
        hidden = int(round(c.mlp_ratio * c.d_model))
        self.attn_dropout = nn.Dropout(c.dropout)  # residual dropout of the attention branch (GPT-2's)
        self.mlp_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, hidden, bias=c.bias), nn.GELU(), nn.Linear(hidden, c.d_model, bias=c.bias),
            nn.Dropout(c.dropout),
        )

    def forward(self, x, position_ids=None, cache: Optional[SlidingKVCache] = None, *, key_padding_mask=None,
                cu_seqlens=None, max_seqlen=None):
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), None, position_ids, cache,
                                            key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                            max_seqlen=max_seqlen))
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """One SlidingKVCache per layer, plus each row's next RoPE position."""

    def __init__(self, layers: List[SlidingKVCache]):
        self.layers = layers
        self.next_position: Optional[torch.Tensor] = None  # (B,) long

    def __len__(self) -> int:
        return len(self.layers[0]) if self.layers else 0


class LocalTransformerLM(nn.Module):
    """Decoder-only LM: embedding, TransformerBlocks, final LayerNorm, tied output projection.

    forward(input_ids, padding_mask=None, position_ids=None, cache=None, *, key_padding_mask=None,
    cu_seqlens=None, max_seqlen=None) -> logits (B, L, V).
        key_padding_mask: (B, L) bool, True = padding (nn.MultiheadAttention's convention),
        any pattern. position_ids: RoPE positions; default: each row counts its real tokens
        from 0 (so a left-padded row gets the positions it would have unpadded), continuing
        after the cache, or restarting in every packed sequence. cache: from `new_cache()`,
        extended in place (generation). cu_seqlens / max_seqlen: packed pre-training, several
        documents per row (flash-attn's convention over the B * L flattened tokens; see
        LocalSelfAttention). padding_mask: deprecated opposite of key_padding_mask (True =
        real token), still accepted with a DeprecationWarning.
    """

    def __init__(self, config: LocalTransformerConfig):
        super().__init__()
        if not isinstance(config, LocalTransformerConfig):
            raise TypeError(f"LocalTransformerLM: config must be a LocalTransformerConfig, got {type(config).__name__}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LocalTransformerConfig: {name} must be a positive int, got {value!r}")
        if config.d_model % config.n_heads:
            raise ValueError(f"LocalTransformerConfig: d_model={config.d_model} is not divisible by "
                             f"n_heads={config.n_heads}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # One RoPE table for all layers (the layers share head_dim and scheme).
        self.rotary = None
        if config.positional in ("rope", "alibi+rope"):
            head_dim = config.d_model // config.n_heads
            self.rotary = RotaryEmbedding(head_dim, config.rope_base, config.max_position_embeddings,
                                          config.rope_scaling)
        self.blocks = nn.ModuleList(TransformerBlock(config, self.rotary) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def set_rope_scaling(self, scaling: Optional[Dict[str, Any]], max_position_embeddings: Optional[int] = None):
        """Swap every layer's RoPE tables for a scaled scheme (e.g. PI or YaRN at evaluation time)."""
        if self.rotary is None:
            raise ValueError(f"set_rope_scaling: this model has positional={self.config.positional!r}, no RoPE")
        max_len = max_position_embeddings or self.config.max_position_embeddings
        head_dim = self.config.d_model // self.config.n_heads
        device = self.embed.weight.device
        self.rotary = RotaryEmbedding(head_dim, self.config.rope_base, max_len, scaling, device=device)
        for block in self.blocks:
            block.attn.rotary = self.rotary
        self.config = dataclasses.replace(self.config, rope_scaling=scaling, max_position_embeddings=max_len)

    def new_cache(self) -> KVCache:
        """One empty rolling cache per block, for incremental decoding with ``forward(ids, cache=...)``."""
        return KVCache([block.attn.new_cache() for block in self.blocks])

    def _positions(self, input_ids, key_padding_mask, cache: Optional[KVCache]):
        batch, length = input_ids.shape
        if key_padding_mask is None and cache is None:
            return None  # 0 .. L-1: lets RoPE skip reading ids
        start = None if cache is None else cache.next_position
        real = torch.ones_like(input_ids, dtype=torch.long) if key_padding_mask is None else (~key_padding_mask).long()
        positions = (real.cumsum(dim=1) - 1).clamp(min=0)
        if start is not None:
            positions = positions + start[:, None]
        if cache is not None:
            cache.next_position = (0 if start is None else start) + real.sum(dim=1)
        return positions

    def forward(self, input_ids, padding_mask=None, position_ids=None, cache: Optional[KVCache] = None, *,
                key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        if input_ids.dim() != 2:
            raise ValueError(f"LocalTransformerLM: input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        key_padding_mask = resolve_key_padding("LocalTransformerLM", key_padding_mask, padding_mask, batch, length)
        max_seqlen = check_packed("LocalTransformerLM", cu_seqlens, max_seqlen, batch * length,
                                  key_padding_mask=key_padding_mask, cache=cache)
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = packed_position_ids(cu_seqlens, batch * length).view(batch, length)
            else:
                position_ids = self._positions(input_ids, key_padding_mask, cache)
        x = self.embed(input_ids)
        for index, block in enumerate(self.blocks):
            x = block(x, position_ids, None if cache is None else cache.layers[index],
                      key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, padding_mask=None, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None, *,
                 key_padding_mask=None) -> torch.Tensor:
        """Continue each row by max_new_tokens tokens; returns (B, L + max_new_tokens).

        Greedy when temperature == 0, else sampling (optionally top-k). Prompts may be
        padded (key_padding_mask, True = padding; padding_mask is its deprecated opposite);
        the cache keeps only each layer's window.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")
        key_padding_mask = resolve_key_padding("LocalTransformerLM.generate", key_padding_mask, padding_mask,
                                               *input_ids.shape)
        cache = self.new_cache()
        tokens = input_ids
        logits = self(input_ids, cache=cache, key_padding_mask=key_padding_mask)[:, -1]
        for step in range(max_new_tokens):
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                scaled = logits.float() / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                next_token = torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator)
            tokens = torch.cat((tokens, next_token), dim=1)
            if step + 1 < max_new_tokens:
                logits = self(next_token, cache=cache)[:, -1]
        return tokens
