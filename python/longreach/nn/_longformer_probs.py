"""Attention probabilities in Hugging Face Longformer's layout, for `output_attentions=True`.

The fused op never forms probabilities; when they are asked for, they are
recomputed from the scores and the op's row log-sum-exp: p = exp(s - lse).
The band of window scores is built block by block (rows in blocks of one
window span, each against its span of keys), so memory stays
O(L * window), like Hugging Face's own chunked computation.

Layouts (what `LongformerSelfAttention` returns in transformers):
- local probs (B, L, H, G + 2w + 1): first the G global keys (in position
  order; slots past an element's own count are 0), then the window offsets
  -w..w (0 outside the sequence, at padded keys and at global keys, whose
  weight is in the first G columns). Rows of padded and of global tokens are 0.
- global probs (B, H, G, L): each global token's softmax over the non-padded
  keys; slots past an element's own count hold a uniform row, as in HF.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def window_scores(q: torch.Tensor, k: torch.Tensor, left: int, right: int, dilation: int):
    """Scores q_i . k_j for j = i + dilation * t, t in [-left, right]: (B, H, L, left + right + 1).

    Returns (band, key_index (L, T), in_range (L, T)); band is -inf where the
    key falls outside [0, L).
    """
    batch, heads, length, dim = q.shape
    offsets = torch.arange(left + right + 1, device=q.device) * dilation
    span_left, span = left * dilation, (left + right) * dilation
    block = max(1, min(length, span + 1))
    n_blocks = -(-length // block)
    q_blocks = F.pad(q, (0, 0, 0, n_blocks * block - length)).view(batch, heads, n_blocks, block, dim)
    k_padded = F.pad(k, (0, 0, span_left, n_blocks * block - length + span - span_left))
    k_windows = k_padded.unfold(2, block + span, block)  # (B, H, n_blocks, D, block + span), a view
    scores = q_blocks @ k_windows  # (B, H, n_blocks, block, block + span)
    column = torch.arange(block, device=q.device)[:, None] + offsets[None, :]
    band = scores.gather(-1, column.expand(batch, heads, n_blocks, block, offsets.numel()))
    band = band.reshape(batch, heads, n_blocks * block, offsets.numel())[:, :, :length]
    key_index = torch.arange(length, device=q.device)[:, None] - span_left + offsets[None, :]
    in_range = (key_index >= 0) & (key_index < length)
    return band.masked_fill(~in_range, float("-inf")), key_index.clamp(0, max(length - 1, 0)), in_range


def local_row_probs(q, k, lse, one_sided_window: int, dilation: int, padded: torch.Tensor,
                    is_global_token: torch.Tensor,
                    global_order: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Probabilities of the local rows in HF's (B, L, H, G + 2w + 1) layout; q is already scaled."""
    batch, heads, length, dim = q.shape
    band, key_index, in_range = window_scores(q, k, one_sided_window, one_sided_window, dilation)
    has_global = global_order is not None
    # HF drops keys with attention_mask != 0 from the window and zeroes the same tokens' rows.
    excluded = padded | is_global_token if has_global else padded
    zero_rows = excluded[:, None, :, None]  # (B, 1, L, 1)
    # Masked entries become -inf before exp (and zero rows get lse 0), so no inf ever meets a zero gradient.
    row_lse = lse.masked_fill(zero_rows[..., 0], 0.0)[..., None]
    drop = ~(in_range[None] & ~excluded[:, key_index])[:, None] | zero_rows  # (B, 1, L, T)
    probs = torch.exp(band.to(lse.dtype).masked_fill(drop, float("-inf")) - row_lse)
    if has_global:
        positions, valid = global_order
        global_keys = k.gather(2, positions[:, None, :, None].expand(batch, heads, -1, dim))
        global_scores = (q @ global_keys.transpose(-1, -2)).to(lse.dtype)  # (B, H, L, G)
        global_scores = global_scores.masked_fill(~valid[:, None, None, :] | zero_rows, float("-inf"))
        probs = torch.cat([torch.exp(global_scores - row_lse), probs], dim=-1)
    return probs.transpose(1, 2)


def global_row_probs(q_global: torch.Tensor, k_global: torch.Tensor, valid: torch.Tensor,
                     padded: torch.Tensor) -> torch.Tensor:
    """Softmax of the global rows over the non-padded keys, (B, H, G, L); q_global is already scaled."""
    scores = q_global @ k_global.transpose(-1, -2)
    lowest = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(~valid[:, None, :, None], lowest).masked_fill(padded[:, None, None, :], lowest)
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return torch.softmax(scores, dim=-1, dtype=compute)
