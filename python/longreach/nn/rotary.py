"""RotaryEmbedding: cached cos / sin tables for any RoPE scheme, applied with the fused op."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..positional import rope_frequencies, rope_type_of
from ..ops import apply_rotary, apply_rotary_qk


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with Hugging Face's scaling family.

    ``RotaryEmbedding(head_dim, base, max_position_embeddings, scaling=...)``
    with ``scaling`` a Hugging Face ``rope_parameters`` / ``rope_scaling`` dict
    (see `longreach.rope_frequencies`). ``forward(q, k=None, position_ids=None,
    seq_len=None)`` returns the rotated q (and k); tensors are (B, H, L, D).

    Tables (cos and sin of position * inv_freq, times the attention factor, as
    Hugging Face's rotary embeddings produce them) are float32 buffers of
    ``max_position_embeddings`` rows at first; they grow (doubling) when a longer
    sequence arrives. Like Hugging Face, ``dynamic`` recomputes the frequencies
    when a sequence longer than any seen before arrives and returns to the
    original ones for sequences within ``max_position_embeddings``; ``longrope``
    uses the long factors when the sequence exceeds
    ``original_max_position_embeddings``. The sequence length is ``seq_len``
    if given, else L without position_ids, else ``max(position_ids) + 1``
    (which reads the ids: under ``torch.compile(fullgraph=True)`` pass
    ``seq_len`` or no position_ids).
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        max_position_embeddings: int = 2048,
        scaling: Optional[Mapping[str, Any]] = None,
        *,
        interleaved: bool = False,
        device: Optional[Union[torch.device, str]] = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        self.scaling: Dict[str, Any] = dict(scaling or {})
        self.rope_type = rope_type_of(self.scaling)
        self.interleaved = interleaved
        # Validates every argument up front (a bad config fails here, not at the first forward).
        inv_freq, attention_factor = self._frequencies(None, device)
        self.rot_dim = 2 * inv_freq.shape[0]
        self.attention_factor = attention_factor
        # Hugging Face's state: the length dynamic's frequencies were computed for, and
        # whether longrope uses its long factors.
        self._freq_seq_len = max_position_embeddings
        self._long_factors = False
        self._inv_freq = inv_freq
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(inv_freq, attention_factor, max_position_embeddings)

    def _frequencies(self, seq_len: Optional[int], device) -> Tuple[torch.Tensor, float]:
        return rope_frequencies(self.head_dim, self.base, self.scaling, seq_len,
                                max_position_embeddings=self.max_position_embeddings, device=device)

    def _build(self, inv_freq: torch.Tensor, attention_factor: float, rows: int) -> None:
        # The same float32 operations as Hugging Face's rotary embeddings, so the tables match theirs.
        device = self.cos.device if self.cos.numel() else inv_freq.device
        inv_freq = inv_freq.to(device)
        freqs = torch.arange(rows, device=device, dtype=torch.int64).float()[:, None] * inv_freq
        self.cos = freqs.cos() * attention_factor
        self.sin = freqs.sin() * attention_factor
        self._inv_freq = inv_freq
        self.attention_factor = attention_factor

    def _update_frequencies(self, seq_len: int) -> None:
        """Hugging Face's dynamic_rope_update, on the tables."""
        if self.rope_type == "dynamic":
            original = self.max_position_embeddings
            if seq_len > self._freq_seq_len:  # growth: frequencies for this longer length
                inv_freq, factor = self._frequencies(seq_len, self.cos.device)
                self._freq_seq_len = seq_len
                self._build(inv_freq, factor, max(seq_len, self.cos.shape[0]))
            elif seq_len < original < self._freq_seq_len:  # back within the original length: reset
                inv_freq, factor = self._frequencies(None, self.cos.device)
                self._freq_seq_len = original
                self._build(inv_freq, factor, self.cos.shape[0])
        elif self.rope_type == "longrope":
            original = self.scaling.get("original_max_position_embeddings", self.max_position_embeddings)
            use_long = seq_len > original
            if use_long != self._long_factors:
                inv_freq, factor = self._frequencies(seq_len if use_long else None, self.cos.device)
                self._long_factors = use_long
                self._build(inv_freq, factor, max(seq_len, self.cos.shape[0]))

    def tables(self, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) float32 tables of at least ``seq_len`` rows, for `apply_rotary`."""
        if self.cos.dtype != torch.float32:  # e.g. after module.half(): rebuild in float32
            self._build(self._inv_freq.float(), self.attention_factor, self.cos.shape[0])
        self._update_frequencies(seq_len)
        if seq_len > self.cos.shape[0]:
            self._build(self._inv_freq, self.attention_factor, max(seq_len, 2 * self.cos.shape[0]))
        return self.cos, self.sin

    def forward(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        seq_len: Optional[int] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if seq_len is None:
            if position_ids is not None:
                seq_len = int(position_ids.max()) + 1
            else:
                seq_len = q.shape[-2] if k is None else max(q.shape[-2], k.shape[-2])
        cos, sin = self.tables(seq_len)
        if k is None:
            return apply_rotary(q, cos, sin, position_ids, self.interleaved)
        return apply_rotary_qk(q, k, cos, sin, position_ids, self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rot_dim={self.rot_dim}, base={self.base}, rope_type={self.rope_type!r}, "
                f"max_position_embeddings={self.max_position_embeddings}, interleaved={self.interleaved}")
