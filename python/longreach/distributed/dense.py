"""Attention of a few rows over a few keys at explicit positions, written in torch operations.

The global-token parts of a context-parallel call pair rows and keys that are not a contiguous
window (the gathered global keys, the gathered global rows against a shard), which the fused op
cannot place: it knows only bottom-right aligned positions. There are few global tokens, so a
dense (rows x global keys) or (global rows x shard) score matrix is small. Same score order as
the op (docs/semantics.md): scale * q.k, softcap, minus slope * |p - j|, then softmax (with the
row log-sum-exp, for merge_attention) or sigmoid(s + bias) summed. Autograd differentiates it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def partial_attention(q, k, v, q_pos, k_pos, key_mask: Optional[torch.Tensor], *, alibi_slopes, score: str,
                      sigmoid_bias: float, softcap: float, scale: float
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q (B, Hq, Lq, D) at positions q_pos (Lq,); k, v (B, Hk, Lk, D) at k_pos (Lk,); key_mask
    (B, Lk) bool (True = row b sees the key) or None (all). Returns (out (B, Hq, Lq, D) in the
    accumulation dtype, lse (B, Hq, Lq) or None for sigmoid); rows without keys: zeros, -inf."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    k = k.to(acc).repeat_interleave(groups, dim=1)
    v = v.to(acc).repeat_interleave(groups, dim=1)
    s = scale * (q.to(acc) @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(acc)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        distance = (q_pos[:, None] - k_pos[None, :]).abs().to(acc)
        s = s - slopes * distance
    allowed = None if key_mask is None else key_mask[:, None, None, :]
    if score == "sigmoid":
        p = torch.sigmoid(s + sigmoid_bias)
        if allowed is not None:
            p = torch.where(allowed, p, torch.zeros((), dtype=acc, device=p.device))
        return p @ v, None
    if allowed is not None:
        s = torch.where(allowed, s, torch.full((), float("-inf"), dtype=acc, device=s.device))
    # Shift by the (constant, gradient-free) row max; a row without keys gets shift 0, weights
    # exp(-inf) = 0, out 0 and lse -inf, with no NaN in value or gradient.
    m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(dim=-1)
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m.squeeze(-1) + torch.log(safe), torch.full_like(total, float("-inf")))
    return (e / safe[..., None]) @ v, lse
