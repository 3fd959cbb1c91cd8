"""Global tokens in longreach.local_attention (docs/semantics.md), forward and backward.

Truths: the dense oracle `longreach.reference` for outputs, lse and gradients
(float64, so any disagreement is a real bug, not rounding), and, for "no key
counted twice", a brute-force count of allowed keys written from the spec's
text: with q = 0 every allowed key gets the same softmax weight 1 / n, so a
key counted twice would get 2 / (n + 1).

The kernels work in blocks of 64 rows and 64 keys, so the cases use lengths
past one block, global runs longer than a block, and lengths that are not
multiples of it.
"""

from __future__ import annotations

import math

import pytest
import torch

import longreach
from longreach import reference

F64 = torch.float64


def global_mask_for(pattern: str, batch: int, k_len: int, gen: torch.Generator) -> torch.Tensor:
    """Bool (batch, k_len) global-token patterns; every batch element differs from the others."""
    g = torch.zeros(batch, k_len, dtype=torch.bool)
    if pattern == "none":
        pass
    elif pattern == "all":
        g[:] = True
    elif pattern == "edges":  # first and last token: windows at both ends already hold them
        g[:, 0] = True
        g[:, -1] = True
    elif pattern == "scattered":  # ~10% random tokens, a different set per element
        g = torch.rand(batch, k_len, generator=gen) < 0.1
    elif pattern == "dense_in_window":  # every third token: most rows have globals inside their window
        g[:, ::3] = True
    elif pattern == "long_run":  # a run longer than one 64-row block, in the middle
        g[:, k_len // 4: k_len // 4 + 70] = True
    elif pattern == "one_element":  # only batch element 0 has globals (1 token), the others none
        g[0, k_len // 2] = True
    elif pattern == "tail":  # the last quarter global, like a padded tail marked global
        g[:, -(k_len // 4):] = True
    else:
        raise AssertionError(pattern)
    if batch > 1 and pattern not in ("none", "all", "one_element"):
        g[-1, 1] = ~g[-1, 1]  # make the last element differ from the first
    return g


def make_inputs(batch, q_heads, kv_heads, q_len, k_len, dim, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=gen, dtype=F64).to(dtype)
    return q, k, v, gen


# Hand-picked so that every value of every axis appears with several values of the others
# (score x dilation x alibi x GQA x Lq < Lk x pattern), plus causal and softcap here and there.
CASES = [
    # score,    window,      causal, dil, alibi,      (Hq,Hk), (Lq, Lk),  pattern
    ("softmax", (5, 5), False, 1, None, (2, 2), (150, 150), "none"),
    ("softmax", (5, 5), False, 1, None, (2, 2), (150, 150), "all"),
    ("softmax", (4, 4), False, 1, None, (2, 2), (150, 150), "dense_in_window"),
    ("softmax", (3, 2), False, 2, "standard", (4, 2), (150, 150), "scattered"),
    ("softmax", (6, 6), False, 3, "negative", (4, 1), (133, 133), "long_run"),
    ("softmax", (8, 0), True, 1, "standard", (2, 1), (100, 170), "edges"),
    ("softmax", (None, 3), False, 2, None, (3, 3), (40, 130), "one_element"),
    ("softmax", (2, None), False, 1, "negative", (4, 2), (1, 90), "scattered"),
    ("softmax", (7, 7), False, 4, None, (2, 2), (129, 129), "tail"),
    ("softmax", (0, 0), False, 1, None, (2, 1), (97, 97), "dense_in_window"),
    ("sigmoid", (5, 5), False, 1, None, (2, 2), (150, 150), "none"),
    ("sigmoid", (5, 5), False, 1, None, (2, 2), (150, 150), "all"),
    ("sigmoid", (4, 4), False, 2, "standard", (4, 2), (140, 140), "dense_in_window"),
    ("sigmoid", (6, 0), True, 3, "negative", (2, 1), (80, 150), "long_run"),
    ("sigmoid", (3, 3), False, 1, "negative", (4, 1), (150, 150), "edges"),
    ("sigmoid", (None, 2), False, 1, None, (2, 2), (60, 100), "scattered"),
    ("sigmoid", (2, 5), False, 2, None, (3, 1), (131, 131), "tail"),
    ("sigmoid", (1, 1), False, 1, "standard", (2, 2), (70, 70), "one_element"),
]


def alibi_for(kind, batch, q_heads):
    if kind is None:
        return None
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(q_heads)], dtype=torch.float32)
    if kind == "negative":  # (B, H) with some negative slopes (SWAT's balanced heads reward distance)
        slopes = torch.stack([slopes * (-1) ** h for h in range(batch)])
        slopes[:, 0] = -slopes[:, 0]
    return slopes


def case_id(case):
    score, window, causal, dil, alibi, heads, lengths, pattern = case
    return f"{score}-w{window[0]}_{window[1]}{'-causal' if causal else ''}-d{dil}-{alibi}-h{heads[0]}_{heads[1]}-L{lengths[0]}_{lengths[1]}-{pattern}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_global_tokens_match_reference_forward_and_backward(case):
    score, window, causal, dilation, alibi, (q_heads, kv_heads), (q_len, k_len), pattern = case
    batch = 2
    q, k, v, gen = make_inputs(batch, q_heads, kv_heads, q_len, k_len, 8)
    gmask = global_mask_for(pattern, batch, k_len, gen)
    kwargs = dict(window=window, causal=causal, dilation=dilation, global_mask=gmask,
                  alibi_slopes=alibi_for(alibi, batch, q_heads), score=score)
    grad_out = torch.randn(q.shape, generator=gen, dtype=F64)
    grad_lse = torch.randn(q.shape[:3], generator=gen, dtype=F64)

    def run(fn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        if score == "softmax":
            out, lse = fn(qq, kk, vv, return_lse=True, **kwargs)
            finite = torch.isfinite(lse)  # rows with no key have lse -inf and no gradient through it
            loss = (out * grad_out).sum() + (torch.where(finite, lse, 0.0) * grad_lse).sum()
        else:
            out, lse = fn(qq, kk, vv, **kwargs), None
            loss = (out * grad_out).sum()
        loss.backward()
        return out, lse, qq.grad, kk.grad, vv.grad

    got, want = run(longreach.local_attention), run(reference.local_attention)
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    for name, a, b in zip(names, got, want):
        if a is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pattern", ["edges", "dense_in_window", "long_run", "all", "scattered"])
@pytest.mark.parametrize("window,dilation,q_len", [((3, 3), 1, 80), ((2, 4), 3, 80), ((5, 0), 2, 37)])
def test_each_allowed_key_counted_once(pattern, window, dilation, q_len):
    """q = 0 makes all scores equal: out = mean of the allowed keys' one-hot values, weight 1 / n each."""
    batch, k_len = 2, 80
    gen = torch.Generator().manual_seed(1)
    gmask = global_mask_for(pattern, batch, k_len, gen)
    q = torch.zeros(batch, 1, q_len, k_len, dtype=F64)
    k = torch.randn(batch, 1, k_len, k_len, generator=gen, dtype=F64)
    v = torch.eye(k_len, dtype=F64).expand(batch, 1, k_len, k_len)  # v_j = e_j: out[i] is the weight vector
    out = longreach.local_attention(q, k, v, window=window, dilation=dilation, global_mask=gmask)

    left, right = window
    expected = torch.zeros(batch, q_len, k_len, dtype=F64)
    for b in range(batch):
        for i in range(q_len):
            p = i + k_len - q_len
            row_global = bool(gmask[b, p])
            allowed = [j for j in range(k_len)
                       if row_global or bool(gmask[b, j])
                       or ((p - j) % dilation == 0 and -left <= (j - p) // dilation <= right)]
            expected[b, i, allowed] = 1.0 / len(allowed)
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=1e-12)


def test_all_false_global_mask_equals_no_global_mask():
    q, k, v, _ = make_inputs(2, 2, 2, 130, 130, 8)
    none = torch.zeros(2, 130, dtype=torch.bool)
    for score in ("softmax", "sigmoid"):
        a = longreach.local_attention(q, k, v, window=(4, 4), score=score)
        b = longreach.local_attention(q, k, v, window=(4, 4), score=score, global_mask=none)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_all_global_is_full_attention():
    """Every token global: every row sees every key, whatever the window (checked against SDPA)."""
    q, k, v, _ = make_inputs(2, 4, 4, 150, 150, 16)
    everything = torch.ones(2, 150, dtype=torch.bool)
    out = longreach.local_attention(q, k, v, window=(1, 1), dilation=2, global_mask=everything)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_global_tokens_low_precision(dtype, tol):
    q, k, v, gen = make_inputs(2, 4, 2, 150, 150, 32, dtype=dtype)
    gmask = global_mask_for("scattered", 2, 150, gen)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = longreach.local_attention(qq, kk, vv, window=(6, 6), global_mask=gmask)
    out.float().square().sum().backward()
    q64, k64, v64 = (t.to(F64).requires_grad_() for t in (q, k, v))
    ref = reference.local_attention(q64, k64, v64, window=(6, 6), global_mask=gmask)
    ref.square().sum().backward()
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol)
    for got, want in ((qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        torch.testing.assert_close(got.to(F64), want, rtol=tol, atol=4 * tol)


def test_gradcheck_with_global_tokens():
    q, k, v, gen = make_inputs(1, 2, 1, 20, 24, 4)
    gmask = torch.zeros(1, 24, dtype=torch.bool)
    gmask[0, [2, 13, 23]] = True
    slopes = torch.tensor([0.25, -0.5])
    for score in ("softmax", "sigmoid"):
        fn = lambda a, b, c: longreach.local_attention(a, b, c, window=(2, 1), dilation=2, global_mask=gmask,
                                                       alibi_slopes=slopes, score=score)
        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (q, k, v)))


def test_opcheck_with_global_tokens():
    q, k, v, gen = make_inputs(2, 2, 1, 70, 70, 8)
    gmask = global_mask_for("scattered", 2, 70, gen)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), gmask, None, 3, 3, 2, "softmax",
            None, 0.0, 8 ** -0.5)
    torch.library.opcheck(torch.ops.longreach.local_attention_fwd.default, args)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.zeros(2, 50, dtype=torch.float32), r"global_mask must be a bool tensor, got torch.float32"),
        (torch.zeros(2, 50, dtype=torch.int64), r"global_mask must be a bool tensor, got torch.int64"),
        (torch.zeros(2, 49, dtype=torch.bool), r"global_mask must have shape \(B, Lk\) = \(2, 50\), got \[2, 49\]"),
        (torch.zeros(1, 50, dtype=torch.bool), r"global_mask must have shape \(B, Lk\) = \(2, 50\), got \[1, 50\]"),
        (torch.zeros(2, 1, 50, dtype=torch.bool), r"global_mask must have shape \(B, Lk\) = \(2, 50\), got \[2, 1, 50\]"),
        # (B, Lq) is not (B, Lk) when the lengths differ: the mask is over keys
        (torch.zeros(2, 30, dtype=torch.bool), r"global_mask must have shape \(B, Lk\) = \(2, 50\), got \[2, 30\]"),
    ],
    ids=["float", "int64", "short", "batch", "3d", "query_length"],
)
def test_bad_global_mask_raises(bad, match):
    q = torch.randn(2, 2, 30, 8)
    k = torch.randn(2, 2, 50, 8)
    with pytest.raises((TypeError, ValueError), match=match):
        longreach.local_attention(q, k, k, window=(2, 2), global_mask=bad)


# --- causal global tokens (docs/semantics.md "Global tokens under causal") ---------------------

@pytest.mark.parametrize("q_len,k_len", [(130, 130), (40, 200), (150, 90)])  # Lq = Lk, Lq < Lk, Lq > Lk
@pytest.mark.parametrize("pattern", ["edges", "scattered", "dense_in_window", "all"])
@pytest.mark.parametrize("dilation", [1, 3])
def test_causal_global_tokens_vs_reference(q_len, k_len, pattern, dilation):
    """Global rows see only keys at or before them, global keys only rows at or after them:
    global rows and keys on both sides of every row, blocks of 64, Lq > Lk included."""
    gen = torch.Generator().manual_seed(q_len * 7 + k_len + dilation)
    mk = lambda *s: torch.randn(*s, dtype=F64, generator=gen).requires_grad_()  # noqa: E731
    q, k, v = mk(2, 2, q_len, 8), mk(2, 1, k_len, 8), mk(2, 1, k_len, 8)
    g = global_mask_for(pattern, 2, k_len, gen)
    kw = dict(window=(5, 0), causal=True, dilation=dilation, global_mask=g, return_lse=True)
    out, lse = longreach.local_attention(q, k, v, **kw)
    ref, ref_lse = reference.local_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.nan_to_num(lse, neginf=-1e4), torch.nan_to_num(ref_lse, neginf=-1e4),
                               atol=1e-10, rtol=1e-10)
    grad = torch.randn(out.shape, dtype=F64, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    # the oracle itself: nothing after a row's position is allowed
    allowed = reference.allowed_keys(q_len, k_len, (5, 0), True, dilation, g)
    pos = torch.arange(q_len) + k_len - q_len
    assert not (allowed & (torch.arange(k_len)[None, None, :] > pos[None, :, None])).any()
