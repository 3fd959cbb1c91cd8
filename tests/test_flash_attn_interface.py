"""longreach.flash_attn_interface: flash-attn 2's functions on longreach's ops (issue 16).

The oracle, `flash_reference`, is written out here from flash-attn's documented semantics and
its own reference (tests/test_flash_attn.py: attention_ref, construct_local_mask,
attn_bias_from_alibi_slopes) with its C++ front end's window processing (flash_api.cpp: a side
>= seqlen_k becomes -1, causal sets right = 0, a single unbounded side becomes seqlen_k), as a
dense float64 computation in flash-attn's (B, L, H, D) layout. It shares no code with the
interface. Where the two could agree by sharing a mistake, the corner cases are also checked
against masks written by hand (test_window_corners_by_hand), read off the output with uniform
scores and one-hot values.

Covered: causal, windows including (l, -1) with Lq > Lk + 1 and Lq < Lk and (-1, r) with
r >= Lk, GQA/MQA, ALiBi (H,) and (B, H) (flash-attn's lse shift in its causal kernel), softcap,
softmax_scale, the lse layout, dtype and +inf rows, varlen (windows processed against
max_seqlen_k) and the packed variants, gradients of q, k, v (float64 against the oracle's),
torch.compile(fullgraph=True), the signatures, dropout_p, and what raises (block_table,
bad arguments).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import longreach
from longreach import flash_attn_interface as fa


def flash_reference(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    softmax_scale=None, rules_seqlen_q=None, rules_seqlen_k=None, attention_chunk=0):
    """flash-attn's result (out, lse) for q (B, Lq, H, D), k, v (B, Lk, Hk, D), in float64.

    rules_seqlen_*: the lengths flash-attn's front end processes the window against (varlen:
    max_seqlen_q / max_seqlen_k); the mask itself is aligned to the actual lengths."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    rules_q = seqlen_q if rules_seqlen_q is None else rules_seqlen_q
    rules_k = seqlen_k if rules_seqlen_k is None else rules_seqlen_k
    k = k.repeat_interleave(heads // heads_k, dim=2)
    v = v.repeat_interleave(heads // heads_k, dim=2)
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    # flash_api.cpp: mha_fwd / mha_varlen_fwd, then set_params_fprop
    left, right = window_size
    if left >= rules_k:
        left = -1
    if right >= rules_k:
        right = -1
    if causal and not (rules_q == 1 and alibi_slopes is None):
        right = 0
    causal_kernel = left < 0 and right == 0
    row = torch.arange(seqlen_q)[:, None]
    col = torch.arange(seqlen_k)[None, :]
    masked = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0 or right >= 0:
        if left < 0:
            left = rules_k
        if right < 0:
            right = rules_k
        # construct_local_mask / mask.h: keep col in [row + sk - sq - left, row + sk - sq + right]
        masked = (col > row + seqlen_k - seqlen_q + right) | (col < row + seqlen_k - seqlen_q - left)
    if attention_chunk > 0:
        # flash-attn 3's construct_chunk_mask (hopper/test_util.py): keep col in the chunk of the
        # row's position p, [p - p % c, p - p % c + c), chunks counted from key 0
        position = row + seqlen_k - seqlen_q
        start = position - position % attention_chunk
        masked = masked | (col < start) | (col >= start + attention_chunk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.double()
        slopes = (slopes[None] if slopes.dim() == 1 else slopes).expand(batch, heads)[:, :, None, None]
        scores = scores - slopes * (row + seqlen_k - seqlen_q - col).abs()
    scores = scores.masked_fill(masked, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys: zeros
    out = torch.einsum("bhts,bshd->bthd", probs, v)
    if alibi_slopes is not None and causal_kernel:
        # flash-attn's causal kernel adds slope * col instead of -slope * |p - col|: the same
        # probabilities, an lse larger by slope * p
        lse = lse + slopes[..., 0] * (torch.arange(seqlen_q) + seqlen_k - seqlen_q)
    lse = torch.where(lse == -math.inf, math.inf, lse)  # flash-attn writes +inf for empty rows
    return out, lse


def _qkv(batch, seqlen_q, seqlen_k, heads, heads_k, dim, dtype=torch.float64, device="cpu", grad=False):
    make = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, requires_grad=grad)  # noqa: E731
    return make(batch, seqlen_q, heads, dim), make(batch, seqlen_k, heads_k, dim), make(batch, seqlen_k, heads_k, dim)


def _close(actual, expected, tol=1e-10):
    assert actual.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)) and torch.equal(actual[~finite], expected[~finite].to(actual))
    torch.testing.assert_close(actual[finite].double(), expected[finite], rtol=tol, atol=tol)


CASES = [
    # (seqlen_q, seqlen_k, heads, heads_k, causal, window_size)
    (9, 9, 2, 2, False, (-1, -1)),
    (9, 9, 2, 2, True, (-1, -1)),
    (7, 12, 4, 2, True, (-1, -1)),   # Lq < Lk, GQA
    (12, 5, 2, 1, True, (-1, -1)),   # Lq > Lk: the first rows have no keys, MQA
    (11, 11, 2, 2, False, (3, 2)),
    (11, 11, 2, 2, True, (3, 5)),    # causal wins over right
    (12, 4, 2, 2, False, (1, -1)),   # (l, -1) with Lq > Lk + 1: right = Lk cuts the first rows
    (6, 13, 2, 2, False, (2, -1)),   # (l, -1) with Lq < Lk
    (10, 3, 2, 2, False, (-1, 1)),   # left unbounded, right bounded, Lq > Lk
    (10, 3, 2, 2, False, (-1, 3)),   # right >= Lk: no window at all
    (10, 3, 2, 2, False, (5, 0)),    # left >= Lk: becomes unbounded -> causal kernel
    (1, 8, 2, 2, True, (2, -1)),     # one row: flash-attn drops causal
    (5, 0, 2, 2, False, (-1, -1)),   # no keys: zeros, lse +inf
]


@pytest.mark.parametrize("alibi", [None, "h", "bh"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}-{c[3]}c{int(c[4])}w{c[5][0]}_{c[5][1]}")
def test_matches_flash_reference(case, alibi):
    seqlen_q, seqlen_k, heads, heads_k, causal, window_size = case
    batch = 2
    q, k, v = _qkv(batch, seqlen_q, seqlen_k, heads, heads_k, 8)
    slopes = None if alibi is None else torch.rand(heads if alibi == "h" else (batch, heads)) * 0.5
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size, alibi_slopes=slopes,
                                           return_attn_probs=True)
    expected_out, expected_lse = flash_reference(q, k, v, causal, window_size, alibi_slopes=slopes)
    assert out.shape == (batch, seqlen_q, heads, 8) and out.is_contiguous()
    assert lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float64
    assert s_dmask is None
    _close(out, expected_out)
    _close(lse, expected_lse)
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size, alibi_slopes=slopes), out)


def _allowed(seqlen_q, seqlen_k, **kwargs):
    """Which keys each row sees, read off the output: zero scores, one-hot values."""
    q = torch.zeros(1, seqlen_q, 1, seqlen_k, dtype=torch.float64)
    k = torch.zeros(1, seqlen_k, 1, seqlen_k, dtype=torch.float64)
    v = torch.eye(seqlen_k, dtype=torch.float64)[None, :, None, :]
    return (fa.flash_attn_func(q, k, v, **kwargs)[0, :, 0] > 0).int().tolist()


def test_window_corners_by_hand():
    # (l, -1) means right = seqlen_k: with Lq = 5 > Lk + 1 = 3, row i (position i - 3) sees
    # keys i - 3 - 0 <= j <= i - 3 + 2, so row 0 sees none and row 4 only key 1
    assert _allowed(5, 2, window_size=(0, -1)) == [[0, 0], [1, 0], [1, 1], [1, 1], [0, 1]]
    # (-1, r) with r < Lk: right bound only (row i at position i - 4 sees j <= i - 3)
    assert _allowed(6, 2, window_size=(-1, 1)) == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1], [1, 1]]
    # (-1, r) with r >= Lk is -1: no window, every row sees every key
    assert _allowed(6, 2, window_size=(-1, 2)) == [[1, 1]] * 6
    # causal, bottom-right aligned (flash-attn's docstring example, Lq = 5, Lk = 2)
    assert _allowed(5, 2, causal=True) == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert _allowed(2, 5, causal=True) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # flash-attn's README: row i sees [i + Lk - Lq - left, i + Lk - Lq + right]
    assert _allowed(4, 4, window_size=(1, 0)) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_softcap_scale_and_gqa():
    q, k, v = _qkv(2, 10, 14, 6, 2, 16)
    q = q * 4  # large scores, so the cap matters
    for softcap in (0.0, -1.0, 2.5):  # 0 or less: off
        out, lse, _ = fa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(4, -1),
                                         softcap=softcap, return_attn_probs=True)
        expected_out, expected_lse = flash_reference(q, k, v, True, (4, -1), softcap, softmax_scale=0.3)
        _close(out, expected_out)
        _close(lse, expected_lse)


def test_gradients_match_flash_reference():
    q, k, v = _qkv(2, 9, 6, 4, 2, 8, grad=True)
    slopes = torch.rand(2, 4, requires_grad=True)
    kwargs = dict(causal=False, window_size=(2, -1), softcap=3.0, alibi_slopes=slopes)
    out = fa.flash_attn_func(q, k, v, **kwargs)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), upstream)
    expected_out, _ = flash_reference(q, k, v, **kwargs)
    expected = torch.autograd.grad(expected_out, (q, k, v), upstream)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    fa.flash_attn_func(q, k, v, **kwargs).sum().backward()
    assert slopes.grad is None and q.grad is not None  # flash-attn gives the slopes no gradient
    qkv = torch.randn(2, 7, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: fa.flash_attn_qkvpacked_func(t, causal=True, window_size=(3, 0)), (qkv,))


def test_packed_variants_match_flash_attn_func():
    qkv = torch.randn(2, 9, 3, 4, 8, dtype=torch.float64)
    kwargs = dict(causal=True, window_size=(3, -1), softcap=5.0, alibi_slopes=torch.rand(4),
                  return_attn_probs=True)
    expected = fa.flash_attn_func(*qkv.unbind(2), **kwargs)
    got = fa.flash_attn_qkvpacked_func(qkv, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))
    q = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    kv = torch.randn(2, 9, 2, 2, 8, dtype=torch.float64)
    expected = fa.flash_attn_func(q, *kv.unbind(2), **kwargs)
    got = fa.flash_attn_kvpacked_func(q, kv, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], expected[:2]))


# ------------------------------------------------------------------------- varlen --

# (Lq_i, Lk_i) per sequence: Lq > Lk + 1 (where right = max_seqlen_k, not Lk_i, matters),
# Lq < Lk, equal, an empty sequence and one with queries but no keys
SEQS = [(7, 2), (3, 6), (5, 5), (0, 0), (2, 0), (1, 4)]


def _pack(heads, heads_k, dim, grad=False):
    lens_q = [a for a, _ in SEQS]
    lens_k = [b for _, b in SEQS]
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    q, k, v = make(sum(lens_q), heads, dim), make(sum(lens_k), heads_k, dim), make(sum(lens_k), heads_k, dim)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=None, **kwargs):
    outs, lses = [], []
    for s in range(len(SEQS)):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[s])
        out, lse = flash_reference(q[None, rows], k[None, keys], v[None, keys], alibi_slopes=slopes,
                                   rules_seqlen_q=max_q, rules_seqlen_k=max_k, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("alibi", [None, "h", "bh"])
@pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (1, -1)),
                                                (False, (2, 1)), (True, (2, -1)), (False, (-1, 2)),
                                                (False, (-1, 6))])
def test_varlen_matches_flash_reference(causal, window_size, alibi):
    q, k, v, cu_q, cu_k, max_q, max_k = _pack(4, 2, 8)
    slopes = None if alibi is None else torch.rand(4 if alibi == "h" else (len(SEQS), 4))
    out, lse, s_dmask = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                                  window_size=window_size, softcap=4.0, alibi_slopes=slopes,
                                                  return_attn_probs=True)
    expected_out, expected_lse = _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                                   window_size=window_size, softcap=4.0, alibi_slopes=slopes)
    assert lse.shape == (4, q.shape[0]) and s_dmask is None
    _close(out, expected_out)
    _close(lse, expected_lse)


def test_varlen_right_is_max_seqlen_k():
    # the first sequence (Lq 7, Lk 2) with (1, -1): right = max_seqlen_k = 6, so its first row
    # (position -5) sees key j <= 1, where right = Lk = 2 alone would give it no key
    q, k, v, cu_q, cu_k, max_q, max_k = _pack(1, 1, 4)
    packed = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(1, -1))
    alone = fa.flash_attn_func(q[None, :7], k[None, :2], v[None, :2], window_size=(1, -1))
    assert alone[0, 0].abs().max() == 0 and packed[0].abs().max() > 0


def test_varlen_gradients_and_packed_variants():
    q, k, v, cu_q, cu_k, max_q, max_k = _pack(4, 2, 8, grad=True)
    kwargs = dict(causal=True, window_size=(2, -1))
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    upstream = torch.randn_like(out)
    expected_out, _ = _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    for g, e in zip(torch.autograd.grad(out, (q, k, v), upstream),
                    torch.autograd.grad(expected_out, (q, k, v), upstream)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        kv = torch.stack((k, v), dim=1)
        got = fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max_q, max_k, **kwargs)
        assert torch.equal(got, out)
        qkv = torch.randn(10, 3, 4, 8, dtype=torch.float64)
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        got = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, **kwargs)
        expected = fa.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 7, 7, **kwargs)
        assert torch.equal(got, expected)


# ---------------------------------------------------------------- dtypes, compile --


def test_bfloat16_and_float32():
    q, k, v = _qkv(2, 16, 16, 4, 2, 32, dtype=torch.float32)
    expected, expected_lse = flash_reference(q, k, v, True, (5, -1))
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, window_size=(5, -1), return_attn_probs=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out = fa.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, window_size=(5, -1))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


def test_compiles_fullgraph():
    q, k, v = _qkv(1, 8, 8, 2, 1, 8, dtype=torch.float32, grad=True)
    slopes = torch.rand(2)

    def f(q, k, v):
        out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, window_size=(3, -1), alibi_slopes=slopes,
                                         return_attn_probs=True)
        return out, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    eager_out, eager_lse = f(q, k, v)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(lse, eager_lse)
    (grad_c,) = torch.autograd.grad(out.sum(), q)
    (grad_e,) = torch.autograd.grad(eager_out.sum(), q)
    torch.testing.assert_close(grad_c, grad_e)


# ------------------------------------------------------------------ kv cache --

@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal, window_size, alibi, chunk", [
    (True, (-1, -1), False, 0), (True, (5, -1), True, 0), (False, (4, -1), False, 0), (True, (-1, -1), True, 0),
    (True, (-1, -1), False, 5), (True, (3, -1), True, 4), (False, (4, -1), False, 6)])
def test_with_kvcache_decodes_as_flash_attn(paged, causal, window_size, alibi, chunk):
    torch.manual_seed(0)
    B, H, Hk, D, capacity, block = 2, 4, 2, 8, 32, 8
    if paged:
        k_cache = torch.zeros(10, block, Hk, D, dtype=torch.float64)
        block_table = torch.randperm(10)[:B * capacity // block].view(B, -1).to(torch.int32)
    else:
        k_cache = torch.zeros(B, capacity, Hk, D, dtype=torch.float64)
        block_table = None
    v_cache = torch.zeros_like(k_cache)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if alibi else None
    history_k, history_v = [torch.zeros(1, 0, Hk, D).double()] * B, [torch.zeros(1, 0, Hk, D).double()] * B
    seqlens = torch.tensor([0, 3], dtype=torch.int32)
    for b in range(B):  # row 1 starts with 3 keys written by hand
        pre_k, pre_v = torch.randn(1, 3, Hk, D).double(), torch.randn(1, 3, Hk, D).double()
        if b == 1:
            for j in range(3):
                if paged:
                    k_cache[block_table[1, 0], j], v_cache[block_table[1, 0], j] = pre_k[0, j], pre_v[0, j]
                else:
                    k_cache[1, j], v_cache[1, j] = pre_k[0, j], pre_v[0, j]
            history_k[1], history_v[1] = pre_k, pre_v
    for step in range(12):
        lq = 1 if step % 3 else 2
        q = torch.randn(B, lq, H, D).double()
        k, v = torch.randn(B, lq, Hk, D).double(), torch.randn(B, lq, Hk, D).double()
        out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                              block_table=block_table, causal=causal, window_size=window_size,
                                              alibi_slopes=slopes, return_softmax_lse=True, attention_chunk=chunk)
        for b in range(B):
            history_k[b] = torch.cat([history_k[b], k[b:b + 1]], 1)
            history_v[b] = torch.cat([history_v[b], v[b:b + 1]], 1)
            ref, ref_lse = flash_reference(q[b:b + 1], history_k[b], history_v[b], causal=causal,
                                           window_size=window_size, alibi_slopes=slopes, rules_seqlen_k=capacity,
                                           attention_chunk=chunk)
            _close(out[b:b + 1], ref)
            _close(lse[b:b + 1], ref_lse)
        seqlens += lq


def test_with_kvcache_rejects_what_it_cannot_do():
    q, cache = torch.randn(1, 1, 2, 8), torch.zeros(1, 4, 2, 8)
    for name in ("rotary_cos", "cache_batch_idx", "cache_leftpad"):
        with pytest.raises(NotImplementedError, match=name):
            fa.flash_attn_with_kvcache(q, cache, cache.clone(), cache_seqlens=1, **{name: torch.zeros(1)})


# ----------------------------------------------------------- signatures, errors --

COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
          ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
REQUIRED = inspect.Parameter.empty
SIGNATURES = {  # flash-attn 2's flash_attn_interface.py
    "flash_attn_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED)] + COMMON,
    "flash_attn_qkvpacked_func": [("qkv", REQUIRED)] + COMMON,
    "flash_attn_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED)] + COMMON,
    "flash_attn_varlen_func": [(n, REQUIRED) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                       "max_seqlen_k")] + COMMON + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [(n, REQUIRED) for n in ("qkv", "cu_seqlens", "max_seqlen")] + COMMON,
    "flash_attn_varlen_kvpacked_func": [(n, REQUIRED) for n in ("q", "kv", "cu_seqlens_q", "cu_seqlens_k",
                                                                "max_seqlen_q", "max_seqlen_k")] + COMMON,
    "flash_attn_with_kvcache": [(n, REQUIRED) for n in ("q", "k_cache", "v_cache")] + [
        ("k", None), ("v", None), ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
        ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
        ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("rotary_interleaved", True),
        ("alibi_slopes", None), ("num_splits", 0), ("return_softmax_lse", False)],
}
for _params in SIGNATURES.values():
    _params.append(("attention_chunk", 0))  # flash-attn 3's, after flash-attn 2's arguments


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_flash_attns(name):
    params = inspect.signature(getattr(fa, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert name in fa.__all__


def test_what_cannot_be_honoured_raises():
    packed = _pack(2, 2, 8)
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_varlen_func(*packed, block_table=torch.zeros(6, 1, dtype=torch.int32))


def test_dropout_p_is_the_ops_dropout():
    """dropout_p > 0 runs longreach's attention dropout: the same generator state gives
    local_attention's result with the same dropout_p (its mask is tested in test_dropout.py)."""
    q, k, v = _qkv(1, 6, 6, 2, 2, 8)
    torch.manual_seed(4)
    out = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(4)
    expected = longreach.local_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                         dropout_p=0.3).transpose(1, 2)
    assert torch.equal(out, expected)
    assert not torch.equal(out, fa.flash_attn_func(q, k, v, causal=True))
    packed = _pack(2, 2, 8)
    torch.manual_seed(4)
    a = fa.flash_attn_varlen_func(*packed, dropout_p=0.5)
    torch.manual_seed(4)
    assert torch.equal(a, fa.flash_attn_varlen_func(*packed, dropout_p=0.5))
    assert not torch.equal(a, fa.flash_attn_varlen_func(*packed))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
    (dict(dropout_p="0"), TypeError, "dropout_p must be a number"),
    (dict(window_size=(2,)), TypeError, r"window_size must be a pair of ints .*got \(2,\)"),
    (dict(window_size=(2.0, 1)), TypeError, "window_size must be a pair of ints"),
    (dict(causal="yes"), TypeError, "causal must be a bool"),
    (dict(softcap=None), TypeError, "softcap must be a number"),
    (dict(deterministic=1), TypeError, "deterministic must be a bool"),
    (dict(softmax_scale="0.5"), TypeError, "softmax_scale must be a finite number or None"),
    (dict(softmax_scale=math.inf), ValueError, "softmax_scale must be a finite number or None"),
    (dict(alibi_slopes=[0.5, 0.5]), TypeError, "alibi_slopes must be a float32 tensor"),
])
def test_bad_arguments(kwargs, error, match):
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(error, match=match):
        fa.flash_attn_func(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv(1, 4, 4, 2, 2, 8)
    with pytest.raises(ValueError, match=r"flash_attn_func: q must be a 4-D tensor \(B, Lq, H, D\)"):
        fa.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the shape"):
        fa.flash_attn_func(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"qkv must be a 5-D tensor \(B, L, 3, H, D\)"):
        fa.flash_attn_qkvpacked_func(q)


# ------------------------------------------------------- attention_chunk (flash-attn 3) --


@pytest.mark.parametrize("seqlen_q, seqlen_k, chunk, causal, window_size", [
    (13, 13, 4, True, (-1, -1)),   # Llama-4's chunked causal layers
    (5, 13, 4, True, (2, -1)),     # bottom-right rows, window and chunk intersected
    (13, 13, 5, False, (-1, -1)),  # bidirectional inside chunks
    (9, 9, 20, True, (3, 0)),      # a chunk longer than the keys: the window alone
])
def test_attention_chunk_matches_flash_attn_3s_reference(seqlen_q, seqlen_k, chunk, causal, window_size):
    q, k, v = _qkv(2, seqlen_q, seqlen_k, 4, 2, 8, grad=True)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size, attention_chunk=chunk,
                                     return_attn_probs=True)
    expected, expected_lse = flash_reference(q, k, v, causal=causal, window_size=window_size,
                                             attention_chunk=chunk)
    _close(out, expected)
    _close(lse, expected_lse)
    grad = torch.randn_like(out)
    for actual_grad, expected_grad in zip(torch.autograd.grad(out, (q, k, v), grad),
                                          torch.autograd.grad(expected, (q, k, v), grad)):
        _close(actual_grad, expected_grad)
    if chunk < seqlen_k:  # the chunks matter
        assert not torch.allclose(out, flash_reference(q, k, v, causal=causal, window_size=window_size)[0])


def test_attention_chunk_varlen_counts_chunks_per_sequence():
    cu_q = torch.tensor([0, 7, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 16], dtype=torch.int32)
    q, k, v = torch.randn(12, 4, 8, dtype=torch.float64), torch.randn(16, 2, 8, dtype=torch.float64), \
        torch.randn(16, 2, 8, dtype=torch.float64)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, causal=True, attention_chunk=3)
    for s in range(2):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        expected, _ = flash_reference(q[None, rows], k[None, keys], v[None, keys], causal=True, attention_chunk=3)
        _close(out[rows], expected[0])
    qkv = torch.randn(12, 3, 4, 8, dtype=torch.float64)
    packed = fa.flash_attn_varlen_qkvpacked_func(qkv, cu_q, 7, causal=True, attention_chunk=3)
    _close(packed, fa.flash_attn_varlen_func(*qkv.unbind(1), cu_q, cu_q, 7, 7, causal=True, attention_chunk=3))


@pytest.mark.parametrize("value, error, match", [
    (-1, ValueError, "attention_chunk must be an int >= 0, got -1"),
    (2.0, TypeError, "attention_chunk must be an int >= 0, got 2.0"),
    (True, TypeError, "attention_chunk must be an int >= 0"),
])
def test_attention_chunk_bad_values(value, error, match):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(error, match=match):
        fa.flash_attn_func(q, q, q, attention_chunk=value)
    with pytest.raises(error, match=match):
        fa.flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4,
                                  attention_chunk=value)
