"""Splitting a batch's sequence dimension over the ranks of a context-parallel group.

Rank r gets the contiguous positions [start_r, start_r + length_r) of every tensor; lengths
differ by at most one (the first `total % world` ranks get one more). Shift the labels for
next-token prediction BEFORE sharding (`next_token_labels`): the label of a shard's last token
is the first token of the next shard. position_ids default to the true positions 0 .. L-1, so
RoPE on a shard rotates by where its tokens really are.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

OWNER = "longreach.distributed.shard_sequence"


class SequenceShard(NamedTuple):
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    start: int  # first position of this shard in the full sequence
    lengths: Tuple[int, ...]  # every rank's shard length, in rank order


def shard_lengths(total: int, world: int) -> List[int]:
    """Balanced contiguous shard lengths (differing by at most one) of `total` positions."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"shard_lengths: total must be an int >= 0, got {total!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"shard_lengths: world must be an int >= 1, got {world!r}")
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def next_token_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels[:, t] = input_ids[:, t + 1], and ignore_index at the last position."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _rank_and_world(group, mesh, mesh_dim, rank, world) -> Tuple[int, int]:
    if mesh is not None:
        if group is not None or rank is not None or world is not None:
            raise ValueError(f"{OWNER}: pass either mesh (and mesh_dim) or group / rank and world, not both")
        sub = mesh if mesh_dim is None else mesh[mesh_dim]  # a name or an index of the mesh's dimensions
        return sub.get_local_rank(), sub.size()
    if rank is not None or world is not None:
        if rank is None or world is None or not 0 <= rank < world:
            raise ValueError(f"{OWNER}: rank and world go together, with 0 <= rank < world, got rank={rank!r}, "
                             f"world={world!r}")
        return rank, world
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{OWNER}: torch.distributed is not initialised; call init_process_group first or "
                           f"pass rank and world")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None, *, group=None, mesh=None, mesh_dim=None,
                   rank: Optional[int] = None, world: Optional[int] = None) -> SequenceShard:
    """This rank's contiguous piece of (B, L) input_ids, position_ids and labels (shift labels first).

    The context-parallel group is `group` (default: the world), or dimension `mesh_dim` of a
    DeviceMesh `mesh`, or given explicitly by rank and world (no process group needed)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{OWNER}: input_ids must be a (batch, length) tensor, got "
                         f"{getattr(input_ids, 'shape', input_ids)!r}")
    for name, t in (("position_ids", position_ids), ("labels", labels)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape[-1] != input_ids.shape[1]
                              or t.dim() != 2 or t.shape[0] not in (1, input_ids.shape[0])):
            raise ValueError(f"{OWNER}: {name} must be (batch or 1, {input_ids.shape[1]}), got "
                             f"{getattr(t, 'shape', t)!r}")
    rank, world = _rank_and_world(group, mesh, mesh_dim, rank, world)
    lengths = shard_lengths(input_ids.shape[1], world)
    start = sum(lengths[:rank])
    piece = slice(start, start + lengths[rank])
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    return SequenceShard(input_ids[:, piece], position_ids[:, piece], None if labels is None else labels[:, piece],
                         start, tuple(lengths))
