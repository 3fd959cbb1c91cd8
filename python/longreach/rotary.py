"""Rotary position embedding (RoPE) as a fused op: public API, fake kernels, autograd.

The C++ op ``torch.ops.longreach.apply_rotary(x, cos, sin, position_ids,
interleaved, conjugate)`` rotates the first ``rot_dim = 2 * cos.shape[-1]``
features of every head row by the angles of the row's position; ``conjugate``
rotates the other way. Because a rotation's transpose is its inverse, the
backward is the same op with ``conjugate`` flipped: one op and one kernel serve
both directions (and double backward). ``apply_rotary_qk`` rotates q and k in
one call. The tables are the ones `longreach.nn.RotaryEmbedding` builds from
`longreach.rope_frequencies`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._library import check_device_supported


def _check_args(name: str, tensors, position_ids, interleaved) -> None:
    for arg, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"{name}: position_ids must be a tensor or None, got {type(position_ids).__name__}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"{name}: interleaved must be a bool, got {interleaved!r}")


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, H, L, D), fused, with backward.

    ``cos`` / ``sin``: tables (max_positions, rot_dim / 2) indexed by position,
    e.g. ``cos(p * inv_freq) * attention_factor`` from
    ``longreach.rope_frequencies``. The first ``rot_dim = 2 * cos.shape[-1]``
    features are rotated, the rest pass through (partial rotary).
    ``position_ids``: (B, L) or (1, L) int64 rows of the tables; None means
    0 .. L-1 (offsets, e.g. for decoding after a cache, are the caller's).
    ``interleaved=False`` pairs feature i with i + rot_dim/2 (GPT-NeoX, Hugging
    Face); ``True`` pairs 2i with 2i+1 (GPT-J, Meta). Math in float32 (float64
    for float64 x); the output is contiguous, in x's dtype.
    """
    _check_args("apply_rotary", (("x", x), ("cos", cos), ("sin", sin)), position_ids, interleaved)
    check_device_supported("apply_rotary", x)
    return torch.ops.longreach.apply_rotary(x, cos, sin, position_ids, interleaved, False)


def apply_rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary` of q (B, Hq, L, D) and k (B, Hk, L, D) with one set of tables and ids, in one op."""
    _check_args("apply_rotary_qk", (("q", q), ("k", k), ("cos", cos), ("sin", sin)), position_ids, interleaved)
    check_device_supported("apply_rotary_qk", q)
    return torch.ops.longreach.apply_rotary_qk(q, k, cos, sin, position_ids, interleaved, False)


# ----------------------------------------------------------------- fake kernels --


def _fake_out(x: torch.Tensor) -> torch.Tensor:
    # The kernels return a contiguous tensor of x's shape and dtype.
    return x.new_empty(x.shape)


@torch.library.register_fake("longreach::apply_rotary")
def _apply_rotary_fake(x, cos, sin, position_ids, interleaved, conjugate):
    return _fake_out(x)


@torch.library.register_fake("longreach::apply_rotary_qk")
def _apply_rotary_qk_fake(q, k, cos, sin, position_ids, interleaved, conjugate):
    return _fake_out(q), _fake_out(k)


# --------------------------------------------------------------------- autograd --


def _pairs(t: torch.Tensor, half: int, interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two features of every rotary pair, each (..., half)."""
    if interleaved:
        return t[..., 0 : 2 * half : 2], t[..., 1 : 2 * half : 2]
    return t[..., :half], t[..., half : 2 * half]


def _table_grads(x, grad, cos, sin, position_ids, interleaved, conjugate, need_cos, need_sin):
    """Gradients of the tables, for the rare caller whose cos / sin require grad
    (e.g. learned frequencies). With y1 = x1 c - x2 s', y2 = x2 c + x1 s' and
    s' = -s when conjugate: dc = g1 x1 + g2 x2, ds' = g2 x1 - g1 x2, summed
    over heads and over every (batch, position) that reads the table row."""
    half = cos.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = (t.to(acc) for t in _pairs(x, half, interleaved))
    g1, g2 = (t.to(acc) for t in _pairs(grad, half, interleaved))
    batch, _, seq_len, _ = x.shape
    if position_ids is None:
        rows = torch.arange(seq_len, device=x.device).expand(batch, seq_len)
    else:
        rows = position_ids.expand(batch, seq_len)
    rows = rows.reshape(-1)

    def scatter(per_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        summed = per_row.sum(dim=1).reshape(-1, half)  # sum over heads -> (B * L, half)
        out = torch.zeros(like.shape, dtype=acc, device=like.device)
        return out.index_add_(0, rows, summed).to(like.dtype)

    grad_cos = scatter(g1 * x1 + g2 * x2, cos) if need_cos else None
    grad_sin = None
    if need_sin:
        grad_sin = scatter(g2 * x1 - g1 * x2, sin)
        if conjugate:
            grad_sin = -grad_sin
    return grad_cos, grad_sin


def _rotary_setup_context(ctx, inputs, output):
    x, cos, sin, position_ids, interleaved, conjugate = inputs
    ctx.interleaved, ctx.conjugate = interleaved, conjugate
    ctx.need_tables = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    # x is kept only when a table needs its gradient; the gradient of x needs no saved input.
    ctx.save_for_backward(cos, sin, position_ids, x if any(ctx.need_tables) else None)


def _rotary_backward(ctx, grad):
    cos, sin, position_ids, x = ctx.saved_tensors
    grad_x = torch.ops.longreach.apply_rotary(grad, cos, sin, position_ids, ctx.interleaved, not ctx.conjugate)
    grad_cos = grad_sin = None
    if any(ctx.need_tables):
        grad_cos, grad_sin = _table_grads(x, grad, cos, sin, position_ids, ctx.interleaved, ctx.conjugate,
                                          *ctx.need_tables)
    return grad_x, grad_cos, grad_sin, None, None, None


def _rotary_qk_setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, interleaved, conjugate = inputs
    ctx.interleaved, ctx.conjugate = interleaved, conjugate
    ctx.need_tables = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    keep = any(ctx.need_tables)
    ctx.save_for_backward(cos, sin, position_ids, q if keep else None, k if keep else None)


def _rotary_qk_backward(ctx, grad_q, grad_k):
    cos, sin, position_ids, q, k = ctx.saved_tensors
    grad_q_in, grad_k_in = torch.ops.longreach.apply_rotary_qk(
        grad_q, grad_k, cos, sin, position_ids, ctx.interleaved, not ctx.conjugate
    )
    grad_cos = grad_sin = None
    if any(ctx.need_tables):
        parts = [
            _table_grads(x, g, cos, sin, position_ids, ctx.interleaved, ctx.conjugate, *ctx.need_tables)
            for x, g in ((q, grad_q), (k, grad_k))
        ]
        grad_cos = parts[0][0] + parts[1][0] if ctx.need_tables[0] else None
        grad_sin = parts[0][1] + parts[1][1] if ctx.need_tables[1] else None
    return grad_q_in, grad_k_in, grad_cos, grad_sin, None, None, None


torch.library.register_autograd(
    "longreach::apply_rotary", _rotary_backward, setup_context=_rotary_setup_context
)
torch.library.register_autograd(
    "longreach::apply_rotary_qk", _rotary_qk_backward, setup_context=_rotary_qk_setup_context
)
