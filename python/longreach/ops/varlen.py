"""Packed (variable-length) attention: many sequences in one call, in flash-attn's layout.

`torch.ops.longreach.local_attention_varlen_fwd` / `_bwd` get shapes for tracing (register_fake;
every shape follows from the inputs' shapes, none from cu_seqlens' values) and a derivative
(attention.attention_autograd), as the batched op does in attention.py.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _autograd
from .._checks import check_chunk, check_cu_seqlens, check_int, check_same_device, check_tensor, describe
from .._library import check_device_supported
from .autocast import register_autocast
from .attention import Window, _lse_dtype, attention_autograd, dropout_options, kernel_options, sink_options, sinks_grad_fake

OWNER = "local_attention_varlen"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def local_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    sink_tokens: int = 0,
    sinks: Optional[torch.Tensor] = None,
    chunk: int = 0,
    chunk_shift: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """longreach.local_attention over packed sequences (flash-attn's varlen layout and names).

    q: (total_q, Hq, D); k, v: (total_k, Hk, D) with Hq % Hk == 0. Sequence i has the query
    rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] and the keys cu_seqlens_k[i]:cu_seqlens_k[i + 1];
    cu_seqlens_* are int32 or int64 (num_seqs + 1,), 0 first, non-decreasing, the total length
    last, and max_seqlen_* bound the sequences' lengths. Every sequence is its own problem with
    local_attention's semantics: bottom-right alignment within the sequence, windows, dilation,
    ALiBi distances and the sigmoid default bias from its own lengths. ``global_mask`` is
    (total_k,) bool; ``alibi_slopes`` (Hq,) or (num_seqs, Hq) float32. A row with no allowed
    key returns zeros. Returns (total_q, Hq, D), and the row log-sum-exp (Hq, total_q) with
    return_lse=True (softmax only). chunk / chunk_shift as in local_attention, chunks counted
    from each sequence's first position.

    dropout_p: attention dropout as in local_attention (CPU and CUDA); the mask's batch index is
    the sequence and its rows and keys are indices within the sequence.

    Differentiable by reverse mode, the slopes included; second derivatives and forward mode
    raise NotImplementedError.
    """
    _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, global_mask, alibi_slopes)
    max_seqlen_q = check_int(OWNER, "max_seqlen_q", max_seqlen_q, 0)
    max_seqlen_k = check_int(OWNER, "max_seqlen_k", max_seqlen_k, 0)
    options = kernel_options(OWNER, q.shape[-1], window=window, causal=causal, dilation=dilation, score=score,
                             sigmoid_bias=sigmoid_bias, softcap=softcap, scale=scale, return_lse=return_lse)
    extra = sink_options(OWNER, q.shape[1], causal=causal, score=score, sink_tokens=sink_tokens, sinks=sinks)
    check_same_device(OWNER, q=q, sinks=sinks)
    chunks = check_chunk(OWNER, chunk, chunk_shift, q.shape[1])
    check_same_device(OWNER, q=q, chunk_shift=chunk_shift)
    check_device_supported("local_attention_varlen_fwd", q)
    out, lse = _autograd.call(_Varlen, _FWD, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              global_mask, alibi_slopes, *options, *extra, *chunks,
                              *dropout_options(OWNER, dropout_p))
    return (out, lse) if return_lse else out


def _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, global_mask, alibi_slopes) -> int:
    """What the tensors' metadata can tell (the wrapper's and the fake kernels' checks); returns
    the number of sequences."""
    for name, t, shape in (("q", q, "(total_q, Hq, D)"), ("k", k, "(total_k, Hk, D)"), ("v", v, "(total_k, Hk, D)")):
        check_tensor(OWNER, name, t)
        if t.dim() != 3:
            raise ValueError(f"{OWNER}: {name} must be a 3-D tensor {shape}, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{OWNER}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in DTYPES:
        raise TypeError(f"{OWNER}: q has dtype {q.dtype}; expected float32, float64, bfloat16 or float16")
    if k.shape != v.shape:
        raise ValueError(f"{OWNER}: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[-1] == 0 or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{OWNER}: q and k must have one head dim D >= 1, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{OWNER}: the number of query heads ({q.shape[1]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]}), which must be >= 1")
    num_seqs = check_cu_seqlens(OWNER, cu_seqlens_q, cu_seqlens_k)
    if global_mask is not None:
        expected = f"a bool tensor of shape (total_k,) = ({k.shape[0]},) or None"
        check_tensor(OWNER, "global_mask", global_mask, expected)
        if global_mask.dtype != torch.bool:
            raise TypeError(f"{OWNER}: global_mask must be {expected}, got {describe(global_mask)}")
        if global_mask.dim() != 1 or global_mask.shape[0] != k.shape[0]:
            raise ValueError(f"{OWNER}: global_mask must be {expected}, got {describe(global_mask)}")
    if alibi_slopes is not None:
        heads = q.shape[1]
        expected = f"a float32 tensor of shape (Hq,) = ({heads},) or (num_seqs, Hq) = ({num_seqs}, {heads}), or None"
        check_tensor(OWNER, "alibi_slopes", alibi_slopes, expected)
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"{OWNER}: alibi_slopes must be {expected}, got {describe(alibi_slopes)}")
        if tuple(alibi_slopes.shape) not in ((heads,), (num_seqs, heads)):
            raise ValueError(f"{OWNER}: alibi_slopes must be {expected}, got {describe(alibi_slopes)}")
    check_same_device(OWNER, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      global_mask=global_mask, alibi_slopes=alibi_slopes)
    return num_seqs


# ----------------------------------------------------------------- fake kernels --


@torch.library.register_fake("longreach::local_attention_varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask, alibi_slopes,
                     window_left, window_right, dilation, score, sigmoid_bias, softcap, scale, causal=False,
                     sink_tokens=0, sinks=None, chunk=0, chunk_shift=None, dropout_p=0.0, dropout_seed=None):
    _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, global_mask, alibi_slopes)
    check_same_device(OWNER, q=q, sinks=sinks, chunk_shift=chunk_shift)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("longreach::local_attention_varlen_bwd")
def _varlen_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     global_mask, alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias, softcap,
                     scale, alibi_grad=False, causal=False, sink_tokens=0, sinks=None, chunk=0, chunk_shift=None, dropout_p=0.0, dropout_seed=None):
    num_seqs = _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, global_mask, alibi_slopes)
    check_same_device(OWNER, q=q, sinks=sinks, chunk_shift=chunk_shift)
    # grad_alibi_slopes: (num_seqs, Hq) float32 with alibi_grad, else empty
    slopes_shape = (num_seqs, q.shape[1]) if alibi_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(slopes_shape, dtype=torch.float32), sinks_grad_fake(sinks, q))


# --------------------------------------------------------------------- autograd --

_FWD = torch.ops.longreach.local_attention_varlen_fwd.default
_BWD = torch.ops.longreach.local_attention_varlen_bwd.default
_Varlen = attention_autograd(_FWD, _BWD, "longreach.local_attention_varlen", "_LocalAttentionVarlen")
register_autocast(_FWD, 3)  # q, k, v in the autocast dtype, as SDPA (autocast.py)
