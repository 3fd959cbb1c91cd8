"""Chunked and shifted-chunk attention (`chunk=`, `chunk_shift=`; docs/semantics.md "Chunks"):
the ops against the dense reference, the reference against SDPA run chunk by chunk (an
independent truth), gradients, torch.compile, opcheck and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import longreach
from longreach import reference

OPS = torch.ops.longreach


def _finite(t):
    return torch.nan_to_num(t, neginf=-1e4)


def _run(fn, q, k, v, **kw):
    """Output, lse (softmax) and the gradients of q, k, v under fixed random cotangents."""
    softmax = kw.get("score", "softmax") == "softmax"
    result = fn(q, k, v, return_lse=softmax, **kw)
    out, lse = result if softmax else (result, None)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    loss = (out * g).sum()
    if lse is not None:
        gl = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(2))
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * gl).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v))


def _shift(kind, chunk, heads):
    if kind is None:
        return None
    if kind == "half":  # LongLoRA / SCCA: half the heads shifted by half a chunk
        return torch.tensor([0 if h < heads // 2 else chunk // 2 for h in range(heads)])
    return torch.tensor(kind[:heads], dtype=torch.int32)  # arbitrary values, negative and > chunk included


CASES = list(itertools.product(
    [1, 5, 8, 64],  # chunk: 1, not dividing L, dividing it, larger than L
    [None, "half", (3, -2, 11, 0)],  # shifts
    [((None, 0), True, 1), ((6, 3), False, 1), ((4, 0), True, 2)],  # window, causal, dilation
    [(37, 37), (9, 37), (45, 30)],  # (Lq, Lk): square, prefix, Lq > Lk
))


@pytest.mark.parametrize("chunk,shift,win,shape", CASES[::2])
def test_dense_float64_vs_reference(chunk, shift, win, shape):
    (window, causal, dilation), (lq, lk) = win, shape
    b, h, hk, d = 2, 4, 2, 8
    g = torch.Generator().manual_seed(hash((chunk, str(shift), win, shape)) % 2**31)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(b, h, lq, d), mk(b, hk, lk, d), mk(b, hk, lk, d)
    kw = dict(window=window, causal=causal, dilation=dilation, chunk=chunk, chunk_shift=_shift(shift, chunk, h))
    o, lse, grads = _run(longreach.local_attention, q, k, v, **kw)
    ro, rlse, rgrads = _run(reference.local_attention, q, k, v, **kw)
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(_finite(lse), _finite(rlse), atol=1e-10, rtol=1e-10)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


EXTRAS = [
    dict(global_mask="g"),
    dict(global_mask="g", causal=True),
    dict(sink_tokens=3, causal=True),
    dict(sinks="s", causal=True),
    dict(score="sigmoid", window=(5, 5)),
    dict(alibi_slopes=torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=torch.float32), softcap=4.0),
    dict(key_padding_mask="p", causal=True),
]


@pytest.mark.parametrize("extra", EXTRAS, ids=lambda e: "-".join(sorted(e)))
def test_with_other_options_vs_reference(extra):
    """Globals, sinks and sink tokens cross chunks; scores, ALiBi, soft-cap and padding as without chunks."""
    b, h, hk, lq, lk, d, chunk = 2, 4, 2, 26, 33, 8, 6
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(b, h, lq, d), mk(b, hk, lk, d), mk(b, hk, lk, d)
    kw = dict(extra)
    if kw.get("global_mask") == "g":
        kw["global_mask"] = torch.rand(b, lk, generator=g) < 0.15
    if kw.get("key_padding_mask") == "p":
        kw["key_padding_mask"] = torch.rand(b, lk, generator=g) < 0.2
    if kw.get("sinks") == "s":
        kw["sinks"] = torch.randn(h, dtype=torch.float64, generator=g)
    kw.update(chunk=chunk, chunk_shift=torch.tensor([0, 3, 0, 3]))
    o, lse, grads = _run(longreach.local_attention, q, k, v, **kw)
    ro, rlse, rgrads = _run(reference.local_attention, q, k, v, **kw)
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    if lse is not None:
        torch.testing.assert_close(_finite(lse), _finite(rlse), atol=1e-10, rtol=1e-10)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


def _sdpa_by_chunks(q, k, v, chunk, shifts):
    """Causal attention within chunks, computed by cutting each head's sequence at its chunk
    borders (positions x with (x + shift) % chunk == 0) and running causal SDPA on each piece."""
    length = q.shape[2]
    out = torch.empty_like(q)
    for h, s in enumerate(shifts):
        borders = [0] + [x for x in range(1, length) if (x + s) % chunk == 0] + [length]
        for a, e in zip(borders, borders[1:]):
            out[:, h, a:e] = F.scaled_dot_product_attention(q[:, h, a:e], k[:, h, a:e], v[:, h, a:e], is_causal=True)
    return out


def test_reference_and_op_match_sdpa_per_chunk():
    """An independent truth: SDPA on every chunk alone (LongLoRA's grouping without its wrap-around)."""
    b, h, length, d, chunk = 2, 4, 40, 16, 8
    shifts = [0, 0, 4, 4]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    expected = _sdpa_by_chunks(q, k, v, chunk, shifts)
    kw = dict(causal=True, chunk=chunk, chunk_shift=torch.tensor(shifts))
    torch.testing.assert_close(reference.local_attention(q, k, v, **kw), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(longreach.local_attention(q, k, v, **kw), expected, atol=1e-5, rtol=1e-5)


def test_shift_only_matters_modulo_chunk_and_none_is_zero():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g) for _ in range(3))
    a = longreach.local_attention(q, k, v, causal=True, chunk=7, chunk_shift=torch.tensor([3, 0]))
    b = longreach.local_attention(q, k, v, causal=True, chunk=7, chunk_shift=torch.tensor([3 - 7 * 5, 14]))
    c = longreach.local_attention(q, k, v, causal=True, chunk=7)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a[:, 1], c[:, 1], atol=0, rtol=0)
    assert not torch.allclose(a[:, 0], c[:, 0])  # the shift changes something


def test_huge_chunk_and_shift_are_exact():
    """A chunk near 2**63 holds the whole sequence unless a border falls inside it."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64, generator=g) for _ in range(3))
    big = 2**63 - 1
    shift = torch.tensor([0, big - 10])  # border at position 10 in head 1
    kw = dict(causal=True, chunk=big, chunk_shift=shift)
    torch.testing.assert_close(longreach.local_attention(q, k, v, **kw), reference.local_attention(q, k, v, **kw))
    full = longreach.local_attention(q, k, v, causal=True)
    torch.testing.assert_close(longreach.local_attention(q, k, v, **kw)[:, 0], full[:, 0])


def test_varlen_packs_vs_reference():
    """Chunks are counted from each sequence's first position."""
    h, hk, d, chunk = 4, 2, 8, 5
    lens_q, lens_k = [7, 0, 13, 4], [7, 3, 21, 12]
    g = torch.Generator().manual_seed(6)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(sum(lens_q), h, d), mk(sum(lens_k), hk, d), mk(sum(lens_k), hk, d)
    cq = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    ck = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    kw = dict(causal=True, window=(9, 0), chunk=chunk, chunk_shift=torch.tensor([0, 2, 0, -1]), sink_tokens=1)

    def run(fn):
        out, lse = fn(q, k, v, cq, ck, max(lens_q), max(lens_k), return_lse=True, **kw)
        gout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        return out, lse, torch.autograd.grad((out * gout).sum(), (q, k, v))

    o, lse, grads = run(longreach.local_attention_varlen)
    ro, rlse, rgrads = run(reference.local_attention_varlen)
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(_finite(lse), _finite(rlse), atol=1e-10, rtol=1e-10)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(8)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(1, 4, 11, 4), mk(1, 2, 11, 4), mk(1, 2, 11, 4)
    slopes = torch.tensor([0.1, 0.2, -0.1, 0.3], dtype=torch.float32)
    shift = torch.tensor([0, 2, 1, 2])

    def f(q, k, v):
        out, lse = longreach.local_attention(q, k, v, causal=True, chunk=4, chunk_shift=shift, alibi_slopes=slopes,
                                             return_lse=True)
        return out, torch.nan_to_num(lse, neginf=0.0)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_compile_fullgraph():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 4, 24, 8, generator=g, requires_grad=True) for _ in range(3))
    shift = torch.tensor([0, 0, 3, 3])

    def f(q, k, v):
        return longreach.local_attention(q, k, v, causal=True, chunk=6, chunk_shift=shift).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    actual = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_opcheck():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=g) for _ in range(3))
    shift = torch.tensor([0, 2])
    torch.library.opcheck(OPS.local_attention_fwd,
                          (q, k, v, None, None, -1, 0, 1, "softmax", None, 0.0, 0.5),
                          dict(causal=True, chunk=4, chunk_shift=shift))
    out, lse = OPS.local_attention_fwd(q, k, v, None, None, -1, 0, 1, "softmax", None, 0.0, 0.5, causal=True,
                                       chunk=4, chunk_shift=shift)
    torch.library.opcheck(OPS.local_attention_bwd,
                          (torch.randn_like(out), None, q, k, v, out, lse, None, None, -1, 0, 1, "softmax", None,
                           0.0, 0.5),
                          dict(causal=True, chunk=4, chunk_shift=shift))


@pytest.mark.parametrize("kw,error,match", [
    (dict(chunk=-1), ValueError, "chunk must be an int >= 0"),
    (dict(chunk=2.0), TypeError, "chunk must be an int"),
    (dict(chunk=4, chunk_shift=torch.tensor([0, 1, 2])), ValueError, r"chunk_shift must be .*shape \(Hq,\) = \(2,\)"),
    (dict(chunk=4, chunk_shift=torch.tensor([0.0, 1.0])), TypeError, "chunk_shift must be an int32 or int64"),
    (dict(chunk=4, chunk_shift=[0, 2]), TypeError, "chunk_shift must be"),
    (dict(chunk_shift=torch.tensor([0, 2])), ValueError, "chunk_shift needs chunk > 0"),
])
def test_bad_input(kw, error, match):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(error, match=match):
        longreach.local_attention(q, q, q, **kw)


@pytest.mark.parametrize("kw,error,match", [
    (dict(chunk=-1), ValueError, "chunk must be an int >= 0"),
    (dict(chunk=4, chunk_shift=torch.tensor([0, 1, 2])), ValueError, r"chunk_shift must have shape \(Hq,\) = \(2,\)"),
    (dict(chunk=4, chunk_shift=torch.tensor([0.0, 1.0])), TypeError, "chunk_shift must be an int32 or int64"),
    (dict(chunk=0, chunk_shift=torch.tensor([0, 2])), ValueError, "chunk_shift needs chunk > 0"),
])
def test_bad_input_reaches_the_op_checks(kw, error, match):
    """The C++ checks (csrc/attention_params.cpp chunk_phases) for callers of the raw op."""
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(error, match=match):
        OPS.local_attention_fwd(q, q, q, None, None, -1, -1, 1, "softmax", None, 0.0, 0.5, **kw)


@pytest.mark.parametrize("q_len,k_len,window,dilation,chunk,phase", [
    (37, 37, (-1, 0), 1, 8, 0), (37, 37, (-1, 0), 1, 8, 4), (20, 37, (5, 3), 2, 6, 5), (45, 30, (-1, -1), 3, 7, 2),
    (30, 30, (4, 4), 1, 1, 0), (30, 30, (-1, 0), 1, 100, 60),
])
def test_window_ranges_are_the_chunked_band(q_len, k_len, window, dilation, chunk, phase):
    """The planners' ranges (window.h window_key_range / window_row_range, which bound the key tiles
    a block visits) are exactly the first and last keys (rows) of the chunked band: O(c) per row,
    not O(window)."""
    key_lo, key_hi, row_lo, row_hi = OPS._debug_window_ranges(q_len, k_len, *window, dilation, chunk, phase)
    sides = tuple(None if s < 0 else s for s in window)
    mask = reference.allowed_keys(q_len, k_len, sides, False, dilation, chunk=chunk,
                                  chunk_shift=torch.tensor([phase]))[0, 0]
    for i in range(q_len):
        keys = mask[i].nonzero().flatten().tolist()
        if keys:
            assert (key_lo[i].item(), key_hi[i].item()) == (keys[0], keys[-1]), i
        else:
            assert key_lo[i] > key_hi[i], i
    for j in range(k_len):
        rows = mask[:, j].nonzero().flatten().tolist()
        if rows:
            assert (row_lo[j].item(), row_hi[j].item()) == (rows[0], rows[-1]), j
        else:
            assert row_lo[j] > row_hi[j], j


def test_no_query_rows_with_several_chunk_grids():
    """Lq = 0 with heads on different chunk grids (one call per grid): the empty grad_lse is
    sliced per grid like every other per-head tensor (the randomized differential test found
    it passed whole, and the backward rejected its shape)."""
    q = torch.randn(1, 2, 0, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    out, lse = longreach.local_attention(q, k, v, chunk=2, chunk_shift=torch.tensor([0, 1]), return_lse=True)
    assert out.shape == (1, 2, 0, 4) and lse.shape == (1, 2, 0)
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))
