"""Position ids for long-context training and segment-by-segment processing.

- `pose_position_ids`: PoSE (Zhu et al. 2023, "Positional Skip-wise Training"):
  train on a short window whose position ids cover a long target range. The
  window is cut into chunks; chunk i is shifted by a skip u_i (u_0 = 0,
  u_i drawn uniformly from [u_{i-1}, target_len - window_len]), so positions
  stay increasing, every relative distance up to target_len - 1 can occur,
  and the largest id is at most target_len - 1.
- `segment_position_ids`: positions that continue across segments (chunked
  prefill, streaming, recurrent-memory training): a segment of length L after
  ``past_len`` tokens has ids past_len .. past_len + L - 1, per batch row.

Both return int64 (B, L) tensors for ``apply_rotary(position_ids=...)`` /
``RotaryEmbedding``. See docs/positional.md for an example.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch


def _int_at_least(value, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def pose_position_ids(
    window_len: int,
    target_len: int,
    *,
    num_chunks: int = 2,
    batch_size: int = 1,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """PoSE position ids (batch_size, window_len) int64 covering [0, target_len).

    Each row independently: the window is cut at ``num_chunks - 1`` distinct
    random points (every chunk holds >= 1 token); chunk 0 keeps positions
    0 .. len_0 - 1; chunk i continues where chunk i-1 stopped, plus a skip
    u_i >= u_{i-1} with u_i <= target_len - window_len. With target_len ==
    window_len this is plain 0 .. window_len - 1. Draws come from
    ``generator`` (CPU) so runs are reproducible.
    """
    window_len = _int_at_least(window_len, 1, "pose_position_ids: window_len")
    target_len = _int_at_least(target_len, 1, "pose_position_ids: target_len")
    num_chunks = _int_at_least(num_chunks, 1, "pose_position_ids: num_chunks")
    batch_size = _int_at_least(batch_size, 1, "pose_position_ids: batch_size")
    if target_len < window_len:
        raise ValueError(
            f"pose_position_ids: target_len ({target_len}) must be >= window_len ({window_len}); PoSE stretches a "
            "short window over a longer range"
        )
    if num_chunks > window_len:
        raise ValueError(
            f"pose_position_ids: num_chunks ({num_chunks}) must be <= window_len ({window_len}) so no chunk is empty"
        )
    max_skip = target_len - window_len
    rows = []
    for _ in range(batch_size):
        cuts = torch.randperm(window_len - 1, generator=generator)[: num_chunks - 1] + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts.sort().values])
        skips = [0]
        for _ in range(num_chunks - 1):
            low = skips[-1]
            skips.append(int(torch.randint(low, max_skip + 1, (1,), generator=generator)))
        chunk_of_token = torch.searchsorted(starts, torch.arange(window_len), right=True) - 1
        rows.append(torch.arange(window_len) + torch.tensor(skips, dtype=torch.int64)[chunk_of_token])
    return torch.stack(rows).to(device)


def segment_position_ids(
    segment_len: int,
    past_len: Union[int, torch.Tensor] = 0,
    *,
    batch_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Ids past_len .. past_len + segment_len - 1, shape (B, segment_len) int64.

    ``past_len``: tokens already processed, an int (same for every row) or a
    (B,) integer tensor (per row, e.g. a cache after left padding).
    ``batch_size`` (default 1, or B of a tensor ``past_len``) repeats the ids.
    Segment k of a document cut into segments of length L is
    ``segment_position_ids(L, past_len=k * L)``.
    """
    segment_len = _int_at_least(segment_len, 0, "segment_position_ids: segment_len")
    if isinstance(past_len, torch.Tensor):
        if past_len.dim() != 1 or past_len.dtype.is_floating_point or past_len.dtype == torch.bool:
            raise ValueError(
                "segment_position_ids: a tensor past_len must be a 1-D integer tensor (B,), got "
                f"{past_len.dtype} of shape {tuple(past_len.shape)}"
            )
        if past_len.numel() and int(past_len.min()) < 0:
            raise ValueError(f"segment_position_ids: past_len must be >= 0, got {past_len.tolist()}")
        if batch_size is not None and batch_size != past_len.shape[0]:
            raise ValueError(
                f"segment_position_ids: batch_size ({batch_size}) does not match past_len's length ({past_len.shape[0]})"
            )
        device = past_len.device if device is None else device
        offsets = past_len.to(device=device, dtype=torch.int64)[:, None]
    else:
        past_len = _int_at_least(past_len, 0, "segment_position_ids: past_len")
        rows = 1 if batch_size is None else _int_at_least(batch_size, 1, "segment_position_ids: batch_size")
        offsets = torch.full((rows, 1), past_len, dtype=torch.int64, device=device)
    return offsets + torch.arange(segment_len, dtype=torch.int64, device=device)


def packed_position_ids(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Positions of packed tokens, restarting at 0 in every sequence: (total,) int64.

    ``cu_seqlens``: (num_seqs + 1,) int32/int64 sequence starts as longreach.local_attention_varlen
    takes them; ``total`` defaults to cu_seqlens[-1] (passing it avoids reading the tensor).
    What DataCollatorWithFlattening writes as position_ids.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"packed_position_ids: cu_seqlens must be a 1-D tensor (num_seqs + 1,), got {cu_seqlens!r}")
    cu = cu_seqlens.to(torch.int64)
    total = int(cu[-1]) if total is None else total
    tokens = torch.arange(total, dtype=torch.int64, device=cu.device)
    seq = torch.searchsorted(cu, tokens, right=True) - 1
    return tokens - cu[seq.clamp(0, cu.numel() - 1)]
