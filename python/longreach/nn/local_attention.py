"""LocalSelfAttention: projections, positional scheme, the fused local-attention op, output projection."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import (SCORES, check_bool, check_choice, check_dropout_p, check_int, check_score,  # noqa: F401
                       check_sigmoid_bias, check_softcap, check_window_side, chunk_shifts)
from ..ops import local_attention
from ..position_ids import packed_position_ids
from ..positional import ALIBI_KINDS
from ..ops import local_attention_varlen
from .alibi import ALiBi
from .kv_cache import SlidingKVCache
from .rotary import RotaryEmbedding

POSITIONAL = ("rope", "alibi", "alibi+rope", None)

Window = Union[None, int, Tuple[Optional[int], Optional[int]]]


def resolve_window(window: Window, causal: bool, owner: str = "LocalSelfAttention") -> Tuple[Optional[int], Optional[int]]:
    """The op's (left, right) from a module's `window` argument.

    None: unbounded. An int W (causal only): the last W keys, the current one included, as
    Hugging Face's sliding_window=W, i.e. (W - 1, 0). A pair (left, right): the op's own
    convention (keys on each side, None = unbounded); causal forces right = 0.
    """
    if window is None:
        return None, (0 if causal else None)
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 1:
            raise ValueError(f"{owner}: window must be a positive int, a (left, right) pair or None, got {window}")
        if not causal:
            raise ValueError(
                f"{owner}: an int window ({window}) means 'the last W keys' and needs causal=True; "
                "pass a (left, right) pair for bidirectional attention"
            )
        return check_window_side(owner, "left", window - 1), 0
    if isinstance(window, (tuple, list)) and len(window) == 2:
        left = check_window_side(owner, "left", window[0])
        right = check_window_side(owner, "right", window[1])
        return left, (0 if causal else right)
    raise ValueError(f"{owner}: window must be a positive int, a (left, right) pair or None, got {window!r}")


def resolve_key_padding(owner: str, key_padding_mask, padding_mask, batch: int, length: int) -> Optional[torch.Tensor]:
    """The (B, L) bool key_padding_mask (True = padding, nn.MultiheadAttention's convention) from a
    module's arguments; `padding_mask` is the deprecated opposite (True = real token)."""
    if padding_mask is not None:
        if key_padding_mask is not None:
            raise ValueError(f"{owner}: pass key_padding_mask (True = padding) or the deprecated padding_mask "
                             "(True = real token), not both")
        warnings.warn(f"{owner}: padding_mask (True = real token) is deprecated; pass key_padding_mask, "
                      "True = padding, as nn.MultiheadAttention does (key_padding_mask=~padding_mask)",
                      DeprecationWarning, stacklevel=3)
        if not isinstance(padding_mask, torch.Tensor):
            raise TypeError(f"{owner}: padding_mask must be a (batch, length) tensor, got {type(padding_mask).__name__}")
        key_padding_mask = ~padding_mask.to(torch.bool)
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"{owner}: key_padding_mask must be a bool tensor (batch, length), True = padding, got {got}")
    if tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(f"{owner}: key_padding_mask must be (batch, length) = ({batch}, {length}), "
                         f"got {tuple(key_padding_mask.shape)}")
    return key_padding_mask


def check_packed(owner: str, cu_seqlens, max_seqlen, total: int, **incompatible) -> Optional[int]:
    """max_seqlen of a packed input (cu_seqlens over the B * L flattened tokens), or None unpacked."""
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError(f"{owner}: max_seqlen={max_seqlen!r} was given without cu_seqlens")
        return None
    for name, value in incompatible.items():
        if value is not None:
            raise ValueError(f"{owner}: cu_seqlens (packed sequences) and {name} cannot be combined; pack "
                             "without padding, and decode with one sequence per row")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{owner}: cu_seqlens must be an int32/int64 tensor (num_seqs + 1,), "
                        f"got {type(cu_seqlens).__name__}")
    if max_seqlen is None:  # one host read; pass max_seqlen to avoid it
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return max_seqlen


class LocalSelfAttention(nn.Module):
    """Multi-head (GQA/MQA) self-attention over a sliding window, on the fused longreach op.

    Args:
        embed_dim: model width E. num_heads: query heads Hq (E % Hq == 0 unless head_dim is
            given). num_kv_heads: key/value heads Hk (Hq % Hk == 0); None = num_heads.
        window: None (unbounded), an int W (causal: the last W keys, current one included),
            or a (left, right) pair in the op's convention.
        causal: mask future keys. dilation: window step (longreach.local_attention).
        sink_tokens: the first n keys stay visible to later rows (StreamingLLM); learnable_sinks: a
        per-head sink logit nn.Parameter `sinks` (gpt-oss), zeros at first (longreach.local_attention).
        score: "softmax", or "sigmoid" (no normalisation; bias `sigmoid_bias`, default
            -ln(left + right + 1), fixed by the window so a result never depends on the
            sequence length; an unbounded sigmoid window needs an explicit sigmoid_bias).
        positional: "rope", "alibi", "alibi+rope" or None. rope_scaling: a Hugging Face
            rope-scaling dict for the RoPE tables (PI, YaRN, ...); rope_base and
            max_position_embeddings complete the RoPE configuration. alibi: "standard" or
            "balanced" slopes.
        softcap: soft-cap of the scores (c * tanh(s / c)), None = off.
        bias: biases in the projections. dropout: attention dropout, as nn.MultiheadAttention's:
            in training mode (module.training) each attention weight is zeroed with probability
            p and the kept ones scaled by 1 / (1 - p), inside the fused op (its dropout_p, mask
            seeded from torch's default generator); eval mode never drops.
        rotary: share an existing RotaryEmbedding (e.g. one per model) instead of owning one.
        chunk: c > 0 restricts the window to chunks of c positions (Llama-4's chunked layers,
            LongLoRA's S2-Attn, SCCA; docs/semantics.md "Chunks"), 0 = off. chunk_shift: the
            per-head offset of the chunk grid: None (0), "half" (LongLoRA: c // 2 in the second
            half of the heads), Hq ints or an int tensor (Hq,); kept as the buffer `chunk_shift`.

    SWAT (Fu et al. 2025) in one call: ``LocalSelfAttention(E, H, window=W, score="sigmoid",
    positional="alibi+rope", alibi="balanced")`` (also ``LocalSelfAttention.swat(E, H, W)``).

    forward(x, padding_mask=None, position_ids=None, cache=None, *, key_padding_mask=None, cu_seqlens=None,
    max_seqlen=None):
        x: (B, L, E). key_padding_mask: (B, L) bool, True = padding (nn.MultiheadAttention's
        convention), any pattern; padded tokens are no keys and their rows are zeros before
        the output projection. position_ids: (B, L) or (1, L) long, the RoPE positions
        (default: 0..L-1, continuing after a cache's tokens; restarting in every packed
        sequence); ALiBi and the window use token distances. cache: a `SlidingKVCache`
        (causal only), extended by this call. cu_seqlens: packed sequences, int32/int64
        (num_seqs + 1,) over the B * L flattened tokens (flash-attn's convention; one
        longreach.local_attention_varlen call, every sequence its own problem), with
        max_seqlen (the longest; read from cu_seqlens when None). Returns (B, L, E).
        padding_mask: deprecated, the opposite convention (True = real token); it still
        works, with a DeprecationWarning.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        window: Window = None,
        causal: bool = True,
        dilation: int = 1,
        score: str = "softmax",
        positional: Optional[str] = "rope",
        rope_scaling: Optional[Mapping[str, Any]] = None,
        alibi: str = "standard",
        softcap: Optional[float] = None,
        bias: bool = False,
        dropout: float = 0.0,
        *,
        head_dim: Optional[int] = None,
        rope_base: float = 10000.0,
        max_position_embeddings: int = 2048,
        sigmoid_bias: Optional[float] = None,
        rotary: Optional[RotaryEmbedding] = None,
        sink_tokens: int = 0,
        learnable_sinks: bool = False,
        chunk: int = 0,
        chunk_shift=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
                or num_heads % num_kv_heads:
            raise ValueError(f"{name}: num_kv_heads must be a positive divisor of num_heads={num_heads}, "
                             f"got {num_kv_heads!r}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"{name}: embed_dim={embed_dim} is not divisible by num_heads={num_heads} "
                                 "(pass head_dim to choose it freely)")
            head_dim = embed_dim // num_heads
        check_score(name, score)
        check_bool(name, "causal", causal)
        check_choice(name, "positional", positional, POSITIONAL)
        check_choice(name, "alibi", alibi, ALIBI_KINDS)
        check_int(name, "dilation", dilation, 1)
        check_softcap(name, softcap)
        check_sigmoid_bias(name, sigmoid_bias, score)
        self.sink_tokens = check_int(name, "sink_tokens", sink_tokens, 0)
        if check_bool(name, "learnable_sinks", learnable_sinks) and score != "softmax":
            raise ValueError(f"{name}: learnable_sinks=True needs score='softmax', got score={score!r}")
        if rope_scaling is not None and positional not in ("rope", "alibi+rope"):
            raise ValueError(f"{name}: rope_scaling={dict(rope_scaling)!r} needs positional='rope' or 'alibi+rope', "
                             f"got positional={positional!r}")
        self.window = resolve_window(window, causal, name)
        self.chunk, shifts = chunk_shifts(name, chunk, chunk_shift, num_heads, device)
        left, right = self.window
        if score == "sigmoid" and sigmoid_bias is None:
            if left is None or right is None:
                raise ValueError(f"{name}: score='sigmoid' with an unbounded window needs an explicit sigmoid_bias "
                                 "(the default -ln(keys per window) would depend on the sequence length)")
            sigmoid_bias = -math.log(left + right + 1)

        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.causal, self.dilation, self.score = causal, dilation, score
        self.positional, self.softcap, self.sigmoid_bias = positional, softcap, sigmoid_bias
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.dropout = check_dropout_p(name, dropout, "dropout")  # a float, as nn.MultiheadAttention's
        # gpt-oss's per-head sink logits (zeros at first: exp(0) = one extra key's worth of weight)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if learnable_sinks else None
        self.rotary = None
        if positional in ("rope", "alibi+rope"):
            self.rotary = rotary if rotary is not None else RotaryEmbedding(
                head_dim, rope_base, max_position_embeddings, rope_scaling, device=device)
        self.alibi = ALiBi(num_heads, alibi, device=device) if positional in ("alibi", "alibi+rope") else None
        # A buffer so .to(device) moves it; not persistent: state_dicts stay those of a model without chunks.
        self.register_buffer("chunk_shift", shifts, persistent=False)
        # Set by longreach.distributed.enable_context_parallel: x is then this rank's shard of the
        # sequence and the attention runs across the ranks (docs/distributed.md).
        self.context_parallel = None

    @classmethod
    def swat(cls, embed_dim: int, num_heads: int, window: int, **kwargs) -> "LocalSelfAttention":
        """SWAT's attention: causal window of `window` keys, sigmoid scores, balanced ALiBi plus RoPE."""
        return cls(embed_dim, num_heads, window=window, causal=True, score="sigmoid", positional="alibi+rope",
                   alibi="balanced", **kwargs)

    def cache_size(self) -> Optional[int]:
        """Past keys a causal query can reach (what a SlidingKVCache must keep); None = all.
        With chunks, a row reaches at most chunk - 1 keys back (the start of its chunk)."""
        left = self.window[0]
        reach = None if left is None else left * self.dilation
        if self.chunk:
            reach = self.chunk - 1 if reach is None else min(reach, self.chunk - 1)
        return reach

    def new_cache(self) -> SlidingKVCache:
        """An empty rolling cache sized for this layer's window (``cache_size()`` slots), for ``forward(x, cache=...)``."""
        return SlidingKVCache(self.cache_size())

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[SlidingKVCache] = None,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> torch.Tensor:
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{name}: x must be (batch, length, {self.embed_dim}), got {tuple(x.shape)}")
        batch, length, _ = x.shape
        key_padding_mask = resolve_key_padding(name, key_padding_mask, padding_mask, batch, length)
        max_seqlen = check_packed(name, cu_seqlens, max_seqlen, batch * length, key_padding_mask=key_padding_mask,
                                  cache=cache)
        if cache is not None and not self.causal:
            raise ValueError(f"{name}: a KV cache needs causal=True")
        if cache is not None and self.sink_tokens:
            raise ValueError(f"{name}: sink_tokens={self.sink_tokens} with a SlidingKVCache is not supported (the "
                             "cache drops the first keys); use longreach.local_attention_with_kvcache")
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)

        if self.rotary is not None:
            offset = 0 if cache is None else cache.seen
            seq_len = None
            if position_ids is None:
                if cu_seqlens is not None:
                    position_ids = packed_position_ids(cu_seqlens, batch * length).view(batch, length)
                else:
                    seq_len = offset + length
                    if offset:
                        position_ids = torch.arange(offset, offset + length, device=x.device)[None]
            q, k = self.rotary(q, k, position_ids=position_ids, seq_len=seq_len)

        dropout_p = self.dropout if self.training else 0.0  # p = 0 draws no random number
        options = dict(causal=self.causal, window=self.window, dilation=self.dilation,
                       alibi_slopes=None if self.alibi is None else self.alibi(), score=self.score,
                       sigmoid_bias=self.sigmoid_bias, softcap=self.softcap)
        if self.context_parallel is not None:
            if cache is not None or key_padding_mask is not None or cu_seqlens is not None:
                raise ValueError(f"{name}: context parallelism takes no KV cache, key padding or cu_seqlens")
            if self.sink_tokens or self.sinks is not None or self.chunk:
                raise ValueError(f"{name}: context parallelism does not take sink tokens, learnable sinks or "
                                 "chunks yet")
            if dropout_p:
                raise ValueError(f"{name}: context parallelism does not take attention dropout yet "
                                 f"(dropout={self.dropout} in training mode); use dropout=0 or eval mode")
            out = self.context_parallel.attend(q, k, v, **options)
            return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        options.update(sink_tokens=self.sink_tokens, sinks=self.sinks, dropout_p=dropout_p, chunk=self.chunk,
                       chunk_shift=self.chunk_shift)
        if cu_seqlens is not None:
            flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], self.head_dim) for t in (q, k, v)]
            out = local_attention_varlen(*flat, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)
            out = out.reshape(batch, length, self.num_heads * self.head_dim)
            return self.o_proj(out)
        if cache is not None:  # the cache keeps which of its keys are real
            if self.chunk:
                # Chunks are counted from position 0, the cache's first key sits at position
                # seen - len(cache): shifting the grid by that start keeps every key in its chunk.
                start = cache.seen - len(cache)
                base = 0 if self.chunk_shift is None else self.chunk_shift
                options["chunk_shift"] = base + torch.full((self.num_heads,), start, dtype=torch.long, device=x.device)
            k, v, key_valid = cache.update(k, v, None if key_padding_mask is None else ~key_padding_mask)
            key_padding_mask = None if key_valid is None else ~key_valid
        out = local_attention(q, k, v, key_padding_mask=key_padding_mask, **options)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"window={self.window}, causal={self.causal}, dilation={self.dilation}, score={self.score!r}, "
                f"positional={self.positional!r}, softcap={self.softcap}, sink_tokens={self.sink_tokens}, "
                f"learnable_sinks={self.sinks is not None}, dropout={self.dropout}, chunk={self.chunk}")
