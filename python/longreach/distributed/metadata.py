"""The one small collective that checks a context-parallel call before any data moves.

Every rank contributes a vector of ints (its shard length, B, H, D, dtype, the options' hash,
whether its own input passed the local checks, ...); after one all_gather every rank holds the
same table, so every rank reaches the same verdict and raises the same error together. A rank
that raised before the collective would leave the others waiting in it until the timeout.
"""

from __future__ import annotations

import zlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

OWNER = "longreach.distributed.local_attention"

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Fields of the vector, in order. 'ok' is 0 when the rank's own input failed its local checks.
FIELDS = ("ok", "length", "batch", "q_heads", "kv_heads", "head_dim", "dtype", "options", "slopes", "globals",
          "needs_grad", "device")
_SAME = ("batch", "q_heads", "kv_heads", "head_dim", "dtype", "options", "slopes", "needs_grad", "device")


def options_hash(options: Sequence) -> int:
    """A stable hash of the call's options (window, dilation, score, ...): they must agree."""
    return zlib.crc32(repr(tuple(options)).encode())


def local_vector(ok: bool, q: Optional[torch.Tensor], k: Optional[torch.Tensor], options_key: int,
                 slopes_kind: int, n_globals: int, needs_grad: bool) -> List[int]:
    if not ok or q is None or k is None:
        return [0] + [-1] * (len(FIELDS) - 1)
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -2
    return [1, q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], dtype, options_key, slopes_kind,
            n_globals, int(needs_grad), 0 if q.device.type == "cpu" else 1]


def exchange(vector: List[int], group, device: torch.device) -> List[dict]:
    """all_gather the vectors; returns one dict per rank, in rank order."""
    world = dist.get_world_size(group)
    mine = torch.tensor(vector, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    return [dict(zip(FIELDS, row.tolist())) for row in table]


def verdict(table: List[dict], rank: int, local_error: Optional[BaseException]) -> None:
    """Raise on every rank if any rank failed or the ranks disagree; the same message everywhere
    (a rank's own local error is re-raised there, with its own message)."""
    bad = [r for r, row in enumerate(table) if not row["ok"]]
    if bad:
        if local_error is not None:
            raise local_error
        raise ValueError(f"{OWNER}: rank(s) {bad} of the group rejected their input (see the error raised "
                         f"there); every rank raises so that none waits for the others")
    for field in _SAME:
        values = [row[field] for row in table]
        if len(set(values)) > 1:
            if field == "dtype":
                shown = [str(_DTYPES[v]) if 0 <= v < len(_DTYPES) else "unsupported" for v in values]
                raise TypeError(f"{OWNER}: every rank of the group must pass the same dtype, got {shown} by rank")
            if field == "options":  # a hash: name the ranks, not the numbers
                differ = [r for r, value in enumerate(values) if value != values[0]]
                raise ValueError(f"{OWNER}: every rank of the group must pass the same {_describe(field)}; "
                                 f"rank(s) {differ} differ from rank 0")
            raise ValueError(f"{OWNER}: every rank of the group must pass the same {_describe(field)}, got "
                             f"{values} by rank")


def _describe(field: str) -> str:
    return {"batch": "batch size B", "q_heads": "number of query heads", "kv_heads": "number of key/value heads",
            "head_dim": "head dim D", "options": "options (window, causal, dilation, score, "
            "sigmoid_bias, softcap, scale, alibi_slopes values)", "slopes": "alibi_slopes shape (none, (Hq,) "
            "or (B, Hq))", "needs_grad": "requires_grad of q, k, v (every rank runs the backward's collectives)",
            "device": "device type"}[field]
