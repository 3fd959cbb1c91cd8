"""longreach.alibi_slopes and nn.ALiBi against the formulas written out here and
Hugging Face's BLOOM ALiBi code, and the behaviour that motivates SWAT's balanced
slopes: inside longreach.local_attention a head with a negative slope puts more
weight on far keys, a head with a positive slope on near keys.
"""

from __future__ import annotations

import math

import pytest
import torch

import longreach
from longreach.nn import ALiBi


def press_closed_form(num_heads):
    """Press et al., closed form: p = largest power of two <= H; slopes 2^(-8h/p) for
    h = 1..p, then 2^(-4(2j+1)/p) for j = 0..H-p-1 (the odd slopes of 2p heads)."""
    p = 1 << (num_heads.bit_length() - 1)
    return [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)] + [2.0 ** (-4.0 * (2 * j + 1) / p) for j in range(num_heads - p)]


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 48, 64, 71, 96, 128])
def test_standard_slopes(num_heads):
    got = longreach.alibi_slopes(num_heads)
    assert got.dtype == torch.float32 and got.shape == (num_heads,)
    torch.testing.assert_close(got.double(), torch.tensor(press_closed_form(num_heads), dtype=torch.float64),
                               rtol=1e-7, atol=0)
    if num_heads & (num_heads - 1) == 0:
        want = torch.tensor([2.0 ** (-8.0 * h / num_heads) for h in range(1, num_heads + 1)], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("num_heads", [1, 3, 6, 8, 12, 16, 40, 71])
def test_standard_slopes_equal_bloom(num_heads):
    """BLOOM's build_alibi_tensor(mask) = slope * position; at position 1 it is the slope.
    BLOOM raises a float32-rounded base to integer powers in float32, so it sits up to tens
    of ulp from the exact slopes; ours are rounded once from float64, never farther."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)  # (H, 1, 2)
    bloom, ours = alibi[:, 0, 1], longreach.alibi_slopes(num_heads)
    torch.testing.assert_close(ours, bloom, rtol=1e-5, atol=0)  # BLOOM's error grows with the power
    exact = torch.tensor(press_closed_form(num_heads), dtype=torch.float64)
    assert ((ours.double() - exact).abs() <= (bloom.double() - exact).abs()).all()


@pytest.mark.parametrize("num_heads", [2, 4, 8, 10, 16, 32])
def test_balanced_slopes(num_heads):
    half = num_heads // 2
    want = [2.0 ** -k for k in range(1, half + 1)] + [-(2.0 ** -k) for k in range(1, half + 1)]
    got = longreach.alibi_slopes(num_heads, kind="balanced")
    assert got.tolist() == want  # powers of two are exact in float32
    assert (got[:half] > 0).all() and (got[half:] < 0).all()


@pytest.mark.parametrize("kind", ["standard", "balanced"])
@pytest.mark.parametrize("interpolation", [1.0, 2.0, 3.5, 16])
def test_interpolation_divides(kind, interpolation):
    base = longreach.alibi_slopes(8, kind).double()
    got = longreach.alibi_slopes(8, kind, interpolation)
    torch.testing.assert_close(got.double(), base / interpolation, rtol=1e-7, atol=0)


def test_module():
    module = ALiBi(6, kind="balanced", interpolation=2.0)
    assert torch.equal(module(), longreach.alibi_slopes(6, "balanced", 2.0))
    module.half()  # the op wants float32 whatever the module was cast to
    assert module().dtype == torch.float32
    assert "kind='balanced'" in repr(module)
    assert len(module.state_dict()) == 0  # derived from the config, not saved


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, r"num_heads must be a positive int, got 0"),
        ((True,), {}, r"num_heads must be a positive int, got True"),
        ((8,), {"kind": "swat"}, r"kind must be one of \('standard', 'balanced'\), got 'swat'"),
        ((7,), {"kind": "balanced"}, r"kind='balanced' needs an even num_heads \(half \+, half -\), got 7"),
        ((8,), {"interpolation": 0.5}, r"interpolation must be a number >= 1 .* got 0.5"),
        ((8,), {"interpolation": float("inf")}, r"interpolation must be a number >= 1 .* got inf"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        longreach.alibi_slopes(*args, **kwargs)


# ---------------------------------------------------------------------------
# Balanced heads reward distance in the attention op.


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_balanced_heads_reward_distance(score, device):
    """With q = 0 every raw score is 0, so a row's weights come from ALiBi alone; with v the
    identity, out[h, i, j] is the weight row i gives key j. Positive-slope heads must weigh
    nearer keys more, negative-slope heads farther keys more, exactly as the formula says."""
    heads, length, window = 4, 16, 8
    slopes = longreach.alibi_slopes(heads, "balanced").to(device)  # [1/2, 1/4, -1/2, -1/4]
    q = torch.zeros(1, heads, length, length, device=device)
    k = torch.randn(1, heads, length, length, device=device)
    v = torch.eye(length, device=device).expand(1, heads, length, length)
    out = longreach.local_attention(q, k, v, window=(window - 1, 0), causal=True, alibi_slopes=slopes, score=score)
    weights = out[0]  # (H, i, j)

    i = length - 1  # a row with a full window
    keys = torch.arange(i - window + 1, i + 1, device=device)
    distance = (i - keys).double()
    for h in range(heads):
        w = weights[h, i, keys].double()
        logits = -slopes[h].double() * distance
        want = torch.softmax(logits, 0) if score == "softmax" else torch.sigmoid(logits - math.log(window))
        torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)
        by_distance = w.flip(0)  # nearest key first
        if slopes[h] > 0:
            assert (by_distance[1:] < by_distance[:-1]).all(), f"head {h} should favour near keys"
        else:
            assert (by_distance[1:] > by_distance[:-1]).all(), f"head {h} should favour far keys"
            assert w[0] > w[-1]  # the farthest key in the window outweighs the query's own position
    assert torch.count_nonzero(weights[:, i, : i - window + 1]) == 0  # outside the window: nothing


# ---------------------------------------------------------------------------
# Learnable slopes: d loss / d slope = -sum over allowed pairs of dS * |p - j|.


def _slope_case(score, softcap, slope_shape, dtype=torch.float64):
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 90, 75, 6
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k, v = torch.randn(B, Hk, Lk, D, dtype=dtype), torch.randn(B, Hk, Lk, D, dtype=dtype)
    gm = torch.zeros(B, Lk, dtype=torch.bool)
    gm[0, ::11] = True
    slopes = (torch.randn(slope_shape) * 0.2).float()
    kw = dict(window=(7, 3), dilation=2, global_mask=gm, score=score, softcap=softcap)
    return q, k, v, slopes, kw


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("per_batch", [False, True], ids=["(H,)", "(B,H)"])
def test_learnable_slopes_get_the_reference_gradient(score, softcap, per_batch):
    q, k, v, slopes, kw = _slope_case(score, softcap, (2, 4) if per_batch else (4,))
    grad = torch.randn(q.shape, dtype=q.dtype)
    got_s = slopes.clone().requires_grad_()
    qq = q.clone().requires_grad_()
    out = longreach.local_attention(qq, k, v, alibi_slopes=got_s, **kw)
    g_q, g_s = torch.autograd.grad(out, (qq, got_s), grad)
    assert g_s.dtype == torch.float32 and g_s.shape == slopes.shape
    want_s = slopes.double().requires_grad_()
    qr = q.clone().requires_grad_()
    ref = longreach.reference.local_attention(qr, k, v, alibi_slopes=want_s, **kw)
    r_q, r_s = torch.autograd.grad(ref, (qr, want_s), grad)
    torch.testing.assert_close(g_s.double(), r_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_q, r_q, atol=1e-10, rtol=1e-10)


def test_learnable_slopes_gradcheck():
    """float64 slopes are not accepted by the op (float32 only), so gradcheck runs on a
    float64 wrapper that rounds them: the float32 gradient is checked against finite
    differences of the float64 attention, to float32 accuracy."""
    q, k, v, slopes, kw = _slope_case("softmax", 3.0, (4,))
    s = slopes.double().requires_grad_()
    f = lambda s: longreach.local_attention(q, k, v, alibi_slopes=s.float(), **kw)  # noqa: E731
    grad = torch.randn(q.shape, dtype=q.dtype)
    (analytic,) = torch.autograd.grad(f(s), s, grad)
    eps = 1e-3
    for h in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[h] = eps
        numeric = ((f(s + e) - f(s - e)) * grad).sum() / (2 * eps)
        assert abs(analytic[h].item() - numeric.item()) <= 2e-3 * max(1.0, abs(numeric.item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_learnable_slopes_in_low_precision(dtype):
    q, k, v, slopes, kw = _slope_case("softmax", None, (4,), dtype=dtype)
    s = slopes.clone().requires_grad_()
    out = longreach.local_attention(q, k, v, alibi_slopes=s, **kw)
    out.float().square().sum().backward()
    sr = slopes.double().requires_grad_()
    ref = longreach.reference.local_attention(q.double(), k.double(), v.double(), alibi_slopes=sr, **kw)
    ref.square().sum().backward()
    torch.testing.assert_close(s.grad.double(), sr.grad, atol=0.05 * sr.grad.abs().max().item(), rtol=0.05)


def test_frozen_slopes_cost_nothing_extra():
    """Without requires_grad the slopes get no gradient and the backward returns none."""
    q, k, v, slopes, kw = _slope_case("softmax", None, (4,))
    qq = q.clone().requires_grad_()
    longreach.local_attention(qq, k, v, alibi_slopes=slopes, **kw).sum().backward()
    assert slopes.grad is None and qq.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_slope_gradient_is_as_accurate_as_the_row_constant_allows(dtype):
    """dS is formed with dO . O of the rounded output; weighted by distances its error made the
    bfloat16 slope gradient 5.8% off here (plain bf16 PyTorch: 0.17%). The kernels correct the row
    constant from the probabilities (they sum to 1), so the gradient stays float32-accurate."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g).to(dtype) for n in (64, 9, 9))
    s = torch.tensor([0.3], requires_grad=True)
    out = longreach.local_attention(q, k, v, alibi_slopes=s)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    (got,) = torch.autograd.grad(out, s, grad)
    sd = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    ref = longreach.reference.local_attention(q.double(), k.double(), v.double(), alibi_slopes=sd)
    (want,) = torch.autograd.grad(ref, sd, grad.double())
    assert abs(got.item() - want.item()) <= 1e-3 * abs(want.item())
