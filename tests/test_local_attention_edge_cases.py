"""Edge cases of the fused op: rows with no allowed key, strided inputs, low
precision against PyTorch's own same-dtype error, and empty sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import longreach
from longreach import reference
from attention_testing import (
    assert_close,
    dense_allowed_mask,
    grads,
    precise_dtype,
    random_qkv,
    rms_error,
    scaled_error,
    standard_alibi_slopes,
    tight_tolerance,
)
from testenv import skip_unsupported_dtype

# ---------------------------------------------------------------------------
# Rows with no allowed key. They exist only when a row's position
# p(i) = i + Lk - Lq is left of every key its window could reach: Lq > Lk
# (bottom-right alignment puts the first rows at negative positions) or Lk = 0.

EMPTY_ROW_CASES = [
    # (id, Lq, Lk, kwargs, rows expected empty)
    ("causal_lq_gt_lk", 10, 6, dict(causal=True), range(0, 4)),
    ("left_window_lq_gt_lk", 12, 5, dict(window=(3, 0)), range(0, 7)),
    ("dilated_left_window", 12, 5, dict(window=(2, 0), dilation=3), range(0, 7)),
    ("sigmoid_causal", 9, 4, dict(causal=True, score="sigmoid"), range(0, 5)),
    ("alibi_softcap_causal", 9, 4, dict(causal=True, alibi_slopes="standard", softcap=5.0), range(0, 5)),
    # a window reaching right: p = -4 with dilation 3 sees key 2 (steps -4, -1, 2), so
    # only positions whose whole dilated band misses [0, Lk) are empty
    ("dilated_right_reach", 12, 5, dict(window=(0, 2), dilation=3), [0]),
    ("no_keys_at_all", 5, 0, dict(), range(0, 5)),
]


def _resolve(kwargs, heads, device):
    kwargs = dict(kwargs)
    if kwargs.get("alibi_slopes") == "standard":
        kwargs["alibi_slopes"] = standard_alibi_slopes(heads).to(device)
    return kwargs


@pytest.mark.parametrize("name,q_len,k_len,kwargs,empty_rows", EMPTY_ROW_CASES, ids=[c[0] for c in EMPTY_ROW_CASES])
def test_rows_without_keys_are_zero_with_zero_gradient(name, q_len, k_len, kwargs, empty_rows, device):
    kwargs = _resolve(kwargs, 4, device)
    empty = torch.zeros(q_len, dtype=torch.bool)
    empty[list(empty_rows)] = True
    # the expectation is independent of both implementations
    left, right = kwargs.get("window", (None, None))
    band = dense_allowed_mask(q_len, k_len, left, 0 if kwargs.get("causal") else right, kwargs.get("dilation", 1))
    assert torch.equal(~band.any(dim=1), empty), "test case expectation is wrong"

    dtype = precise_dtype(device)
    tol = tight_tolerance(dtype)
    q, k, v = random_qkv(2, 4, 2, q_len, k_len, 8, dtype, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    softmax = kwargs.get("score", "softmax") == "softmax"
    got = longreach.local_attention(*inputs, **kwargs, return_lse=softmax)
    out, lse = got if softmax else (got, None)

    assert not torch.isnan(out).any()
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    if softmax:
        assert torch.isneginf(lse[:, :, empty]).all()
        assert torch.isfinite(lse[:, :, ~empty]).all()
    g_out = torch.randn_like(out)
    dq, dk, dv = grads([out], [g_out], inputs)
    for name_, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(g).any(), f"{name_} has NaN"
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))

    # the non-empty rows and all gradients still match the oracle
    ref_inputs = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    want = reference.local_attention(*ref_inputs, **kwargs)
    assert_close(out, want, tol, "out")
    for n, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads([want], [g_out.to(torch.float64)], ref_inputs)):
        assert_close(a, b, tol, n)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_without_keys(score):
    """The oracle itself must follow the spec for Lk = 0: zeros and lse = -inf."""
    q, k, v = random_qkv(1, 2, 2, 3, 0, 4, torch.float64, "cpu")
    kwargs = dict(score=score, return_lse=score == "softmax")
    got = reference.local_attention(q, k, v, **kwargs)
    out = got[0] if score == "softmax" else got
    assert torch.equal(out, torch.zeros_like(q))
    if score == "softmax":
        assert torch.isneginf(got[1]).all()


def test_gradient_through_lse_of_empty_rows_is_zero(device):
    """lse = -inf does not depend on q or k: a cotangent on it must give zero, not NaN."""
    dtype = precise_dtype(device)
    q, k, v = random_qkv(1, 2, 1, 8, 3, 4, dtype, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out, lse = longreach.local_attention(*inputs, causal=True, return_lse=True)
    assert torch.isneginf(lse[:, :, :5]).all()
    dq, dk, dv = grads([out, lse], [torch.ones_like(out), torch.ones_like(lse)], inputs)
    assert all(not torch.isnan(g).any() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))
    ref_inputs = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    r_out, r_lse = reference.local_attention(*ref_inputs, causal=True, return_lse=True)
    for n, a, b in zip("qkv", (dq, dk, dv), grads([r_out, r_lse], [torch.ones_like(r_out), torch.ones_like(r_lse)], ref_inputs)):
        assert_close(a, b, tight_tolerance(dtype), f"d{n}")


def test_empty_rows_with_global_keys_see_the_global_keys(device):
    """With Lq > Lk the rows at negative positions still see (bidirectional) global keys; with
    causal=True global keys are causal, so those rows see nothing (docs/semantics.md)."""
    dtype = precise_dtype(device)
    q, k, v = random_qkv(2, 2, 2, 9, 5, 4, dtype, device)
    gmask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    gmask[0, 4] = True  # batch 0: a global key; batch 1: none, so its first rows stay empty
    out, lse = longreach.local_attention(q, k, v, window=(0, 0), global_mask=gmask, return_lse=True)
    want, want_lse = reference.local_attention(
        *(t.to(torch.float64) for t in (q, k, v)), window=(0, 0), global_mask=gmask, return_lse=True
    )
    assert_close(out, want, tight_tolerance(dtype), "out")
    assert_close(lse, want_lse, tight_tolerance(dtype), "lse")
    assert torch.isfinite(lse[0]).all() and torch.isneginf(lse[1, :, :4]).all()
    if device == "cpu":  # causal global tokens: CPU kernels only so far (issue 14)
        _, lse = longreach.local_attention(q, k, v, causal=True, global_mask=gmask, return_lse=True)
        assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()


# ---------------------------------------------------------------------------
# Strided inputs: results and gradients equal those of contiguous copies.


def _strided_views(kind, base_q, base_k, base_v):
    """Non-contiguous (B, H, L, D) views of leaf tensors, by kind."""
    if kind == "transposed_blhd":  # (B, L, H, D) storage, the layout of most projections
        return tuple(t.transpose(1, 2) for t in (base_q, base_k, base_v))
    if kind == "sliced":  # every other position, a head slice and a head-dim slice
        return base_q[:, :, ::2, :16], base_k[:, 1:3, ::2, :16], base_v[:, 1:3, ::2, 3:19]
    if kind == "expanded":  # one k/v shared over the batch (stride 0)
        return base_q, base_k.expand(3, -1, -1, -1), base_v.expand(3, -1, -1, -1)
    raise ValueError(kind)


STRIDED_BASES = {
    "transposed_blhd": ((3, 20, 4, 16), (3, 20, 2, 16), (3, 20, 2, 16)),
    "sliced": ((3, 4, 40, 24), (3, 4, 40, 24), (3, 4, 40, 24)),
    "expanded": ((3, 4, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16)),
}


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kind", list(STRIDED_BASES))
def test_non_contiguous_inputs_match_contiguous(kind, score, device):
    dtype = precise_dtype(device)
    bases = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in STRIDED_BASES[kind]]
    slopes_storage = torch.randn(8, device=device)
    gmask_storage = torch.rand(3, 40, device=device) < 0.2
    kwargs = dict(window=(3, 2), dilation=2, score=score, alibi_slopes=slopes_storage[::2], global_mask=gmask_storage[:, ::2])
    assert not kwargs["alibi_slopes"].is_contiguous() and not kwargs["global_mask"].is_contiguous()

    views = _strided_views(kind, *bases)
    assert not all(t.is_contiguous() for t in views)
    got = longreach.local_attention(*views, **kwargs)
    g = torch.randn_like(got)
    got_grads = grads([got], [g], bases)

    contiguous_kwargs = dict(kwargs, alibi_slopes=kwargs["alibi_slopes"].contiguous(),
                             global_mask=kwargs["global_mask"].contiguous())
    want = longreach.local_attention(*(t.contiguous() for t in _strided_views(kind, *bases)), **contiguous_kwargs)
    want_grads = grads([want], [g], bases)
    assert_close(got, want, tight_tolerance(dtype), "out")
    for n, a, b in zip("qkv", got_grads, want_grads):
        assert_close(a, b, tight_tolerance(dtype), f"grad of {n} storage")


# ---------------------------------------------------------------------------
# Low precision: longreach's error against a float64 oracle is at most twice
# PyTorch's own error in the same dtype, plus a tiny epsilon.

LOW_PRECISION_CONFIGS = [
    # (id, kwargs, which torch computation is the same-dtype baseline)
    ("unbounded", dict(), "sdpa"),
    ("causal", dict(causal=True), "sdpa"),
    ("dilated_window", dict(window=(16, 16), dilation=2), "sdpa"),
    ("alibi_causal_window", dict(window=(31, 0), causal=True, alibi_slopes="standard"), "sdpa"),
    ("large_scale", dict(window=(8, 0), causal=True, scale=0.5), "sdpa"),
    ("softcap_sigmoid", dict(window=(16, 16), softcap=30.0, score="sigmoid", scale=0.5), "eager"),
    ("softcap_softmax", dict(window=(8, 0), causal=True, softcap=30.0, scale=0.5), "eager"),
]


def _allowed(q, k, kwargs):
    left, right = kwargs.get("window", (None, None))
    if kwargs.get("causal"):
        right = 0
    return dense_allowed_mask(q.shape[2], k.shape[2], left, right, kwargs.get("dilation", 1)).to(q.device)


def _sdpa_in_dtype(q, k, v, kwargs):
    """SDPA in q's dtype as a user would call it: a (Lq, Lk) bool mask for the
    window (PyTorch's default dispatch then runs its flash kernel, as for any
    such call), or, with ALiBi, an additive (H, Lq, Lk) bias of the dtype."""
    q_len, k_len = q.shape[2], k.shape[2]
    mask = _allowed(q, k, kwargs)
    slopes = kwargs.get("alibi_slopes")
    if slopes is not None:
        pos = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        distance = (pos - torch.arange(k_len, device=q.device)[None, :]).abs()
        bias = -slopes.to(torch.float64)[:, None, None] * distance
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=kwargs.get("scale"))


def _eager_in_dtype(q, k, v, kwargs):
    """Dense attention the way Hugging Face's eager attention computes it in q's
    dtype (matmuls and soft-capping in the dtype, softmax accumulated in float32
    then cast back); sigmoid scores likewise. For features SDPA cannot express."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * kwargs["scale"]
    cap = kwargs["softcap"]
    s = torch.tanh(s / cap) * cap
    allowed = _allowed(q, k, kwargs)
    if kwargs.get("score") == "sigmoid":
        left, right = kwargs["window"]  # finite here; bias -ln(n), n = keys in a full window row
        weights = torch.sigmoid(s - math.log(min(k.shape[2], left + right + 1)))
        weights = weights * allowed
    else:
        s = s.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,kwargs,baseline", LOW_PRECISION_CONFIGS, ids=[c[0] for c in LOW_PRECISION_CONFIGS])
def test_low_precision_error_within_twice_torch(name, kwargs, baseline, dtype, device):
    kwargs = _resolve(kwargs, 4, device)
    q, k, v = random_qkv(2, 4, 2, 96, 128, 64, dtype, device)
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    torch_in = [t.clone().requires_grad_() for t in (q, k, v)]
    exact_in = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]

    ours = longreach.local_attention(*ours_in, **kwargs)
    theirs = (_sdpa_in_dtype if baseline == "sdpa" else _eager_in_dtype)(*torch_in, kwargs)
    exact = reference.local_attention(*exact_in, **kwargs)
    assert ours.dtype == dtype and theirs.dtype == dtype

    g = torch.randn(exact.shape, dtype=torch.float64, device=device)
    results = {
        "out": (ours, theirs, exact),
        **{
            f"d{n}": trio
            for n, trio in zip(
                "qkv",
                zip(grads([ours], [g.to(dtype)], ours_in), grads([theirs], [g.to(dtype)], torch_in), grads([exact], [g], exact_in)),
            )
        },
    }
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for what, (a, b, e) in results.items():
        for measure in (scaled_error, rms_error):
            err_ours, err_torch = measure(a, e), measure(b, e)
            assert err_ours <= 2 * err_torch + 0.1 * eps, (
                f"{what}, {measure.__name__}: longreach {err_ours:.3g} > 2 x torch's {err_torch:.3g} + {0.1 * eps:.3g}"
            )


# ---------------------------------------------------------------------------
# Empty sizes.

EMPTY_SHAPES = [
    # (B, Hq, Hk, Lq, Lk, D)
    (0, 4, 2, 7, 7, 8),
    (2, 4, 2, 0, 7, 8),
    (2, 4, 2, 0, 0, 8),
    (1, 2, 1, 3, 0, 8),
]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shapes", EMPTY_SHAPES, ids=lambda s: "B{}-H{}x{}-L{}x{}-D{}".format(*s))
def test_empty_sizes(shapes, score, device):
    batch, q_heads, _, q_len, k_len, head_dim = shapes
    q, k, v = (t.requires_grad_() for t in random_qkv(*shapes, torch.float32, device))
    gmask = torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    out = longreach.local_attention(q, k, v, window=(2, 1), global_mask=gmask, score=score)
    assert out.shape == (batch, q_heads, q_len, head_dim)
    assert torch.equal(out, torch.zeros_like(out))  # empty, or rows with no key at all
    dq, dk, dv = grads([out], [torch.ones_like(out)], [q, k, v])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))


# ---------------------------------------------------------------------------
# Threads: the CPU kernels split work with at::parallel_for and their backward
# uses no atomics, so any thread count gives bit-identical results.


def test_thread_count_does_not_change_results():
    q, k, v = random_qkv(2, 4, 2, 300, 300, 32, torch.float32, "cpu")
    gmask = torch.rand(2, 300) < 0.03
    kwargs = dict(window=(40, 3), dilation=2, global_mask=gmask, alibi_slopes=standard_alibi_slopes(4), return_lse=True)
    results = []
    saved = torch.get_num_threads()
    try:
        for threads in (1, max(4, saved)):
            torch.set_num_threads(threads)
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = longreach.local_attention(*inputs, **kwargs)
            results.append((out, lse, *grads([out, lse], [torch.ones_like(out), torch.ones_like(lse)], inputs)))
    finally:
        torch.set_num_threads(saved)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between 1 and several threads"
