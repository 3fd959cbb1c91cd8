"""Public functional API of the fused attention op, its fake (meta) kernels and autograd.

The C++ library defines separate forward and backward ops
(`torch.ops.longreach.local_attention_fwd` / `_bwd`); this module gives them
shapes for tracing (register_fake) and a derivative (an autograd.Function, see
_autograd.py), so `torch.compile(fullgraph=True)` sees ordinary ops in both directions.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _autograd
from ..dropout import draw_seed
from .autocast import register_autocast
from .._checks import (SCORES, check_bool, check_chunk, check_dropout_p, check_int,  # noqa: F401
                       check_same_device, check_scale, check_score, check_sigmoid_bias, check_sinks, check_softcap, check_tensor, check_window_side)
from .._library import check_device_supported

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


def sink_options(owner: str, q_heads: int, *, causal, score, sink_tokens, sinks) -> tuple:
    """The ops' last arguments, checked: (causal, sink_tokens, sinks)."""
    causal = check_bool(owner, "causal", causal)
    sink_tokens = check_int(owner, "sink_tokens", sink_tokens, 0)
    return causal, sink_tokens, check_sinks(owner, sinks, q_heads, check_score(owner, score))


def dropout_options(owner: str, dropout_p) -> tuple:
    """The ops' last two arguments: (dropout_p, dropout_seed), the seed (seed, offset) drawn
    from torch's default generator only when p > 0, so p = 0 leaves the generator alone."""
    dropout_p = check_dropout_p(owner, dropout_p)
    return (dropout_p, draw_seed()) if dropout_p > 0 else (0.0, None)


def kernel_options(owner: str, head_dim, *, window, causal, dilation, score, sigmoid_bias, softcap, scale,
                   return_lse) -> tuple:
    """The keyword options of local_attention and local_attention_varlen, checked, as the ops
    take them: (window_left, window_right, dilation, score, sigmoid_bias, softcap, scale)."""
    causal = check_bool(owner, "causal", causal)
    return_lse = check_bool(owner, "return_lse", return_lse)
    score = check_score(owner, score)
    if return_lse and score != "softmax":
        raise ValueError(f"{owner}: return_lse=True is only defined for score='softmax'")
    dilation = check_int(owner, "dilation", dilation, 1)
    softcap = check_softcap(owner, softcap)
    scale = check_scale(owner, scale)
    sigmoid_bias = check_sigmoid_bias(owner, sigmoid_bias, score)
    left, right = normalize_window(window, causal, owner)
    return (left, right, dilation, score, sigmoid_bias, 0.0 if softcap is None else softcap,
            head_dim ** -0.5 if scale is None else scale)


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
    key_padding_mask: Optional[torch.Tensor] = None,
    sink_tokens: int = 0,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = 0,
    chunk_shift: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
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

    key_padding_mask: (B, Lk) bool, True = padding (PyTorch's convention, as in
    nn.MultiheadAttention), any pattern. A padded position holds no key (nor a
    global one), the other keys keep their positions, a query row at a padded
    position returns zeros (lse -inf), and the default sigmoid bias counts each
    row's real keys. No host synchronisation.

    With causal=True global tokens are causal: a global row sees the keys up to
    its position, a global key only the rows at or after it. sink_tokens=n: the
    first n keys are seen by every row at or after them (StreamingLLM). sinks:
    (Hq,) learnable logits (gpt-oss), one more term exp(sinks[h]) in each softmax
    row's denominator with no value; lse includes it; differentiable.

    chunk=c > 0 (Llama-4, FA3's attention_chunk, LongLoRA's S2-Attn): a row sees the window
    keys of its own chunk only, chunks of c positions counted from position 0 and offset per
    head by chunk_shift (Hq,) int (None = 0): key j is visible to position p iff
    (p + shift) // c == (j + shift) // c. Global keys, global rows and sinks cross chunks.
    dropout_p: attention dropout (training), CPU and CUDA (one mask for a seed): each weight after the
    softmax (or sigmoid) is zeroed with probability p and the kept ones are scaled by
    1 / (1 - p); lse is not affected. The mask comes from a counter-based RNG (Philox) keyed
    by a (seed, offset) drawn from torch's default generator, so torch.manual_seed makes it
    reproducible and the backward regenerates it (longreach.dropout.keep_mask).

    Differentiable by reverse mode (backward, torch.autograd.grad, torch.func.grad,
    vjp, jacrev); second derivatives and forward mode raise NotImplementedError.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OWNER, name, t)
    if q.dim() != 4:
        raise ValueError(f"{OWNER}: q must be a 4-D tensor (B, H, L, D), got shape {tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{OWNER}: q must have head dim D >= 1, got shape {tuple(q.shape)}")
    options = kernel_options(OWNER, q.shape[-1], window=window, causal=causal, dilation=dilation, score=score,
                             sigmoid_bias=sigmoid_bias, softcap=softcap, scale=scale, return_lse=return_lse)
    if global_mask is not None:
        check_tensor(OWNER, "global_mask", global_mask, "a bool tensor of shape (B, Lk) or None")
    if alibi_slopes is not None:
        check_tensor(OWNER, "alibi_slopes", alibi_slopes, "a float32 tensor of shape (Hq,) or (B, Hq), or None")
    if key_padding_mask is not None:
        check_tensor(OWNER, "key_padding_mask", key_padding_mask, "a bool tensor of shape (B, Lk) or None")
    check_same_device(OWNER, q=q, k=k, v=v, global_mask=global_mask, alibi_slopes=alibi_slopes,
                      key_padding_mask=key_padding_mask)
    extra = sink_options(OWNER, q.shape[1], causal=causal, score=score, sink_tokens=sink_tokens, sinks=sinks)
    check_same_device(OWNER, q=q, sinks=sinks)
    chunks = check_chunk(OWNER, chunk, chunk_shift, q.shape[1])
    check_same_device(OWNER, q=q, chunk_shift=chunk_shift)
    check_device_supported("local_attention_fwd", q)
    drop = dropout_options(OWNER, dropout_p)
    out, lse = _autograd.call(_LocalAttention, _FWD, q, k, v, global_mask, alibi_slopes, *options, key_padding_mask,
                              *extra, *chunks, *drop)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------- fake kernels --


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("longreach::local_attention_fwd")
def _local_attention_fwd_fake(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation,
                              score, sigmoid_bias, softcap, scale, key_padding_mask=None, causal=False, sink_tokens=0,
                              sinks=None, chunk=0, chunk_shift=None, dropout_p=0.0, dropout_seed=None):
    check_same_device(OWNER, q=q, k=k, v=v, global_mask=global_mask, alibi_slopes=alibi_slopes,
                      key_padding_mask=key_padding_mask, sinks=sinks, chunk_shift=chunk_shift)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("longreach::local_attention_bwd")
def _local_attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes, window_left,
                              window_right, dilation, score, sigmoid_bias, softcap, scale, alibi_grad=False,
                              key_padding_mask=None, causal=False, sink_tokens=0, sinks=None, chunk=0,
                              chunk_shift=None, dropout_p=0.0, dropout_seed=None):
    check_same_device(OWNER, q=q, k=k, v=v, global_mask=global_mask, alibi_slopes=alibi_slopes,
                      key_padding_mask=key_padding_mask, sinks=sinks, chunk_shift=chunk_shift)
    # grad_alibi_slopes: (B, Hq) float32 with alibi_grad, else empty (csrc/ops.cpp)
    slopes_shape = (q.shape[0], q.shape[1]) if alibi_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(slopes_shape, dtype=torch.float32), sinks_grad_fake(sinks, q))


def sinks_grad_fake(sinks, q):
    """The backward's grad_sinks: sinks' shape and dtype, or an empty (0,) float32 tensor."""
    return q.new_empty((0,), dtype=torch.float32) if sinks is None else sinks.new_empty(sinks.shape)


# --------------------------------------------------------------------- autograd --

_FWD = torch.ops.longreach.local_attention_fwd.default
_BWD = torch.ops.longreach.local_attention_bwd.default
_NO_FORWARD_MODE = (
    "{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) "
    "is not supported; use reverse mode (backward, torch.autograd.grad, torch.func.grad, vjp, jacrev)"
)
_NO_DOUBLE_BACKWARD = (
    "{name}: double backward (a derivative of the gradient: create_graph=True followed by "
    "another grad, gradgradcheck, nested torch.func.grad, hessian) is not supported; the backward kernels "
    "have no derivative of their own"
)
_TENSOR_ARG = torch._C.OptionalType.ofTensor()


def attention_autograd(fwd: torch._ops.OpOverload, bwd: torch._ops.OpOverload, public_name: str, name: str):
    """The autograd.Function of an attention op pair (fwd returns (out, lse), bwd the gradients of
    q, k, v and the ALiBi slopes), registered as both ops' Autograd kernels; returns the forward's.

    The backward op takes grad_out, grad_lse, the forward's tensor inputs, out and lse, and the
    forward's other arguments as it got them, all by name, plus alibi_grad. Its slope gradient
    has one row per batch element (or sequence), summed when the slopes are shared, (Hq,)."""
    fwd_args = _autograd.schema_args(fwd, "FwdArgs")
    bwd_args = _autograd.schema_args(bwd, "BwdArgs")
    tensors = [a.name for a in fwd._schema.arguments if a.type.isSubtypeOf(_TENSOR_ARG)]
    options = [name for name in fwd_args._fields if name not in tensors]
    slopes_index = fwd_args._fields.index("alibi_slopes")

    class Forward(torch.autograd.Function):
        generate_vmap_rule = True  # torch.func.vmap / jacrev: the op runs once per batch element

        @staticmethod
        def forward(*args):
            return _autograd.forward_below_autograd(fwd, *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            args = fwd_args(*inputs)
            ctx.save_for_backward(*(getattr(args, name) for name in tensors), *output)
            ctx.options = {name: getattr(args, name) for name in options}

        @staticmethod
        def backward(ctx, grad_out, grad_lse):
            *inputs, out, lse = ctx.saved_tensors
            saved = dict(zip(tensors, inputs), out=out, lse=lse)
            if ctx.options["score"] != "softmax":
                grad_lse = None  # lse is not defined for sigmoid scores
            slopes = saved["alibi_slopes"]
            slopes_grad = slopes is not None and ctx.needs_input_grad[slopes_index]
            args = bwd_args(grad_out=grad_out, grad_lse=grad_lse, **saved, **ctx.options, alibi_grad=slopes_grad)
            grads = dict(zip(("q", "k", "v", "alibi_slopes", "sinks"), _autograd.call(Backward, bwd, *args)))
            if saved.get("sinks") is None:
                del grads["sinks"]
            if slopes_grad:  # one row per batch element / sequence; (Hq,) slopes are shared by all
                grads["alibi_slopes"] = grads["alibi_slopes"].sum(0) if slopes.dim() == 1 else grads["alibi_slopes"]
            else:
                del grads["alibi_slopes"]
            return tuple(grads.get(name) for name in fwd_args._fields)

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(_NO_FORWARD_MODE.format(name=public_name))

    class Backward(torch.autograd.Function):
        """The backward op, whose own derivatives raise: without a Function autograd would treat
        the op as a constant, and second derivatives would silently be zero."""

        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return _autograd.forward_below_autograd(bwd, *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass  # nothing to save; defined because torch.func transforms require it

        @staticmethod
        def backward(ctx, *grads):
            raise NotImplementedError(_NO_DOUBLE_BACKWARD.format(name=public_name))

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(_NO_DOUBLE_BACKWARD.format(name=public_name))

    # Named subclasses, so that grad_fn reads f"{name}Backward" rather than "ForwardBackward".
    Forward, Backward = type(name, (Forward,), {}), type(f"{name}Backward", (Backward,), {})
    _autograd.register(fwd, Forward, public_name)
    _autograd.register(bwd, Backward, public_name)
    return Forward


_LocalAttention = attention_autograd(_FWD, _BWD, "longreach.local_attention", "_LocalAttention")
register_autocast(_FWD, 3)  # q, k, v in the autocast dtype, as SDPA (autocast.py)
