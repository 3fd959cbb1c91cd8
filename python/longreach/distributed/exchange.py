"""The communication of a context-parallel attention call, as autograd Functions.

`halo_and_globals` is one Function for everything the rows need from other ranks before they
can be computed: the halo keys/values (point-to-point, `batch_isend_irecv`, one message per
owner and reader) and the all-gathered global rows. Its backward sends the halo's key/value
gradients back to their owners and all-reduces the global rows' gradients. Being one autograd
node, its collectives run in the same order on every rank, whatever order the autograd engine
picks for the rest of the graph (two nodes with collectives could run in different orders on
different ranks and deadlock).

`all_gather` is the differentiable all-gather of the global rows' partial results; its
backward (an all-reduce) runs before the halo node's on every rank, since the halo node's
global-row output feeds it.

Every collective runs under the process group's timeout (init_process_group(timeout=...)).
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from .layout import ShardLayout


def _peer(group, rank: int) -> int:
    # P2POp takes the peer's global rank.
    return rank if group is None else dist.get_global_rank(group, rank)


def _post(sends, recvs, group) -> list:
    """Post all sends and receives at once (no ordering between peers can deadlock); the works."""
    ops = [dist.P2POp(dist.isend, tensor, _peer(group, peer), group) for peer, tensor in sends]
    ops += [dist.P2POp(dist.irecv, tensor, _peer(group, peer), group) for peer, tensor in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _p2p(sends, recvs, group) -> None:
    for work in _post(sends, recvs, group):
        work.wait()


class PendingHalo:
    """The halo's transfers, posted and not yet waited for (the interior rows run meanwhile)."""

    def __init__(self, kv: torch.Tensor, layout: ShardLayout, rank: int, group):
        start = layout.start(rank)
        data = kv.detach()
        sends = [(reader, data[..., lo - start:hi - start, :].contiguous()) for reader, lo, hi in layout.sends(rank)]
        self.pieces = layout.receives(rank)
        self.buffers = [data.new_empty(*data.shape[:3], hi - lo, data.shape[-1]) for _, lo, hi in self.pieces]
        self._sent = sends  # kept alive until the wait
        self._works = _post(sends, list(zip((owner for owner, _, _ in self.pieces), self.buffers)), group)

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []


class _HaloAndGlobals(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, own_globals, pending: PendingHalo, layout: ShardLayout, rank: int, group,
                n_globals_max: int):
        # kv: (2, B, Hk, n, D), the shard's keys and values stacked; own_globals: (B, C, n_globals_max, D);
        # pending: the halo's transfers of this kv, posted by the caller
        ctx.layout, ctx.rank, ctx.group, ctx.n_globals_max = layout, rank, group, n_globals_max
        start = layout.start(rank)
        pending.wait()
        pieces = zip(pending.pieces, pending.buffers)
        received = list(pieces)
        before = [buf for (_, lo, _), buf in received if lo < start]
        after = [buf for (_, lo, _), buf in received if lo >= start]
        kv_ext = torch.cat(before + [kv] + after, dim=3)
        world = layout.world
        if n_globals_max == 0:
            gathered = own_globals.new_empty((world,) + tuple(own_globals.shape))
        else:
            parts = [torch.empty_like(own_globals) for _ in range(world)]
            dist.all_gather(parts, own_globals.contiguous(), group=group)
            gathered = torch.stack(parts)
        return kv_ext, gathered

    @staticmethod
    def backward(ctx, grad_ext, grad_gathered):
        layout, rank, group = ctx.layout, ctx.rank, ctx.group
        grad_kv = grad_globals = None
        if ctx.needs_input_grad[0]:
            start, n = layout.start(rank), layout.lengths[rank]
            before, _ = layout.halo_lengths(rank)
            grad_kv = grad_ext[..., before:before + n, :].clone()
            first = start - before
            # The halo's gradients go back to their owners; ours come from our readers.
            sends = [(owner, grad_ext[..., lo - first:hi - first, :].contiguous())
                     for owner, lo, hi in layout.receives(rank)]
            pieces = layout.sends(rank)
            recvs = [(reader, grad_kv.new_empty(*grad_kv.shape[:3], hi - lo, grad_kv.shape[-1]))
                     for reader, lo, hi in pieces]
            _p2p(sends, recvs, group)
            for (_, lo, hi), (_, buf) in zip(pieces, recvs):
                grad_kv[..., lo - start:hi - start, :] += buf
        if ctx.needs_input_grad[1] and ctx.n_globals_max > 0:
            total = grad_gathered.contiguous()
            dist.all_reduce(total, group=group)  # every rank's use of every global row
            grad_globals = total[rank]
        return grad_kv, grad_globals, None, None, None, None, None


def halo_and_globals(kv: torch.Tensor, own_globals: torch.Tensor, pending: PendingHalo, layout: ShardLayout,
                     rank: int, group, n_globals_max: int):
    """Wait for the halo posted by `pending = PendingHalo(kv, ...)` and gather the global rows:
    (kv_ext (2, B, Hk, key range, D), gathered (world, *own_globals.shape))."""
    return _HaloAndGlobals.apply(kv, own_globals, pending, layout, rank, group, n_globals_max)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rank: int, world: int, group):
        ctx.rank, ctx.group = rank, group
        parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank], None, None, None


def all_gather(x: torch.Tensor, rank: int, world: int, group) -> torch.Tensor:
    """Differentiable all_gather: (world, *x.shape); the gradient of x sums every rank's."""
    return _AllGather.apply(x, rank, world, group)
