"""Public functional API of the fused attention op, its fake (meta) kernels and autograd.

The C++ library defines separate forward and backward ops
(`torch.ops.longreach.local_attention_fwd` / `_bwd`); this module gives them
shapes for tracing (register_fake) and a derivative (an autograd.Function, see
_autograd.py), so `torch.compile(fullgraph=True)` sees ordinary ops in both directions.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _autograd
from ._checks import (SCORES, check_bool, check_int, check_same_device, check_scale, check_score,  # noqa: F401
                      check_sigmoid_bias, check_softcap, check_tensor, check_window_side)
from ._library import check_device_supported

Window = Tuple[Optional[int], Optional[int]]
OWNER = "local_attention"


def normalize_window(window, causal: bool, owner: str = OWNER) -> Tuple[int, int]:
    """(left, right) as ints with -1 for unbounded (the kernels' convention); causal forces right = 0."""
    if window is None:
        window = (None, None)
    if not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2:
        raise ValueError(f"{owner}: window must be a pair (left, right), got {window!r}")
    left = check_window_side(owner, "left", window[0])
    right = 0 if causal else check_window_side(owner, "right", window[1])
    return (-1 if left is None else left), (-1 if right is None else right)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: Window = (None, None),
    causal: bool = False,
    dilation: int = 1,
    global_mask: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    score: str = "softmax",
    sigmoid_bias: Optional[float] = None,
    softcap: Optional[float] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Sliding-window attention with dilation, global tokens, ALiBi and soft-capping.

    q: (B, Hq, Lq, D); k, v: (B, Hk, Lk, D) with Hq % Hk == 0. Query row i sits
    at key position i + Lk - Lq. Key j is in the window of that position p iff
    (p - j) % dilation == 0 and -left <= (j - p) / dilation <= right
    (None = unbounded); causal=True forces right = 0. Rows also see the keys
    marked in ``global_mask`` (B, Lk), and a row whose position is global sees
    every key. Scores: scale * q.k, then softcap, then minus slope * |p - j|,
    then softmax, or sigmoid(s + sigmoid_bias) summed without normalisation.
    A row with no allowed key returns zeros. Returns (B, Hq, Lq, D), and the
    row log-sum-exp (B, Hq, Lq) with return_lse=True (softmax only).

    Differentiable by reverse mode (backward, torch.autograd.grad, torch.func.grad,
    vjp, jacrev); second derivatives and forward mode raise NotImplementedError.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OWNER, name, t)
    if q.dim() != 4:
        raise ValueError(f"{OWNER}: q must be a 4-D tensor (B, H, L, D), got shape {tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{OWNER}: q must have head dim D >= 1, got shape {tuple(q.shape)}")
    causal = check_bool(OWNER, "causal", causal)
    return_lse = check_bool(OWNER, "return_lse", return_lse)
    score = check_score(OWNER, score)
    if return_lse and score != "softmax":
        raise ValueError(f"{OWNER}: return_lse=True is only defined for score='softmax'")
    dilation = check_int(OWNER, "dilation", dilation, 1)
    softcap = check_softcap(OWNER, softcap)
    scale = check_scale(OWNER, scale)
    sigmoid_bias = check_sigmoid_bias(OWNER, sigmoid_bias, score)
    if global_mask is not None:
        check_tensor(OWNER, "global_mask", global_mask, "a bool tensor of shape (B, Lk) or None")
    if alibi_slopes is not None:
        check_tensor(OWNER, "alibi_slopes", alibi_slopes, "a float32 tensor of shape (Hq,) or (B, Hq), or None")
    left, right = normalize_window(window, causal)
    check_same_device(OWNER, q=q, k=k, v=v, global_mask=global_mask, alibi_slopes=alibi_slopes)
    check_device_supported("local_attention_fwd", q)
    out, lse = _autograd.call(
        _LocalAttention, _FWD, q, k, v, global_mask, alibi_slopes, left, right, dilation, score, sigmoid_bias,
        0.0 if softcap is None else softcap, q.shape[-1] ** -0.5 if scale is None else scale,
    )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------- fake kernels --


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("longreach::local_attention_fwd")
def _local_attention_fwd_fake(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation,
                              score, sigmoid_bias, softcap, scale):
    check_same_device(OWNER, q=q, k=k, v=v, global_mask=global_mask, alibi_slopes=alibi_slopes)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("longreach::local_attention_bwd")
def _local_attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes, window_left,
                              window_right, dilation, score, sigmoid_bias, softcap, scale, alibi_grad=False):
    check_same_device(OWNER, q=q, k=k, v=v, global_mask=global_mask, alibi_slopes=alibi_slopes)
    # grad_alibi_slopes: (B, Hq) float32 with alibi_grad, else empty (csrc/ops.cpp)
    slopes_shape = (q.shape[0], q.shape[1]) if alibi_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(slopes_shape, dtype=torch.float32))


# --------------------------------------------------------------------- autograd --

_FWD = torch.ops.longreach.local_attention_fwd.default
_BWD = torch.ops.longreach.local_attention_bwd.default
_FwdArgs = _autograd.schema_args(_FWD, "_FwdArgs")
_BwdArgs = _autograd.schema_args(_BWD, "_BwdArgs")
_Saved = namedtuple("_Saved", "q k v out lse global_mask alibi_slopes")
# The non-tensor arguments: the backward op takes them as the forward op got them.
_OPTIONS = ("window_left", "window_right", "dilation", "score", "sigmoid_bias", "softcap", "scale")

_NO_FORWARD_MODE = (
    "longreach.local_attention: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) "
    "is not supported; use reverse mode (backward, torch.autograd.grad, torch.func.grad, vjp, jacrev)"
)
_NO_DOUBLE_BACKWARD = (
    "longreach.local_attention: double backward (a derivative of the gradient: create_graph=True followed by "
    "another grad, gradgradcheck, nested torch.func.grad, hessian) is not supported; the backward kernels "
    "have no derivative of their own"
)


class _LocalAttention(torch.autograd.Function):
    generate_vmap_rule = True  # torch.func.vmap / jacrev: the op runs once per batch element

    @staticmethod
    def forward(*args):
        return _autograd.forward_below_autograd(_FWD, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = _FwdArgs(*inputs)
        out, lse = output
        ctx.save_for_backward(*_Saved(args.q, args.k, args.v, out, lse, args.global_mask, args.alibi_slopes))
        ctx.options = {name: getattr(args, name) for name in _OPTIONS}

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        saved = _Saved(*ctx.saved_tensors)
        if ctx.options["score"] != "softmax":
            grad_lse = None  # lse is not defined for sigmoid scores
        slopes_grad = saved.alibi_slopes is not None and ctx.needs_input_grad[_FwdArgs._fields.index("alibi_slopes")]
        args = _BwdArgs(grad_out=grad_out, grad_lse=grad_lse, **saved._asdict(), **ctx.options, alibi_grad=slopes_grad)
        grads = dict(zip(("q", "k", "v", "alibi_slopes"), _autograd.call(_LocalAttentionBackward, _BWD, *args)))
        if slopes_grad:  # (B, Hq) from the kernels; (Hq,) slopes are shared by the batch
            grads["alibi_slopes"] = grads["alibi_slopes"].sum(0) if saved.alibi_slopes.dim() == 1 else grads["alibi_slopes"]
        else:
            del grads["alibi_slopes"]
        return tuple(grads.get(name) for name in _FwdArgs._fields)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_NO_FORWARD_MODE)


class _LocalAttentionBackward(torch.autograd.Function):
    """The backward op, whose own derivatives raise: without a Function autograd would treat
    the op as a constant, and second derivatives would silently be zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _autograd.forward_below_autograd(_BWD, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # nothing to save; defined because torch.func transforms require it

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)


_autograd.register(_FWD, _LocalAttention, "longreach.local_attention")
_autograd.register(_BWD, _LocalAttentionBackward, "longreach.local_attention")
