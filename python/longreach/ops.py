"""Public functional API of the fused ops, their fake (meta) kernels and autograd.

The C++ library defines separate forward and backward ops
(`torch.ops.longreach.local_attention_fwd` / `_bwd`); this module gives them
shapes for tracing (register_fake) and a derivative (register_autograd), so
`torch.compile(fullgraph=True)` sees ordinary ops in both directions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ._library import check_device_supported

Window = Tuple[Optional[int], Optional[int]]
SCORES = ("softmax", "sigmoid")


def _window_side(name: str, value) -> int:
    """Convert one side of the window to the kernels' convention (-1 = unbounded)."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"local_attention: window {name} must be a non-negative int or None, got {value!r}")
    if value < 0:
        raise ValueError(
            f"local_attention: window {name} must be >= 0 (None means unbounded), got {value}"
        )
    return value


def normalize_window(window, causal: bool) -> Tuple[int, int]:
    """(left, right) as ints with -1 for unbounded; causal forces right = 0."""
    if window is None:
        window = (None, None)
    if not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2:
        raise ValueError(f"local_attention: window must be a pair (left, right), got {window!r}")
    left = _window_side("left", window[0])
    right = 0 if causal else _window_side("right", window[1])
    return left, right


def check_same_device(q, k, v, global_mask=None, alibi_slopes=None) -> None:
    """All tensor arguments on q's device. Checked here because a "meta" tensor
    among CPU ones would route the call to the fake kernel, which returns
    uninitialised memory instead of reaching the C++ device check."""
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"local_attention: q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    for name, t in (("global_mask", global_mask), ("alibi_slopes", alibi_slopes)):
        if t is not None and t.device != q.device:
            raise ValueError(f"local_attention: {name} is on {t.device} but q is on {q.device}; expected {q.device}")


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
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("local_attention: q, k and v must be tensors")
    if q.dim() != 4:
        raise ValueError(f"local_attention: q must be a 4-D tensor (B, H, L, D), got shape {tuple(q.shape)}")
    if score not in SCORES:
        raise ValueError(f"local_attention: score must be one of {SCORES}, got {score!r}")
    if return_lse and score != "softmax":
        raise ValueError("local_attention: return_lse=True is only defined for score='softmax'")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"local_attention: dilation must be an int >= 1, got {dilation!r}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"local_attention: softcap must be a positive number or None, got {softcap!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    left, right = normalize_window(window, causal)
    check_same_device(q, k, v, global_mask, alibi_slopes)
    check_device_supported("local_attention_fwd", q)
    out, lse = torch.ops.longreach.local_attention_fwd(
        q, k, v, global_mask, alibi_slopes, left, right, dilation, score,
        None if sigmoid_bias is None else float(sigmoid_bias),
        0.0 if softcap is None else float(softcap), float(scale),
    )
    return (out, lse) if return_lse else out


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("longreach::local_attention_fwd")
def _local_attention_fwd_fake(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation,
                              score, sigmoid_bias, softcap, scale):
    check_same_device(q, k, v, global_mask, alibi_slopes)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("longreach::local_attention_bwd")
def _local_attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes, window_left,
                              window_right, dilation, score, sigmoid_bias, softcap, scale):
    check_same_device(q, k, v, global_mask, alibi_slopes)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, global_mask, alibi_slopes = inputs[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, global_mask, alibi_slopes)
    ctx.config = inputs[5:]  # window_left, window_right, dilation, score, sigmoid_bias, softcap, scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, global_mask, alibi_slopes = ctx.saved_tensors
    score = ctx.config[3]
    if score != "softmax":
        grad_lse = None  # lse is not defined for sigmoid scores
    grad_q, grad_k, grad_v = torch.ops.longreach.local_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes, *ctx.config
    )
    return (grad_q, grad_k, grad_v) + (None,) * 9


torch.library.register_autograd(
    "longreach::local_attention_fwd", _attention_backward, setup_context=_attention_setup_context
)
