"""Exact key padding on top of `longreach.local_attention`, which has no key-padding argument.

A padded batch row holds its real keys in one contiguous run `[start, end)` of the key axis
(left padding, right padding, or both, e.g. a static cache's unused tail). Slicing a row's
queries and keys to that run and calling the op on the slice gives exactly what a key-padding
mask would: windows, dilation and ALiBi only use *differences* of positions, and the op's
bottom-right alignment is restored by cutting the query rows at the same place (see
`_rows_for_span`). Rows with the same run share one call, so an unpadded batch is one call.

Cost: one op call per distinct run and a host sync to read the runs, so this is the eager
path; under torch.compile it causes a graph break. A `key_padding_mask` argument in the op
itself would remove both (see docs/huggingface.md, "Padding").
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .ops import local_attention

__all__ = ["local_attention_padded", "contiguous_spans"]


def contiguous_spans(key_valid: torch.Tensor, name: str = "key_valid") -> List[Tuple[int, int]]:
    """Per batch row, the run [start, end) of True in a (B, Lk) bool mask (end == start if none).

    Raises ValueError naming `name` when a row's True entries are not one contiguous run
    (padding in the middle of a sequence), which slicing cannot express exactly.
    """
    if key_valid.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (batch, keys) mask, got shape {tuple(key_valid.shape)}")
    valid = key_valid.to(torch.bool)
    count = valid.sum(dim=1)
    start = torch.where(count > 0, valid.to(torch.int8).argmax(dim=1), torch.zeros_like(count))
    end = start + count
    positions = torch.arange(valid.shape[1], device=valid.device)
    expected = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])
    if not torch.equal(expected, valid):
        bad = int((expected != valid).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {bad} has padding in the middle of the sequence "
            f"({valid[bad].int().tolist()}); longreach supports left and/or right padding only "
            "(each row's real tokens must be one contiguous run)"
        )
    return list(zip(start.tolist(), end.tolist()))


def _rows_for_span(start: int, end: int, q_len: int, k_len: int, causal: bool) -> Tuple[int, int, int, int, int]:
    """Query rows [r0, r1), key range [k0, k1) and `extra` trailing rows for one run of real keys.

    Query row i sits at key position q0 + i with q0 = k_len - q_len. The sliced call must
    again put its last row at its last key. Causal rows never see keys after themselves, so
    the key range is cut at the last query row; bidirectional rows may, so when real keys
    extend past the last query row, `extra` zero query rows are appended (and dropped after).
    """
    q0 = k_len - q_len
    if causal:
        end = min(end, q0 + q_len)
    r0 = max(0, start - q0)
    r1 = min(q_len, end - q0)
    extra = 0 if causal else max(0, end - (q0 + r1))
    return r0, r1, start, end, extra


def local_attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    *,
    causal: bool,
    alibi_slopes: Optional[torch.Tensor] = None,
    **op_kwargs,
) -> torch.Tensor:
    """`longreach.local_attention(q, k, v, causal=causal, ...)` where keys with
    `key_valid[b, j] == False` do not exist for batch row b.

    key_valid: None (no padding) or (B, Lk) bool, True for real keys, one contiguous run per
    row. Query rows whose position is outside their row's run (padding queries) get zeros.
    alibi_slopes may be (Hq,) or (B, Hq). Other keyword arguments go to the op unchanged
    (window, dilation, score, sigmoid_bias, softcap, scale). `score="sigmoid"` with the
    default bias uses each row's own number of real keys, so padding never changes a result.
    """
    if key_valid is None:
        return local_attention(q, k, v, causal=causal, alibi_slopes=alibi_slopes, **op_kwargs)
    if op_kwargs.get("global_mask") is not None or op_kwargs.get("return_lse"):
        raise ValueError("local_attention_padded: global_mask and return_lse are not supported with key padding")
    batch, q_len, k_len = q.shape[0], q.shape[2], k.shape[2]
    if tuple(key_valid.shape) != (batch, k_len):
        raise ValueError(
            f"local_attention_padded: key_valid must have shape (batch, Lk) = ({batch}, {k_len}), "
            f"got {tuple(key_valid.shape)}"
        )
    spans = contiguous_spans(key_valid)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for row, span in enumerate(spans):
        groups.setdefault(span, []).append(row)

    if len(groups) == 1 and spans[0] == (0, k_len):
        return local_attention(q, k, v, causal=causal, alibi_slopes=alibi_slopes, **op_kwargs)

    out = q.new_zeros(q.shape[:3] + v.shape[3:])
    for (start, end), rows in groups.items():
        r0, r1, k0, k1, extra = _rows_for_span(start, end, q_len, k_len, causal)
        if r1 <= r0 or k1 <= k0:
            continue  # no real query row (or key) in this run: the rows stay zero
        whole_batch = len(rows) == batch
        index = None if whole_batch else torch.tensor(rows, device=q.device)
        pick = (lambda t: t) if whole_batch else (lambda t: t.index_select(0, index))
        q_rows = pick(q)[:, :, r0:r1]
        if extra:
            q_rows = torch.nn.functional.pad(q_rows, (0, 0, 0, extra))
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = pick(slopes)
        part = local_attention(
            q_rows, pick(k)[:, :, k0:k1], pick(v)[:, :, k0:k1], causal=causal, alibi_slopes=slopes, **op_kwargs
        )
        if extra:
            part = part[:, :, : r1 - r0]
        if whole_batch:
            out[:, :, r0:r1] = part
        else:
            out[index, :, r0:r1] = part
    return out
