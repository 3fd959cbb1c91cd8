"""Rotary position embedding (RoPE) as a fused op: public API, fake kernels, autograd.

The C++ op ``torch.ops.longreach.apply_rotary(x, cos, sin, position_ids,
interleaved, conjugate)`` rotates the first ``rot_dim = 2 * cos.shape[-1]``
features of every head row by the angles of the row's position; ``conjugate``
rotates the other way. Because a rotation's transpose is its inverse, the
backward is the same op with ``conjugate`` flipped: one op and one kernel serve
both directions, and higher derivatives. The op is bilinear in x and the
tables, so forward mode (jvp, jacfwd) is the op again too. ``apply_rotary_qk`` rotates q and k in
one call. The tables are the ones `longreach.nn.RotaryEmbedding` builds from
`longreach.rope_frequencies`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _autograd
from .._checks import check_bool, check_same_device, check_tensor
from .._library import check_device_supported


def _check_args(owner: str, tensors, position_ids, interleaved) -> None:
    for arg, t in tensors:
        check_tensor(owner, arg, t)
    if position_ids is not None:
        check_tensor(owner, "position_ids", position_ids, "an int64 tensor of shape (B, L) or (1, L), or None")
    check_bool(owner, "interleaved", interleaved)


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
    return _rotate(x, cos, sin, position_ids, interleaved, False)


def apply_rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary` of q (B, Hq, L, D) and k (B, Hk, L, D) with one set of tables and ids, in one op."""
    owner = "apply_rotary_qk"
    _check_args(owner, (("q", q), ("k", k), ("cos", cos), ("sin", sin)), position_ids, interleaved)
    # q and k are checked against each other here: the kernel checks them one at a time
    # (its messages would say apply_rotary and give k's batch as the expected one).
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{owner}: {name} must be a 4-D tensor (B, H, L, D), got shape {tuple(t.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"{owner}: q and k must share one dtype, got q {q.dtype} and k {k.dtype}")
    if position_ids is not None and (q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]):
        raise ValueError(f"{owner}: q and k share position_ids, so they must have the same batch size and length, "
                         f"got q of shape {tuple(q.shape)} and k of shape {tuple(k.shape)}")
    check_device_supported(owner, q)
    try:
        return _autograd.call(_ApplyRotaryQK, _ROTARY_QK, q, k, cos, sin, position_ids, interleaved, False)
    except (TypeError, ValueError) as error:
        # The kernel's checks are apply_rotary's and name it: name the function called instead.
        raise type(error)(str(error).replace("apply_rotary:", f"{owner}:", 1)) from None


# ----------------------------------------------------------------- fake kernels --


def _fake_out(x: torch.Tensor) -> torch.Tensor:
    # The kernels return a contiguous tensor of x's shape and dtype.
    return x.new_empty(x.shape)


@torch.library.register_fake("longreach::apply_rotary")
def _apply_rotary_fake(x, cos, sin, position_ids, interleaved, conjugate):
    check_same_device("apply_rotary", x=x, cos=cos, sin=sin, position_ids=position_ids)
    return _fake_out(x)


@torch.library.register_fake("longreach::apply_rotary_qk")
def _apply_rotary_qk_fake(q, k, cos, sin, position_ids, interleaved, conjugate):
    check_same_device("apply_rotary_qk", q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
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
        return out.index_add(0, rows, summed).to(like.dtype)  # out of place: torch.func.vmap (jacrev) needs it

    grad_cos = scatter(g1 * x1 + g2 * x2, cos) if need_cos else None
    grad_sin = None
    if need_sin:
        grad_sin = scatter(g2 * x1 - g1 * x2, sin)
        if conjugate:
            grad_sin = -grad_sin
    return grad_cos, grad_sin


_ROTARY = torch.ops.longreach.apply_rotary.default
_ROTARY_QK = torch.ops.longreach.apply_rotary_qk.default
_RotaryArgs = _autograd.schema_args(_ROTARY, "_RotaryArgs")
_RotaryQKArgs = _autograd.schema_args(_ROTARY_QK, "_RotaryQKArgs")


def _rotate(x, cos, sin, position_ids, interleaved: bool, conjugate: bool) -> torch.Tensor:
    """The op, differentiable again (the backward and jvp use it: higher derivatives work)."""
    return _autograd.call(_ApplyRotary, _ROTARY, x, cos, sin, position_ids, interleaved, conjugate)


def _tangent(x, x_t, cos, sin, cos_t, sin_t, position_ids, interleaved, conjugate):
    """Forward-mode derivative: the op is bilinear in x and (cos, sin), so the tangent is x's
    tangent rotated by the tables plus the rotated features of x "rotated" by the tables'
    tangents (the pass-through features do not depend on the tables)."""
    out = None if x_t is None else _rotate(x_t, cos, sin, position_ids, interleaved, conjugate)
    if cos_t is not None or sin_t is not None:
        rot_dim = 2 * cos.shape[-1]
        x_rot = torch.nn.functional.pad(x[..., :rot_dim], (0, x.shape[-1] - rot_dim))
        cos_t = torch.zeros_like(cos) if cos_t is None else cos_t
        sin_t = torch.zeros_like(sin) if sin_t is None else sin_t
        table_part = _rotate(x_rot, cos_t, sin_t, position_ids, interleaved, conjugate)
        out = table_part if out is None else out + table_part
    return torch.zeros_like(x) if out is None else out


class _ApplyRotary(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _autograd.forward_below_autograd(_ROTARY, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = _RotaryArgs(*inputs)
        need = _RotaryArgs(*ctx.needs_input_grad)
        ctx.interleaved, ctx.conjugate = args.interleaved, args.conjugate
        ctx.need_tables = need.cos, need.sin
        # x is kept only when a table needs its gradient; the gradient of x needs no saved input.
        ctx.save_for_backward(args.cos, args.sin, args.position_ids, args.x if any(ctx.need_tables) else None)
        ctx.save_for_forward(args.x, args.cos, args.sin, args.position_ids)  # released after the forward

    @staticmethod
    def backward(ctx, grad):
        cos, sin, position_ids, x = ctx.saved_tensors
        grads = {"x": _rotate(grad, cos, sin, position_ids, ctx.interleaved, not ctx.conjugate)}
        if any(ctx.need_tables):
            grads["cos"], grads["sin"] = _table_grads(x, grad, cos, sin, position_ids, ctx.interleaved,
                                                      ctx.conjugate, *ctx.need_tables)
        return tuple(grads.get(name) for name in _RotaryArgs._fields)

    @staticmethod
    def jvp(ctx, x_t, cos_t, sin_t, *_):
        x, cos, sin, position_ids = ctx.saved_tensors
        return _tangent(x, x_t, cos, sin, cos_t, sin_t, position_ids, ctx.interleaved, ctx.conjugate)


class _ApplyRotaryQK(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _autograd.forward_below_autograd(_ROTARY_QK, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = _RotaryQKArgs(*inputs)
        need = _RotaryQKArgs(*ctx.needs_input_grad)
        ctx.interleaved, ctx.conjugate = args.interleaved, args.conjugate
        ctx.need_tables = need.cos, need.sin
        keep = any(ctx.need_tables)
        ctx.save_for_backward(args.cos, args.sin, args.position_ids, args.q if keep else None,
                              args.k if keep else None)
        ctx.save_for_forward(args.q, args.k, args.cos, args.sin, args.position_ids)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, position_ids, q, k = ctx.saved_tensors
        grads = dict(zip("qk", _autograd.call(_ApplyRotaryQK, _ROTARY_QK, grad_q, grad_k, cos, sin, position_ids,
                                              ctx.interleaved, not ctx.conjugate)))
        if any(ctx.need_tables):
            parts = [
                _table_grads(x, g, cos, sin, position_ids, ctx.interleaved, ctx.conjugate, *ctx.need_tables)
                for x, g in ((q, grad_q), (k, grad_k))
            ]
            grads["cos"] = parts[0][0] + parts[1][0] if ctx.need_tables[0] else None
            grads["sin"] = parts[0][1] + parts[1][1] if ctx.need_tables[1] else None
        return tuple(grads.get(name) for name in _RotaryQKArgs._fields)

    @staticmethod
    def jvp(ctx, q_t, k_t, cos_t, sin_t, *_):
        q, k, cos, sin, position_ids = ctx.saved_tensors
        return tuple(_tangent(x, x_t, cos, sin, cos_t, sin_t, position_ids, ctx.interleaved, ctx.conjugate)
                     for x, x_t in ((q, q_t), (k, k_t)))


_autograd.register(_ROTARY, _ApplyRotary, "longreach.apply_rotary")
_autograd.register(_ROTARY_QK, _ApplyRotaryQK, "longreach.apply_rotary_qk")
