"""flash-attn 2's Python interface on longreach's kernels: code written for flash-attn runs on CPU
(and on longreach's CUDA kernels) by changing one import::

    from longreach.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

The functions take flash-attn 2's arguments by the same names, order and defaults, in its layouts
(q (B, Lq, H, D), k and v (B, Lk, Hk, D); varlen (total, H, D) with cu_seqlens), and compute what
flash-attn computes, corner cases included (docs/flash_attn.md):

- ``window_size=(left, right)``, a negative side meaning unbounded, is first processed as
  flash-attn's C++ front end does: a side >= seqlen_k (max_seqlen_k for varlen) becomes -1;
  ``causal=True`` sets right = 0; then, if only one side is negative, the negative side becomes
  seqlen_k. So ``(l, -1)`` means right = seqlen_k, which still cuts rows off when Lq > Lk + 1
  (row i sees keys j <= i + 2 * Lk - Lq), and ``(-1, r)`` with r >= seqlen_k is no window at all.
- Query row i sits at key position i + Lk - Lq (bottom-right alignment), scores are
  ``softmax_scale * q.k``, soft-capped (``softcap > 0``; 0 or less is off), minus
  ``slope * |i + Lk - Lq - j|`` (``alibi_slopes`` (H,) or (B, H) float32).
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: softmax_lse is flash-attn's
  (B, H, Lq) (varlen: (H, total_q)), float32 (float64 for float64 inputs, which flash-attn does
  not take), +inf for a row without keys, and, where flash-attn's causal kernel adds
  ``slope * j`` instead of ``-slope * |p - j|`` (a left-unbounded window with right = 0 and
  ALiBi), shifted by ``slope * p`` as flash-attn's is. S_dmask is None (flash-attn returns it
  only with dropout; longreach never builds the (Lq, Lk) mask).
- ``attention_chunk=c`` (flash-attn 3's, the last argument here): rows see only the keys of the
  chunk of c key positions their position lies in, counted from key 0 (per sequence), intersected
  with the window; the op's ``chunk``. Differentiable (flash-attn 3's backward is not).
- ``dropout_p > 0`` is the op's attention dropout (CPU and CUDA kernels): weights after the softmax
  zeroed with probability p, the kept ones scaled by 1 / (1 - p), the mask from a Philox RNG
  seeded by torch's default generator (longreach.dropout), not bit-equal to flash-attn's.

What cannot be honoured raises: ``block_table`` in the varlen function (paged caches are read by ``flash_attn_with_kvcache``). ``deterministic`` is accepted and has no effect: longreach's
backward is always deterministic. Unlike flash-attn, float32 and float64 inputs and any head
dim work, and softmax_lse is differentiable (flash-attn drops its gradient). The ALiBi slopes get
no gradient, as in flash-attn. ``flash_attn_with_kvcache`` runs on longreach.local_attention_with_kvcache
(contiguous and paged caches, in-place append, split-KV; no rotary inside the call).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ._checks import check_bool, check_int, check_tensor, describe
from .ops import local_attention, local_attention_varlen

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]

Window = Tuple[Optional[int], Optional[int]]


def _window_size(owner: str, window_size) -> Tuple[int, int]:
    if (not isinstance(window_size, Sequence) or isinstance(window_size, str) or len(window_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) for s in window_size)):
        raise TypeError(f"{owner}: window_size must be a pair of ints (left, right), -1 meaning unbounded, "
                        f"got {describe(window_size, typed=True)}")
    return int(window_size[0]), int(window_size[1])


def flash_window(window_size: Tuple[int, int], causal: bool, seqlen_q: int, seqlen_k: int,
                 has_alibi: bool) -> Tuple[Window, bool]:
    """flash-attn's processing of (window_size, causal) for a problem of seqlen_q rows and
    seqlen_k keys (varlen: max_seqlen_q, max_seqlen_k), as longreach's window (None = unbounded);
    and whether flash-attn runs its causal kernel (left unbounded, right 0), whose ALiBi bias is
    shifted by a row constant (see flash_lse)."""
    left, right = window_size
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if seqlen_q == 1 and not has_alibi:
        causal = False  # the single row sits at the last position: causal changes nothing
    if causal:
        right = 0
    causal_kernel = left < 0 and right == 0
    if left < 0 and right < 0:
        return (None, None), causal_kernel
    # One side bounded: flash-attn sets the other to seqlen_k. On the left that never cuts a key
    # (row i's window then starts at i - seqlen_q < 0); on the right it does when Lq > Lk + 1.
    return (None if left < 0 else left, seqlen_k if right < 0 else right), causal_kernel


def _attention_chunk(owner: str, attention_chunk) -> int:
    """flash-attn 3's attention_chunk: an int >= 0, 0 = off; the op's chunk (the same grid: chunks of
    that many key positions from key 0, each row in the chunk of its bottom-right position, intersected
    with the window)."""
    return check_int(owner, "attention_chunk", attention_chunk, 0)


def _options(owner: str, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
             return_attn_probs):
    """The flash-attn options checked; returns (window_size, causal, softcap or None, slopes, dropout_p)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{owner}: dropout_p must be a number in [0, 1), got {describe(dropout_p, typed=True)}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"{owner}: dropout_p must be a number in [0, 1), got {dropout_p}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{owner}: softcap must be a number (0.0 or less means off), "
                        f"got {describe(softcap, typed=True)}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise (ValueError if isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
               else TypeError)(f"{owner}: softmax_scale must be a finite number or None (None means "
                               f"1 / sqrt(head dim)), got {describe(softmax_scale, typed=True)}")
    causal = check_bool(owner, "causal", causal)
    check_bool(owner, "deterministic", deterministic)  # no effect: the backward is always deterministic
    check_bool(owner, "return_attn_probs", return_attn_probs)
    window = _window_size(owner, window_size)
    if alibi_slopes is not None:
        check_tensor(owner, "alibi_slopes", alibi_slopes, "a float32 tensor of shape (H,) or (B, H), or None")
        alibi_slopes = alibi_slopes.detach()  # flash-attn gives the slopes no gradient
    return window, causal, (float(softcap) if softcap > 0 else None), alibi_slopes, float(dropout_p)


def flash_lse(lse: torch.Tensor, slopes_at_rows: Optional[torch.Tensor], positions: Optional[torch.Tensor]):
    """longreach's lse as flash-attn returns it: +inf for rows without keys (flash-attn's
    kernels write +inf where the row sum is 0), and, when `slopes_at_rows` is given (flash-attn's
    causal kernel with ALiBi, which adds slope * j rather than -slope * (p - j)), plus
    slope * p for the row at key position p."""
    if slopes_at_rows is not None:
        lse = lse + slopes_at_rows * positions.to(lse.dtype)
    return torch.where(lse == -math.inf, math.inf, lse)


def _check_dense(owner: str, **tensors) -> None:
    for name, t in tensors.items():
        check_tensor(owner, name, t)
        layout = "(B, Lq, H, D)" if name == "q" else "(B, Lk, Hk, D)"
        if t.dim() != 4:
            raise ValueError(f"{owner}: {name} must be a 4-D tensor {layout} (flash-attn's layout), "
                             f"got shape {tuple(t.shape)}")
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{owner}: k and v must have the shape (B, Lk, Hk, D) with q's B and D, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _dense(owner, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, attention_chunk=0):
    _check_dense(owner, q=q, k=k, v=v)
    chunk = _attention_chunk(owner, attention_chunk)
    window_size, causal, softcap, slopes, dropout_p = _options(owner, dropout_p, softmax_scale, causal, window_size, softcap,
                                                    alibi_slopes, deterministic, return_attn_probs)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    window, causal_kernel = flash_window(window_size, causal, seqlen_q, seqlen_k, slopes is not None)
    # (B, L, H, D) -> (B, H, L, D) views; the op takes strided inputs.
    out, lse = local_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=window,
                               alibi_slopes=slopes, softcap=softcap, scale=softmax_scale, return_lse=True,
                               dropout_p=dropout_p, chunk=chunk)
    out = out.transpose(1, 2).contiguous()  # flash-attn returns a contiguous (B, Lq, H, D)
    if not return_attn_probs:
        return out
    shifted = slopes is not None and causal_kernel
    positions = torch.arange(seqlen_k - seqlen_q, seqlen_k, device=lse.device) if shifted else None
    slopes_at_rows = None
    if shifted:  # (H,) or (B, H) -> broadcast over lse (B, H, Lq)
        slopes_at_rows = slopes[..., None] if slopes.dim() == 2 else slopes[None, :, None]
    return out, flash_lse(lse, slopes_at_rows, positions), None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, attention_chunk=0):
    """flash-attn's ``flash_attn_func``: q (B, Lq, H, D), k and v (B, Lk, Hk, D) with H % Hk == 0
    (GQA/MQA: query head h reads kv head h // (H // Hk)). Returns out (B, Lq, H, D), or
    (out, softmax_lse (B, H, Lq), None) with return_attn_probs=True. The module docstring gives
    the window, ALiBi, softcap and lse conventions (flash-attn's); dropout_p > 0 is longreach's
    attention dropout (CPU)."""
    return _dense("flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, attention_chunk)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, attention_chunk=0):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv (B, L, 3, H, D); otherwise flash_attn_func."""
    owner = "flash_attn_qkvpacked_func"
    _check_packed(owner, "qkv", qkv, 5, 3, "(B, L, 3, H, D)")
    q, k, v = qkv.unbind(2)
    return _dense(owner, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, attention_chunk)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, attention_chunk=0):
    """flash-attn's ``flash_attn_kvpacked_func``: q (B, Lq, H, D), kv (B, Lk, 2, Hk, D); otherwise
    flash_attn_func."""
    owner = "flash_attn_kvpacked_func"
    _check_packed(owner, "kv", kv, 5, 2, "(B, Lk, 2, Hk, D)")
    k, v = kv.unbind(2)
    return _dense(owner, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, attention_chunk)


def _check_packed(owner: str, name: str, t, dim: int, count: int, layout: str) -> None:
    check_tensor(owner, name, t)
    if t.dim() != dim or t.shape[dim - 3] != count:
        raise ValueError(f"{owner}: {name} must be a {dim}-D tensor {layout}, got shape {tuple(t.shape)}")


# ------------------------------------------------------------------------- varlen --


def _row_positions(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int):
    """For each packed query row t: its sequence s and key position p = (t - cu_q[s]) + Lk_s - Lq_s,
    from tensor ops only (no host sync, fixed shapes under torch.compile)."""
    rows = torch.arange(total_q, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    seq = torch.searchsorted(cu_seqlens_q[1:], rows, right=True)
    seq = seq.clamp(max=cu_seqlens_q.shape[0] - 2)  # stays in range even for malformed totals
    positions = rows - cu_seqlens_q[seq + 1] + (cu_seqlens_k[seq + 1] - cu_seqlens_k[seq]).to(rows.dtype)
    return seq, positions


def _varlen(owner, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
            causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None,
            attention_chunk=0):
    if block_table is not None:
        raise NotImplementedError(f"{owner}: block_table (a paged KV cache) is not supported; pass the keys "
                                  f"packed as k, v (total_k, Hk, D)")
    chunk = _attention_chunk(owner, attention_chunk)
    window_size, causal, softcap, slopes, dropout_p = _options(owner, dropout_p, softmax_scale, causal, window_size, softcap,
                                                    alibi_slopes, deterministic, return_attn_probs)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int):  # the op checks the range
            raise TypeError(f"{owner}: {name} must be an int >= 0, got {describe(value)}")
    window, causal_kernel = flash_window(window_size, causal, max_seqlen_q, max_seqlen_k, slopes is not None)
    out, lse = local_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      window=window, alibi_slopes=slopes, softcap=softcap, scale=softmax_scale,
                                      return_lse=True, dropout_p=dropout_p, chunk=chunk)
    if not return_attn_probs:
        return out
    slopes_at_rows = positions = None
    if slopes is not None and causal_kernel:  # lse is (H, total_q)
        seq, positions = _row_positions(cu_seqlens_q, cu_seqlens_k, q.shape[0])
        slopes_at_rows = slopes[:, None] if slopes.dim() == 1 else slopes[seq].t()
    return out, flash_lse(lse, slopes_at_rows, positions), None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, attention_chunk=0):
    """flash-attn's ``flash_attn_varlen_func``: q (total_q, H, D), k and v (total_k, Hk, D),
    cu_seqlens_* (B + 1,) int32 (int64 works too), max_seqlen_* the longest sequences. Each
    sequence is its own problem (bottom-right aligned); window_size is processed against
    max_seqlen_k, as flash-attn does. Returns out (total_q, H, D), or (out, softmax_lse
    (H, total_q), None). ``alibi_slopes`` (H,) or (B, H). ``block_table`` raises
    NotImplementedError."""
    return _varlen("flash_attn_varlen_func", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, block_table, attention_chunk)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, attention_chunk=0):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, H, D), one cu_seqlens and
    max_seqlen for queries and keys; otherwise flash_attn_varlen_func."""
    owner = "flash_attn_varlen_qkvpacked_func"
    _check_packed(owner, "qkv", qkv, 4, 3, "(total, 3, H, D)")
    q, k, v = qkv.unbind(1)
    return _varlen(owner, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   attention_chunk=attention_chunk)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                    attention_chunk=0):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (total_q, H, D), kv (total_k, 2, Hk, D);
    otherwise flash_attn_varlen_func."""
    owner = "flash_attn_varlen_kvpacked_func"
    _check_packed(owner, "kv", kv, 4, 2, "(total_k, 2, Hk, D)")
    k, v = kv.unbind(1)
    return _varlen(owner, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   attention_chunk=attention_chunk)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            attention_chunk=0):
    """flash-attn's ``flash_attn_with_kvcache`` on longreach.local_attention_with_kvcache: q
    (B, Lq, H, D); k_cache, v_cache (B, capacity, Hk, D), or paged (num_blocks, block_size, Hk, D)
    with block_table (B, max_blocks) int32; k, v (B, Lq, Hk, D) new keys appended in place at
    cache_seqlens (int or (B,) int32; None: the whole cache). The window is processed as
    flash-attn's front end does against the cache's capacity (module docstring). Returns out
    (B, Lq, H, D), or (out, softmax_lse (B, H, Lq)) with return_softmax_lse=True. Rotary
    embedding inside the call (rotary_cos/rotary_sin), cache_batch_idx and cache_leftpad raise
    NotImplementedError: apply longreach.apply_rotary before the call, index the cache yourself."""
    from .ops import local_attention_with_kvcache

    owner = "flash_attn_with_kvcache"
    for name, value, instead in (("rotary_cos", rotary_cos, "apply longreach.apply_rotary to q and k first"),
                                 ("rotary_sin", rotary_sin, "apply longreach.apply_rotary to q and k first"),
                                 ("cache_batch_idx", cache_batch_idx, "index the caches before the call"),
                                 ("cache_leftpad", cache_leftpad, "store each row's keys from slot 0")):
        if value is not None:
            raise NotImplementedError(f"{owner}: {name} is not supported; {instead}")
    check_bool(owner, "rotary_interleaved", rotary_interleaved)
    chunk = _attention_chunk(owner, attention_chunk)  # chunks from key 0, as the decode op counts them
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(owner, name, t)
        if t.dim() != 4:
            raise ValueError(f"{owner}: {name} must be a 4-D tensor (flash-attn's layout), got shape {tuple(t.shape)}")
    window_size, causal, softcap, slopes, dropout_p = _options(owner, 0.0, softmax_scale, causal, window_size, softcap,
                                                    alibi_slopes, False, return_softmax_lse)
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged and block_table.dim() == 2 else k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = capacity - (0 if k is None else q.shape[1])
    window, causal_kernel = flash_window(window_size, causal, q.shape[1], capacity, slopes is not None)
    # Contiguous caches are (B, capacity, Hk, D) here and (B, Hk, capacity, D) in longreach: a view.
    kc = k_cache if paged else k_cache.transpose(1, 2)
    vc = v_cache if paged else v_cache.transpose(1, 2)
    new_k = None if k is None else k.transpose(1, 2)
    new_v = None if v is None else v.transpose(1, 2)
    out, lse = local_attention_with_kvcache(q.transpose(1, 2), kc, vc, new_k, new_v, cache_seqlens=cache_seqlens,
                                            block_table=block_table, window=window, alibi_slopes=slopes,
                                            softcap=softcap, scale=softmax_scale, num_splits=num_splits,
                                            chunk=chunk, return_lse=True)
    out = out.transpose(1, 2).contiguous()
    if not return_softmax_lse:
        return out
    slopes_at_rows = positions = None
    if slopes is not None and causal_kernel:  # flash-attn's causal ALiBi lse shift (flash_lse)
        lens = torch.as_tensor(cache_seqlens, device=q.device).reshape(-1).expand(q.shape[0]).long()
        total = lens + (0 if k is None else q.shape[1])
        positions = (total[:, None] - q.shape[1] + torch.arange(q.shape[1], device=q.device))[:, None, :]
        slopes_at_rows = slopes[..., None] if slopes.dim() == 2 else slopes[None, :, None]
    return out, flash_lse(lse, slopes_at_rows, positions)
