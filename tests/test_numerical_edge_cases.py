"""Corners found by testing from outside (issue 12) that the kernels got wrong:
each test here failed before its fix.

- dK/dV when Lq > Lk with global keys (CPU backward: a row at a negative
  position widened to the global keys broke the monotone runs the key-side
  products rely on);
- dilations and windows near 2**63 (integer overflow, heap corruption);
- soft-cap, scale and sigmoid bias at the edge of the compute dtype's range;
- NaN inputs, which must give NaN in the rows they reach, never finite values.
"""

from __future__ import annotations

import math

import pytest
import torch

import longreach
from longreach import reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _grads(fn, q, k, v, grad, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _assert_matches_reference(q, k, v, atol=1e-12, **kw):
    grad = torch.randn(q.shape, dtype=q.dtype)
    got = _grads(longreach.local_attention, q, k, v, grad, **kw)
    want = _grads(reference.local_attention, q, k, v, grad, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=f"{name} {kw}")


def test_key_gradients_with_more_queries_than_keys_and_a_global_key():
    """The reported minimal case: dV of keys 0-5 came out 0.09/0.08/0.15/... instead of 0.63/0.91/0.66/..."""
    q, k, v = (torch.randn(1, 1, n, 1, dtype=torch.float64) for n in (9, 8, 8))
    gm = torch.zeros(1, 8, dtype=torch.bool)
    gm[0, 6] = True
    _assert_matches_reference(q, k, v, window=(0, 0), global_mask=gm)


@pytest.mark.parametrize(
    "q_len,k_len,window,dilation,causal",
    [
        (9, 8, (0, 0), 1, False),
        (70, 20, (1, 0), 1, True),  # most rows at negative positions see only the global keys
        (150, 64, (3, 2), 2, False),  # rows in two 64-row blocks, two classes
        (40, 39, (None, 0), 3, True),
        (300, 130, (5, 5), 1, False),  # spans longer than a vector of keys, several blocks
    ],
)
@pytest.mark.parametrize("globals_at", ["one", "scattered", "first_and_last"])
def test_more_queries_than_keys_with_global_keys(q_len, k_len, window, dilation, causal, globals_at):
    B, Hq, Hk, D = 2, 4, 2, 5
    q = torch.randn(B, Hq, q_len, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, k_len, D, dtype=torch.float64) for _ in range(2))
    gm = torch.zeros(B, k_len, dtype=torch.bool)
    if globals_at == "one":
        gm[:, k_len * 3 // 4] = True
    elif globals_at == "scattered":
        gm[0, ::7] = True
        gm[1, 5::11] = True
    else:
        gm[:, [0, k_len - 1]] = True
    _assert_matches_reference(q, k, v, window=window, dilation=dilation, causal=causal, global_mask=gm)


@pytest.mark.parametrize(
    "length,window,dilation",
    [
        (1000, (None, None), 2**53),
        (50, (3, 3), 2**62),
        (50, (3, 3), 2**63 - 1),  # corrupted the heap
        (50, (None, None), 2**63 - 2),
        (50, (2**62, 2**62), 2**40),
        (50, (2**62, 2**62), 3),
        (50, (2**63 - 1, 0), 2**63 - 1),
        (37, (4, 1), 37),  # exactly max(Lq, Lk)
        (37, (4, 1), 36),
    ],
)
def test_extreme_dilations_and_windows_match_the_reference(length, window, dilation):
    q, k, v = (torch.randn(1, 2, length, 4, dtype=torch.float64) for _ in range(3))
    _assert_matches_reference(q, k, v, window=window, dilation=dilation)


def test_dilation_at_least_the_length_sees_only_the_own_position():
    """With dilation >= max(Lq, Lk) (and no global keys) every row attends to its own key alone: out = v."""
    q, k, v = (torch.randn(1, 1, 20, 3, dtype=torch.float64) for _ in range(3))
    for dilation in (20, 21, 2**40, 2**63 - 1):
        out = longreach.local_attention(q, k, v, window=(5, 5), dilation=dilation)
        torch.testing.assert_close(out, v, atol=1e-15, rtol=0)


def test_huge_softcap_in_float64_is_within_rounding_of_no_softcap():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(q.shape, dtype=q.dtype)
    capped = _grads(longreach.local_attention, q, k, v, grad, window=(5, 5), softcap=1e300)
    plain = _grads(longreach.local_attention, q, k, v, grad, window=(5, 5))
    for a, b in zip(capped, plain):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(softcap=1e39), "softcap"),
        (dict(softcap=1e300), "softcap"),
        (dict(scale=1e300), "scale"),
        (dict(scale=-1e39), "scale"),
        (dict(score="sigmoid", sigmoid_bias=-1e39), "sigmoid_bias"),
    ],
)
def test_values_beyond_the_float32_computation_are_rejected(dtype, kwargs, name):
    """float32/bf16/fp16 compute in float32: 1e39 would become inf and give rows of zeros."""
    q = torch.randn(1, 1, 8, 4, dtype=dtype)
    with pytest.raises(ValueError, match=rf"{name} .* does not fit the float32 computation of {dtype}"):
        longreach.local_attention(q, q, q, **kwargs)


def test_large_but_representable_values_work_in_float64():
    q, k, v = (torch.randn(1, 1, 8, 4, dtype=torch.float64) for _ in range(3))
    for kw in (dict(scale=1e39), dict(softcap=1e39), dict(score="sigmoid", sigmoid_bias=-1e39)):
        out = longreach.local_attention(q, k, v, **kw)
        torch.testing.assert_close(out, reference.local_attention(q, k, v, **kw), atol=1e-12, rtol=1e-12)


def _nan_rows(t):
    return torch.isnan(t).any(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_in_an_input_gives_nan_in_exactly_the_rows_it_reaches(dtype, score, where):
    """A NaN in q row i makes row i NaN; a NaN in k row j makes NaN every row whose
    window holds j (softmax used to return zeros there, sigmoid a weight of 1)."""
    L, window = 40, (2, 3)
    q, k, v = (torch.randn(2, 2, L, 8, dtype=dtype) for _ in range(3))
    (q if where == "q" else k)[1, 0, 17, 3] = float("nan")
    out = longreach.local_attention(q, k, v, window=window, score=score)
    want = reference.local_attention(q, k, v, window=window, score=score)
    assert torch.equal(_nan_rows(out), _nan_rows(want))
    assert _nan_rows(out).sum() == (1 if where == "q" else 6)
    finite = ~_nan_rows(want)
    torch.testing.assert_close(out[finite].double(), want[finite].double(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_nan_rows_pass_nan_gradients_to_the_keys_they_see(dtype, score):
    """Every gradient row that depends on a NaN is NaN. Like a dense computation
    (where 0 * NaN = NaN spreads it over whole products), the fused products may
    spread it to other rows of the same 64-row block and key tile, never further."""
    L, window = 200, (2, 0)
    q, k, v = (torch.randn(1, 1, L, 4, dtype=dtype) for _ in range(3))
    q[0, 0, 10, 1] = float("nan")  # row 10 sees keys 8, 9, 10
    grad = torch.randn(q.shape, dtype=dtype)
    out, dq, dk, dv = _grads(longreach.local_attention, q, k, v, grad, window=window, score=score)
    assert _nan_rows(out)[0, 0].nonzero().flatten().tolist() == [10]
    assert _nan_rows(dq)[0, 0, 10]
    for g in (dk, dv):
        assert _nan_rows(g)[0, 0, 8:11].all()
    for g in (dq, dk, dv):
        assert not _nan_rows(g)[0, 0, 64:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slope", [math.nan, math.inf, -math.inf])
def test_non_finite_alibi_slopes_give_nan_not_zeros(dtype, slope):
    """slope * |p - j| is NaN at distance 0 for an infinite slope, and NaN everywhere for a NaN slope."""
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=dtype) for _ in range(3))
    slopes = torch.tensor([slope, 0.5])
    out = longreach.local_attention(q, k, v, window=(2, 2), alibi_slopes=slopes)
    want = reference.local_attention(q, k, v, window=(2, 2), alibi_slopes=slopes)
    assert torch.equal(_nan_rows(out), _nan_rows(want))
    assert _nan_rows(out)[0, 0].all() and not _nan_rows(out)[0, 1].any()


def test_finite_inputs_never_give_nan_with_fully_masked_rows():
    """Rows with no key (Lq > Lk, causal, tiny window) stay exact zeros: lse -inf, zero gradients."""
    q = torch.randn(1, 2, 20, 4, dtype=torch.float32)
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    for score in ("softmax", "sigmoid"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = longreach.local_attention(qq, kk, vv, window=(1, 0), causal=True, score=score)
        out.sum().backward()
        assert torch.isfinite(out).all() and (out[:, :, :14] == 0).all()
        assert all(torch.isfinite(t.grad).all() for t in (qq, kk, vv))
        assert (qq.grad[:, :, :14] == 0).all()
