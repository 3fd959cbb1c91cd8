"""longreach.distributed.local_attention: sliding-window attention over a sequence sharded
across the ranks of a torch.distributed group (context parallelism).

Rank r holds the contiguous positions [start_r, start_r + L_r) of q, k and v; positions are the
concatenation of the shards in rank order. One call:

1. one all_gather of a few ints per rank (shard lengths, shapes, dtype, options; metadata.py):
   every rank checks the same table and raises the same error on a mismatch;
2. the halo: the keys/values of the positions the shard's windows reach on other ranks, sent
   by their owners (layout.py, exchange.py), plus the all-gathered global rows (q, k, v at
   global positions; few) when there are global tokens;
3. the rows, with the fused op over [halo before | own | halo after]: the op aligns the last
   query row with the last key, so the shard's rows are followed by one dummy (zero) row per
   position of the halo after, which puts them at their true offsets; the dummy rows' outputs
   are dropped, so they pass no gradient. Distances (ALiBi), dilation residues and windows are
   then those of the unsharded sequence. The sigmoid default bias is the unsharded one,
   -ln(min(L_total, left + right + 1)), passed explicitly. The interior rows (whose window
   stays inside the shard) run on the own keys while the halo is in flight; the boundary rows
   after the wait (layout.row_groups);
4. global keys outside the halo: every row sees them (global_parts.py: the op with an unbounded
   window, or a dense part with ALiBi), merged with the op's result by their log-sum-exps
   (merge_attention) or added (sigmoid);
5. global rows (which see every key): every rank computes them over its own keys (global_parts.py
   again), the partial results are all-gathered and merged, and each owner keeps its rows.

The backward sends the halo's key/value gradients back to their owners (exchange.py). Every
rank must call this function, with the same options and shapes except the shard length, and
run the backward if any rank does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .. import ops
from .._checks import check_tensor
from ..ops.attention import kernel_options
from . import metadata
from .global_parts import attend_all
from .exchange import PendingHalo, all_gather, halo_and_globals
from .layout import ShardLayout, key_span, row_groups, total_reach

OWNER = metadata.OWNER


# Collectives, host-side plans and data-dependent shapes: torch.compile splits its graph here
# (the code before and after the call compiles; this function runs eagerly).
@torch.compiler.disable
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, window=(None, None),
                    causal: bool = False, dilation: int = 1, global_mask: Optional[torch.Tensor] = None,
                    alibi_slopes: Optional[torch.Tensor] = None, score: str = "softmax",
                    sigmoid_bias: Optional[float] = None, softcap: Optional[float] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Context-parallel longreach.local_attention; q (B, Hq, L_r, D), k, v (B, Hk, L_r, D) hold
    this rank's shard (L_r may differ between ranks, 0 included), global_mask (B, L_r) its part
    of the mask, alibi_slopes the same on every rank. Returns this rank's rows (B, Hq, L_r, D),
    equal to the rows of the single-process op over the concatenated sequence. Differentiable;
    a replicated alibi_slopes gets this rank's share of the gradient (sum it over the group, as
    for any replicated parameter)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{OWNER}: torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group(...) on every rank first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"{OWNER}: this process is not a member of the group it was given")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")

    local_error = None
    options = None
    try:
        options = _check_local(q, k, v, global_mask, alibi_slopes, window=window, causal=causal, dilation=dilation,
                               score=score, sigmoid_bias=sigmoid_bias, softcap=softcap, scale=scale)
    except (TypeError, ValueError) as error:  # reported to the others before it is raised here
        local_error = error
    ok = local_error is None
    own_idx = None
    if ok:
        gm = global_mask if global_mask is not None else torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool,
                                                                      device=q.device)
        own_idx = gm.any(dim=0).nonzero().flatten()
        # global_mask may be None on ranks without global tokens (the counts are shared); the
        # slopes must be the same values everywhere (one host copy of a few floats).
        slopes_values = None if alibi_slopes is None else alibi_slopes.detach().cpu().tolist()
        key = metadata.options_hash(options + (slopes_values,))
        slopes_kind = 0 if alibi_slopes is None else alibi_slopes.dim()
        needs = int(q.requires_grad) + 2 * int(k.requires_grad) + 4 * int(v.requires_grad)
        if not torch.is_grad_enabled():
            needs = 0
        vector = metadata.local_vector(True, q, k, key, slopes_kind, own_idx.numel(), needs)
    else:
        vector = metadata.local_vector(False, None, None, 0, 0, 0, 0)
    table = metadata.exchange(vector, group, device)
    metadata.verdict(table, rank, local_error)

    left, right, dilation, score, bias, softcap, scale = options
    lengths = tuple(row["length"] for row in table)
    layout = ShardLayout(lengths, left, right, dilation)
    total = layout.total
    if score == "sigmoid" and bias is None:
        # The unsharded default (docs/semantics.md): the op would count only this rank's keys.
        n = total if left < 0 or right < 0 else min(total, left + right + 1)
        bias = -math.log(n) if n > 0 else 0.0
    globals_max = max(row["globals"] for row in table)
    return _forward(q, k, v, gm, own_idx, alibi_slopes, layout, rank, group, globals_max, device,
                    dict(score=score, sigmoid_bias=bias, softcap=softcap, scale=scale), dilation)


def _forward(q, k, v, gm, own_idx, slopes, layout: ShardLayout, rank: int, group, globals_max: int, device,
             scoring: dict, dilation: int):
    B, Hq, n, D = q.shape
    Hk = k.shape[1]
    start, end = layout.start(rank), layout.end(rank)
    first, last = layout.key_range(rank)
    before, after = layout.halo_lengths(rank)

    # The global tokens' positions and per-batch flags, from every rank (ints, not differentiable).
    g_pos = torch.zeros(0, dtype=torch.long)
    g_mask = torch.zeros(B, 0, dtype=torch.bool)
    valid = torch.zeros(0, dtype=torch.long)
    if globals_max:
        info = torch.full((globals_max, 1 + B), -1, dtype=torch.int64)
        info[:own_idx.numel(), 0] = own_idx.cpu() + start
        info[:own_idx.numel(), 1:] = gm[:, own_idx].t().cpu().long()
        parts = [torch.empty_like(info) for _ in range(layout.world)]
        dist.all_gather(parts, info.to(device), group=group)
        table = torch.cat([p.cpu() for p in parts])  # (world * globals_max, 1 + B)
        valid = (table[:, 0] >= 0).nonzero().flatten()
        g_pos = table[valid, 0]
        g_mask = table[valid, 1:].t().bool()
    own_globals = _own_globals(q, k, v, own_idx, globals_max)
    kv = torch.stack((k, v))
    pending = PendingHalo(kv, layout, rank, group)  # the halo travels while the interior rows run

    g_pos_dev, g_mask_dev = g_pos.to(q.device), g_mask.to(q.device)
    kernel = dict(window=(None if layout.left < 0 else layout.left, None if layout.right < 0 else layout.right),
                  dilation=dilation, alibi_slopes=slopes, score=scoring["score"],
                  sigmoid_bias=scoring["sigmoid_bias"] if scoring["score"] == "sigmoid" else None,
                  softcap=scoring["softcap"] or None, scale=scoring["scale"])
    softmax = scoring["score"] == "softmax"
    reach_left = total_reach(layout.left, dilation, layout.total)
    reach_right = total_reach(layout.right, dilation, layout.total)
    groups = row_groups(n, before, after, reach_left, reach_right)

    def rows(r0, r1, keys_k, keys_v, a, b):
        """Rows [r0, r1) of the shard over keys [a, b) of the key range (ext coordinates),
        given as keys_k / keys_v; returns (out, lse, span of global positions)."""
        dummy = b - (before + r1)  # rows after r1 up to the last key: the op aligns bottom-right
        q_rows = q[:, :, r0:r1]
        if dummy:
            q_rows = torch.cat((q_rows, q.new_zeros(B, Hq, dummy, D)), dim=2)
        mask = _mask_over(g_pos, g_mask, first + a, first + b, q.device) if globals_max else None
        if softmax:
            o, lse = ops.local_attention(q_rows, keys_k, keys_v, return_lse=True, global_mask=mask, **kernel)
            return o[:, :, :r1 - r0], lse[:, :, :r1 - r0]
        return ops.local_attention(q_rows, keys_k, keys_v, global_mask=mask, **kernel)[:, :, :r1 - r0], None

    results = {}
    for r0, r1, interior in groups:
        if interior:  # its keys are all our own: no halo needed
            a, b = key_span(r0, r1, before, before + n + after, reach_left, reach_right)
            results[r0] = rows(r0, r1, k[:, :, a - before:b - before], v[:, :, a - before:b - before], a, b) + \
                ((a, b),)
    kv_ext, gathered = halo_and_globals(kv, own_globals, pending, layout, rank, group, globals_max)
    k_ext, v_ext = kv_ext[0], kv_ext[1]
    for r0, r1, interior in groups:
        if not interior:
            a, b = key_span(r0, r1, before, before + n + after, reach_left, reach_right)
            results[r0] = rows(r0, r1, k_ext[:, :, a:b], v_ext[:, :, a:b], a, b) + ((a, b),)

    if globals_max:
        channels = gathered.permute(1, 2, 0, 3, 4).reshape(B, Hq + 2 * Hk, -1, D)[:, :, valid.to(q.device)]
        q_g, k_g, v_g = channels.split((Hq, Hk, Hk), dim=1)
        dense = dict(alibi_slopes=slopes, **scoring)
        for r0, r1, _ in groups:
            o, lse, (a, b) = results[r0]
            # Global keys this group's call did not hold: every row sees them.
            outside = ((g_pos_dev < first + a) | (g_pos_dev >= first + b)).nonzero().flatten()
            positions = torch.arange(start + r0, start + r1, device=q.device)
            o_g, lse_g = attend_all(q[:, :, r0:r1], k_g[:, :, outside], v_g[:, :, outside], positions,
                                    g_pos_dev[outside], g_mask_dev[:, outside], **dense)
            if softmax:
                o, lse = ops.merge_attention([o, o_g], [lse, lse_g])
            else:
                o = o + o_g
            results[r0] = (o, lse, (a, b))
    parts_in_order = [results[r0][0] for r0, _, _ in sorted(groups)]
    out = parts_in_order[0] if len(parts_in_order) == 1 else torch.cat(parts_in_order, dim=2)
    if not globals_max:
        return out
    g_pos, g_mask = g_pos_dev, g_mask_dev
    positions = torch.arange(start, end, device=q.device)

    # Global rows see every key: each rank's keys give a partial result, merged over the group.
    part_out, part_lse = attend_all(q_g, k, v, g_pos, positions, None, **dense)
    if softmax:
        packed = torch.cat((part_out.to(part_lse.dtype), part_lse[..., None]), dim=-1)
        parts = all_gather(packed, rank, layout.world, group)
        rows, _ = ops.merge_attention(parts[..., :D], parts[..., D])  # in the accumulation dtype
    else:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        rows = all_gather(part_out.to(acc), rank, layout.world, group).sum(dim=0)
    mine = ((g_pos >= start) & (g_pos < end)).nonzero().flatten()
    local = g_pos[mine] - start
    full = out.new_zeros(out.shape).index_copy(2, local, rows[:, :, mine].to(out.dtype))
    is_global_row = torch.zeros(B, n, dtype=torch.bool, device=q.device)
    is_global_row[:, local] = g_mask[:, mine]
    return torch.where(is_global_row[:, None, :, None], full, out)


def _own_globals(q, k, v, own_idx, globals_max: int) -> torch.Tensor:
    """(B, Hq + 2 Hk, globals_max, D): this rank's rows at global positions (any batch row),
    zero-padded to the group's largest count (all_gather needs one size)."""
    B, _, _, D = q.shape
    rows = torch.cat((q[:, :, own_idx], k[:, :, own_idx], v[:, :, own_idx]), dim=1) if globals_max else \
        q.new_zeros(B, q.shape[1] + 2 * k.shape[1], 0, D)
    pad = globals_max - rows.shape[2]
    return torch.cat((rows, rows.new_zeros(B, rows.shape[1], pad, D)), dim=2) if pad else rows


def _mask_over(g_pos, g_mask, first: int, last: int, device) -> torch.Tensor:
    """global_mask (B, last - first) of the key range [first, last), from the gathered globals."""
    mask = torch.zeros(g_mask.shape[0], last - first, dtype=torch.bool)
    inside = ((g_pos >= first) & (g_pos < last)).nonzero().flatten()
    mask[:, g_pos[inside] - first] = g_mask[:, inside]
    return mask.to(device)


def _check_local(q, k, v, global_mask, alibi_slopes, **options) -> tuple:
    """This rank's own input, checked before the metadata exchange (the ops would check it after
    the collectives, when the other ranks already wait). Returns kernel_options' tuple."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OWNER, name, t)
        if t.dim() != 4:
            raise ValueError(f"{OWNER}: {name} must be a 4-D tensor (B, H, L_rank, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{OWNER}: {name} must be a floating point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{OWNER}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{OWNER}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{OWNER}: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, the shard length "
                         f"and D (self-attention over one shard)")
    if q.shape[3] == 0 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{OWNER}: need D >= 1 and Hq a multiple of Hk, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if global_mask is not None and options.get("causal"):
        # The single-process op's causal global rule (a global row sees only keys up to its position,
        # a global key only later rows) is not built into the global parts here yet. A ValueError,
        # so that the other ranks learn of it in the metadata exchange instead of waiting.
        raise ValueError(f"{OWNER}: global tokens with causal=True are not supported with context parallelism "
                         f"yet; pass causal=False (bidirectional global tokens) or no global_mask")
    if global_mask is not None:
        check_tensor(OWNER, "global_mask", global_mask, "a bool tensor of shape (B, L_rank) or None")
        if global_mask.dtype != torch.bool:
            raise TypeError(f"{OWNER}: global_mask must be a bool tensor, got {global_mask.dtype}")
        if tuple(global_mask.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"{OWNER}: global_mask must have shape (B, L_rank) = {(q.shape[0], q.shape[2])}, "
                             f"got {tuple(global_mask.shape)}")
    if alibi_slopes is not None:
        check_tensor(OWNER, "alibi_slopes", alibi_slopes, "a float32 tensor of shape (Hq,) or (B, Hq), or None")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"{OWNER}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((q.shape[1],), (q.shape[0], q.shape[1])):
            raise ValueError(f"{OWNER}: alibi_slopes must have shape (Hq,) or (B, Hq), got "
                             f"{tuple(alibi_slopes.shape)}")
    return kernel_options(OWNER, q.shape[-1], return_lse=False, **options)
