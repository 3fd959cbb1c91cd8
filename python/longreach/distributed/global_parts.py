"""The global-token parts of a context-parallel call: rows that see every one of a set of keys.

Two parts pair rows and keys that do not form the op's contiguous window: the shard's rows
against the gathered global keys outside its halo, and the gathered global rows against the
shard. Every row sees every (allowed) key there, so without ALiBi the positions do not matter
and the fused op does it with an unbounded window: no (rows x keys) matrix in memory. ALiBi
needs each pair's true distance, which the op's placement cannot give, so with slopes the part
is dense (dense.py; the score matrix is rows x few global keys, or few global rows x shard).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import ops
from .dense import partial_attention


def attend_all(q, k, v, q_pos, k_pos, key_mask: Optional[torch.Tensor], *, alibi_slopes, score: str,
               sigmoid_bias: float, softcap: float, scale: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Every row of q (B, Hq, Lq, D) over every key of k, v (B, Hk, Lk, D) that key_mask (B, Lk)
    allows (None: all). Returns (out in q's dtype, lse or None for sigmoid)."""
    if alibi_slopes is not None:
        out, lse = partial_attention(q, k, v, q_pos, k_pos, key_mask, alibi_slopes=alibi_slopes, score=score,
                                     sigmoid_bias=sigmoid_bias, softcap=softcap, scale=scale)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.to(q.dtype), None if lse is None else lse.to(acc)
    rows = q.shape[2]
    padding = None
    if key_mask is not None:
        # The op's key padding also clears the rows that sit at padded positions; Lk dummy rows
        # after q move every real row to a negative position, where no row is padded.
        padding = ~key_mask
        q = torch.cat((q, q.new_zeros(q.shape[0], q.shape[1], k.shape[2], q.shape[3])), dim=2)
    options = dict(window=(None, None), key_padding_mask=padding, score=score, softcap=softcap or None, scale=scale,
                   sigmoid_bias=sigmoid_bias if score == "sigmoid" else None)
    if score == "softmax":
        out, lse = ops.local_attention(q, k, v, return_lse=True, **options)
        return out[:, :, :rows], lse[:, :, :rows]
    return ops.local_attention(q, k, v, **options)[:, :, :rows], None
