"""Decoding against a KV cache: flash-attn's `flash_attn_with_kvcache` contract on longreach's
semantics, with contiguous, rolling (ring buffer) and paged caches.

`torch.ops.longreach.local_attention_kvcache_fwd` appends the new keys into the cache in place
(its schema declares the two cache arguments mutated, so torch.compile functionalizes the
write) and attends; it is forward only. Semantics: docs/semantics.md, "KV caches".
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._checks import check_bool, check_chunk, check_int, check_same_device, check_tensor, describe
from .._library import check_device_supported
from .attention import Window, _lse_dtype, kernel_options

OWNER = "local_attention_with_kvcache"


def local_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    *,
    cache_seqlens: Union[torch.Tensor, int],
    block_table: Optional[torch.Tensor] = None,
    rolling: bool = False,
    window: Window = (None, None),
    causal: bool = False,
    dilation: int = 1,
    alibi_slopes: Optional[torch.Tensor] = None,
    score: str = "softmax",
    sigmoid_bias: Optional[float] = None,
    softcap: Optional[float] = None,
    scale: Optional[float] = None,
    sink_tokens: int = 0,
    sinks: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_lse: bool = False,
    chunk: int = 0,
    chunk_shift: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of a few new query rows over a KV cache, appending the new keys first.

    q: (B, Hq, Lq, D), Lq small (1 to decode, a few for speculative decoding or chunked
    prefill). k, v: (B, Hk, Lq, D) new keys and values or None; when given they are written into
    the cache in place at positions cache_seqlens[b] .. cache_seqlens[b] + Lq - 1 (the caller
    advances cache_seqlens afterwards, as with flash-attn). Row b then attends over its
    cache_seqlens[b] (+ Lq) keys, bottom-right aligned: query row i sits at position
    cache_seqlens[b] + i (k given) or cache_seqlens[b] - Lq + i (k None). cache_seqlens: (B,)
    torch.int32, or an int for every row.

    Cache layouts:
      - contiguous: k_cache, v_cache (B, Hk, capacity, D);
      - rolling=True: the same tensors as a ring buffer for sliding-window layers; the first
        `sink_tokens` positions keep their slots, later position j lives in slot
        sink_tokens + (j - sink_tokens) % (capacity - sink_tokens); needs a finite window and
        capacity >= sink_tokens + left * dilation + Lq. cache_seqlens counts every position
        ever written, so windows and ALiBi distances stay exact after wrap-around;
      - paged: k_cache, v_cache (num_blocks, block_size, Hk, D) with block_table
        (B, max_blocks) torch.int32: position j of row b in block block_table[b, j // block_size],
        read in place.

    Options as local_attention's (window, causal, dilation, alibi_slopes (Hq,) or (B, Hq),
    score, sigmoid_bias, softcap, scale), plus sink_tokens (the first n keys are seen by every
    row at or after them, on top of the window) and sinks ((Hq,) learnable sink logits: one
    extra term exp(sinks[h]) in each softmax row's denominator; lse includes it). num_splits
    cuts each row's keys into parts computed in parallel and merged by log-sum-exp (0: chosen
    from the problem and the thread count). chunk / chunk_shift as in local_attention: chunks of
    `chunk` positions counted from position 0 of the row's sequence (the true positions above,
    in every layout: a rolling cache's slots are not positions), offset per head by chunk_shift
    (Hq,) int; the kernel reads only the keys of a row's chunk. Returns out (B, Hq, Lq, D), and with return_lse the
    row log-sum-exp (B, Hq, Lq) float32 (float64 for float64).

    Every argument is checked (cache_seqlens and block_table read on the host: one device sync
    on CUDA) before the cache is written, so a rejected call leaves it unchanged. On CUDA:
    float16, bfloat16 and float32, head dims up to 256 (docs/cuda.md, "Decoding"). Forward only:
    inputs that require gradients with grad mode on raise NotImplementedError.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(OWNER, name, t)
    if q.dim() != 4:
        raise ValueError(f"{OWNER}: q must be a 4-D tensor (B, Hq, Lq, D), got shape {tuple(q.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{OWNER}: q must have head dim D >= 1, got shape {tuple(q.shape)}")
    options = kernel_options(OWNER, q.shape[-1], window=window, causal=causal, dilation=dilation, score=score,
                             sigmoid_bias=sigmoid_bias, softcap=softcap, scale=scale, return_lse=return_lse)
    rolling = check_bool(OWNER, "rolling", rolling)
    sink_tokens = check_int(OWNER, "sink_tokens", sink_tokens, 0)
    num_splits = check_int(OWNER, "num_splits", num_splits, 0)
    chunk, chunk_shift = check_chunk(OWNER, chunk, chunk_shift, q.shape[1])
    if (k is None) != (v is None):
        raise ValueError(f"{OWNER}: pass both k and v (the new keys and values) or neither")
    for name, t, expected in (("k", k, "a tensor (B, Hk, Lq, D) or None"), ("v", v, "a tensor (B, Hk, Lq, D) or None"),
                              ("block_table", block_table, "a torch.int32 tensor (B, max_blocks) or None"),
                              ("alibi_slopes", alibi_slopes, "a float32 tensor of shape (Hq,) or (B, Hq), or None"),
                              ("sinks", sinks, "a floating-point tensor of shape (Hq,) or None")):
        if t is not None:
            check_tensor(OWNER, name, t, expected)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        check_int(OWNER, "cache_seqlens", cache_seqlens, 0)
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    check_tensor(OWNER, "cache_seqlens", cache_seqlens, "a torch.int32 tensor of shape (B,) or an int")
    check_same_device(OWNER, q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                      block_table=block_table, alibi_slopes=alibi_slopes, sinks=sinks, chunk_shift=chunk_shift)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, alibi_slopes, sinks)):
        raise NotImplementedError(
            f"{OWNER} is forward only (decoding); call it under torch.no_grad() or torch.inference_mode(), or train "
            f"with local_attention / local_attention_varlen, got inputs that require gradients")
    # CPU, and CUDA in a CUDA build (csrc/cuda/kvcache_cuda.cpp); elsewhere the rebuild hint.
    check_device_supported("local_attention_kvcache_fwd", q)
    left, right, dilation, score, sigmoid_bias, softcap, scale = options
    out, lse = torch.ops.longreach.local_attention_kvcache_fwd(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks, left, right, dilation, score,
        sigmoid_bias, softcap, scale, sink_tokens, rolling, num_splits, chunk, chunk_shift)
    return (out, lse) if return_lse else out


def rolling_cache_capacity(window_left: int, new_tokens: int = 1, dilation: int = 1, sink_tokens: int = 0) -> int:
    """Slots a rolling cache needs so that `new_tokens` rows at a time see their whole window:
    sink_tokens + window_left * dilation + new_tokens."""
    for name, value, minimum in (("window_left", window_left, 0), ("new_tokens", new_tokens, 1),
                                 ("dilation", dilation, 1), ("sink_tokens", sink_tokens, 0)):
        check_int("rolling_cache_capacity", name, value, minimum)
    return sink_tokens + window_left * dilation + new_tokens


@torch.library.register_fake("longreach::local_attention_kvcache_fwd")
def _kvcache_fwd_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks, window_left,
                      window_right, dilation, score, sigmoid_bias, softcap, scale, sink_tokens, rolling, num_splits,
                      chunk=0, chunk_shift=None):
    check_same_device(OWNER, q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                      block_table=block_table, alibi_slopes=alibi_slopes, sinks=sinks, chunk_shift=chunk_shift)
    if q.dim() != 4:
        raise ValueError(f"{OWNER}: q must be a 4-D tensor (B, Hq, Lq, D), got {describe(q)}")
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
