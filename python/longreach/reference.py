"""Dense plain-PyTorch oracle of longreach's attention semantics (docs/semantics.md).

It builds the full (Lq, Lk) mask and score matrix, so it is O(Lq * Lk): meant
for tests and benchmarks, and short enough to read as the specification. It
shares no code with the kernels on purpose.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch



def allowed_keys(
    q_len: int,
    k_len: int,
    window: Tuple[Optional[int], Optional[int]] = (None, None),
    causal: bool = False,
    dilation: int = 1,
    global_mask: Optional[torch.Tensor] = None,
    device=None,
    sink_tokens: int = 0,
    chunk: int = 0,
    chunk_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bool mask (B or 1, Lq, Lk): True where query row i may attend to key j.

    Global tokens: bidirectional without causal (a global row sees every key, a global key
    every row); with causal, only towards the past (key j <= the row's position p). Sink
    tokens: keys j < sink_tokens, seen by every row with j <= p. chunk=c > 0: the window band
    only holds keys in the row's chunk, floor((p + shift[h]) / c) == floor((j + shift[h]) / c)
    (chunk_shift (Hq,) ints, None = 0); the mask is then (B or 1, Hq, Lq, Lk). Global keys,
    global rows and sinks are not restricted by chunks."""
    left, right = window
    if causal:
        right = 0
    pos = torch.arange(q_len, device=device) + (k_len - q_len)  # bottom-right alignment
    keys = torch.arange(k_len, device=device)
    delta = keys[None, :] - pos[:, None]
    ok = torch.remainder(delta, dilation) == 0
    steps = torch.div(delta, dilation, rounding_mode="floor")
    if left is not None:
        ok &= steps >= -left
    if right is not None:
        ok &= steps <= right
    ok = ok[None]
    if chunk > 0:
        # Row p's chunk holds the positions p - r .. p + chunk - 1 - r, r = (p + shift) mod chunk,
        # computed with Python ints: p + shift could overflow int64 for chunks near 2**63.
        shifts = [0] if chunk_shift is None else chunk_shift.tolist()
        r = torch.tensor([[(p + s) % chunk for p in pos.tolist()] for s in shifts], dtype=torch.long,
                         device=device)[:, :, None]  # (Hq or 1, Lq, 1)
        same_chunk = (delta[None] >= -r) & (delta[None] <= chunk - 1 - r)
        ok = ok[:, None] & same_chunk[None]  # (1, H, Lq, Lk)
        pos_e, keys_e = pos[None, None, :, None], keys[None, None, None, :]
    else:
        pos_e, keys_e = pos[None, :, None], keys[None, None, :]
    if global_mask is not None:
        gm = global_mask.to(device=device, dtype=torch.bool)
        inside = (pos >= 0) & (pos < k_len)
        row_global = torch.zeros(gm.shape[0], q_len, dtype=torch.bool, device=device)
        row_global[:, inside] = gm[:, pos[inside]]
        extra = gm[:, None, :] | row_global[:, :, None]
        if causal:
            extra = extra & (keys[None, None, :] <= pos[None, :, None])
        ok = ok | (extra[:, None] if chunk > 0 else extra)
    if sink_tokens > 0:
        ok = ok | ((keys_e < sink_tokens) & (keys_e <= pos_e))
    return ok


def default_sigmoid_bias(k_len: int, window: Tuple[Optional[int], Optional[int]], causal: bool) -> float:
    """-ln(n), n = min(Lk, left + right + 1) with None counted as unbounded."""
    left, right = window
    if causal:
        right = 0
    n = k_len
    if left is not None and right is not None:
        n = min(k_len, left + right + 1)
    return -math.log(n) if n > 0 else 0.0


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window=(None, None),
    causal: bool = False,
    dilation: int = 1,
    global_mask: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    score: str = "softmax",
    sigmoid_bias: Optional[float] = None,
    softcap: Optional[float] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    sink_tokens: int = 0,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = 0,
    chunk_shift: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
):
    """Same contract as longreach.local_attention, computed densely.

    dropout_mask (B, Hq, Lq, Lk) bool, True = kept (longreach.dropout.keep_mask gives the
    op's): the weights after softmax / sigmoid are multiplied by mask / (1 - p) (zero for
    p = 1); lse is not affected.

    sinks (Hq,): as transformers' gpt_oss eager attention, a column holding the raw logit
    sinks[h] is appended to every row's scores, softmaxed with them and dropped.

    key_padding_mask (B, Lk), True = padding: that position holds no key (nor a
    global one), a query row at it gets zeros, and the default sigmoid bias
    counts each row's real keys. Computes in float32 for half-precision inputs
    (float64 stays float64) and returns the input dtype.
    """
    if window is None:
        window = (None, None)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    group = q_heads // kv_heads
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    if scale is None:
        scale = head_dim ** -0.5

    s = scale * (qc @ kc.transpose(-1, -2))  # (B, H, Lq, Lk)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(q_len, device=q.device) + (k_len - q_len)
    if alibi_slopes is not None:
        distance = (pos[:, None] - torch.arange(k_len, device=q.device)[None, :]).abs().to(compute)
        slopes = alibi_slopes.to(compute)
        slopes = slopes[None, :] if slopes.dim() == 1 else slopes  # (B or 1, H)
        s = s - slopes[:, :, None, None] * distance
    pad = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.bool)
    if pad is not None and global_mask is not None:
        global_mask = global_mask.to(device=q.device, dtype=torch.bool) & ~pad
    allowed = allowed_keys(q_len, k_len, window, causal, dilation, global_mask, q.device,
                           sink_tokens, chunk, chunk_shift)  # (B|1,Lq,Lk), or (B|1,Hq|1,Lq,Lk) with chunks
    if chunk == 0:
        allowed = allowed[:, None]
    padded_row = torch.zeros(batch, q_len, dtype=torch.bool, device=q.device)
    if pad is not None:
        inside = (pos >= 0) & (pos < k_len)
        padded_row[:, inside] = pad[:, pos[inside]]
        allowed = allowed & ~pad[:, None, None, :] & ~padded_row[:, None, :, None]
    if sinks is not None:
        if score != "softmax":
            raise ValueError("sinks are only defined for score='softmax'")
        column = sinks.to(compute)[None, :, None, None].expand(batch, q_heads, q_len, 1)
        s = torch.cat([s.expand(batch, q_heads, q_len, k_len), column], dim=-1)
        heads = allowed.shape[1]  # 1, or Hq with chunks
        allowed = torch.cat([allowed.expand(batch, heads, q_len, k_len),
                             (~padded_row[:, None, :, None]).expand(batch, heads, q_len, 1)], dim=-1)
        vc = torch.cat([vc, vc.new_zeros(batch, q_heads, 1, head_dim)], dim=-2)  # the sink's value is zero

    def dropped(weights):  # attention dropout of the (B, H, Lq, Lk [+ 1 sink column]) weights
        if dropout_mask is None:
            return weights
        keep = dropout_mask.to(device=q.device, dtype=torch.bool)
        if weights.shape[-1] > keep.shape[-1]:  # the sink's column (a zero value) is never dropped
            keep = torch.cat([keep.expand(*weights.shape[:-1], k_len), keep.new_ones(*weights.shape[:-1], 1)], -1)
        factor = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)
        return torch.where(keep, weights * factor, torch.zeros((), dtype=weights.dtype, device=q.device))

    if score == "sigmoid":
        if sigmoid_bias is not None:
            bias = sigmoid_bias
        elif pad is None:
            bias = default_sigmoid_bias(k_len, window, causal)
        else:  # per row, from its real keys
            present = (~pad).sum(1).tolist()
            bias = torch.tensor([default_sigmoid_bias(n, window, causal) for n in present], dtype=compute,
                                device=q.device)[:, None, None, None]
        weights = torch.where(allowed, torch.sigmoid(s + bias), torch.zeros((), dtype=compute, device=q.device))
        out = dropped(weights) @ vc
        if return_lse:
            raise ValueError("return_lse is only defined for softmax scores")
        return out.to(q.dtype)

    neg_inf = torch.tensor(float("-inf"), dtype=compute, device=q.device)
    s = torch.where(allowed, s, neg_inf)
    # amax over an empty key dim (Lk = 0) is an error; such rows have no key anyway.
    row_max = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] > 0 else s.new_full(s.shape[:-1] + (1,), float("-inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)  # exactly 0 where masked
    total = e.sum(dim=-1, keepdim=True)
    empty = total == 0
    out = (dropped(e) @ vc) / torch.where(empty, torch.ones_like(total), total)
    if not return_lse:
        return out.to(q.dtype)
    lse = torch.where(empty, neg_inf, row_max + torch.log(torch.where(empty, torch.ones_like(total), total)))
    return out.to(q.dtype), lse.squeeze(-1)


def local_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                           global_mask=None, alibi_slopes=None, return_lse: bool = False, **kwargs):
    """Same contract as longreach.local_attention_varlen: local_attention on each sequence alone
    (its rows of q, its keys of k and v, global_mask and (num_seqs, Hq) slopes sliced likewise).
    max_seqlen_* are accepted for the same call and not needed."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [q[:0]], [q[:0, :, 0].t().to(compute)]  # empty pieces, connected to q for autograd
    for i in range(len(starts_q) - 1):
        rows, keys = slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])
        one = [t.transpose(0, 1)[None] for t in (q[rows], k[keys], v[keys])]  # (1, H, L, D)
        result = local_attention(
            *one, global_mask=None if global_mask is None else global_mask[None, keys],
            alibi_slopes=alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i],
            return_lse=return_lse, **kwargs)
        out, lse = result if return_lse else (result, None)
        outs.append(out[0].transpose(0, 1))
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if return_lse else out
