"""longreach.local_attention against torch.nn.functional.scaled_dot_product_attention,
an oracle that shares no code with longreach: unbounded and causal windows
(bottom-right alignment for Lq < Lk via an explicit mask), GQA through
enable_gqa or repeated kv heads, and sliding / dilated windows, global tokens
and ALiBi expressed as SDPA masks. Forward and backward, float64 and float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longreach
from attention_testing import (
    assert_close,
    dense_allowed_mask,
    grads,
    precise_dtype,
    random_qkv,
    standard_alibi_slopes,
    tight_tolerance,
)
from testenv import skip_unsupported_dtype

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
HEADS = [(4, 4), (4, 2), (4, 1)]
LENGTHS = [(37, 37), (13, 50), (1, 29)]  # Lq = Lk, Lq < Lk, one decoding step


def sdpa(q, k, v, *, gqa_via, **kwargs):
    """SDPA with kv heads shared by query-head groups, either natively or by repeating them."""
    group = q.shape[1] // k.shape[1]
    if gqa_via == "enable_gqa":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1, **kwargs)
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), **kwargs
    )


def compare_fwd_bwd(device, dtype, shapes, ours, theirs):
    """Run both callables on the same leaves; compare outputs and dq, dk, dv."""
    skip_unsupported_dtype(device, dtype)
    q, k, v = random_qkv(*shapes, dtype, device)
    a_in = [t.clone().requires_grad_() for t in (q, k, v)]
    b_in = [t.clone().requires_grad_() for t in (q, k, v)]
    a, b = ours(*a_in), theirs(*b_in)
    assert_close(a, b, TOL[dtype], "out")
    g = torch.randn_like(b)
    for name, ga, gb in zip(("dq", "dk", "dv"), grads([a], [g], a_in), grads([b], [g], b_in)):
        assert_close(ga, gb, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gqa_via", ["enable_gqa", "repeat"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda t: f"L{t[0]}x{t[1]}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}x{h[1]}")
def test_unbounded_equals_sdpa(heads, lengths, gqa_via, dtype, device):
    shapes = (2, *heads, *lengths, 32)
    compare_fwd_bwd(
        device, dtype, shapes,
        lambda q, k, v: longreach.local_attention(q, k, v),
        lambda q, k, v: sdpa(q, k, v, gqa_via=gqa_via),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gqa_via", ["enable_gqa", "repeat"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda t: f"L{t[0]}x{t[1]}")
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}x{h[1]}")
def test_causal_equals_sdpa_bottom_right(heads, lengths, gqa_via, dtype, device):
    q_len, k_len = lengths
    # SDPA's is_causal aligns top-left, so for Lq < Lk write the bottom-right
    # mask out: row i sees keys j <= i + Lk - Lq.
    rows = torch.arange(q_len)[:, None] + (k_len - q_len)
    mask = (torch.arange(k_len)[None, :] <= rows).to(device)
    if q_len == k_len:  # there the two alignments agree and SDPA's own flag works
        sdpa_kwargs = dict(is_causal=True)
    else:
        sdpa_kwargs = dict(attn_mask=mask)
    shapes = (2, *heads, *lengths, 32)
    compare_fwd_bwd(
        device, dtype, shapes,
        lambda q, k, v: longreach.local_attention(q, k, v, causal=True),
        lambda q, k, v: sdpa(q, k, v, gqa_via=gqa_via, **sdpa_kwargs),
    )


def test_unbounded_window_forms_agree(device):
    """None, a window wider than the sequence and (None, None) with causal=False are one thing."""
    dtype = precise_dtype(device)
    q, k, v = random_qkv(1, 4, 2, 20, 30, 16, dtype, device)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    for window in [None, (None, None), (30, 30), (10**9, 10**9)]:
        got = longreach.local_attention(q, k, v, window=window)
        assert_close(got, want, tight_tolerance(dtype), f"window={window}")


@pytest.mark.parametrize(
    "window,causal,dilation",
    [((7, 0), True, 1), ((4, 4), False, 1), ((3, 2), False, 3), ((5, None), False, 2), ((None, 2), False, 1)],
    ids=str,
)
@pytest.mark.parametrize("lengths", [(40, 40), (17, 45)], ids=lambda t: f"L{t[0]}x{t[1]}")
def test_window_equals_sdpa_with_band_mask(window, causal, dilation, lengths, device):
    """Sliding and dilated windows as an explicit SDPA boolean mask (HF sliding_window=8
    is window=(7, 0), causal=True)."""
    left, right = window
    mask = dense_allowed_mask(*lengths, left, 0 if causal else right, dilation).to(device)
    compare_fwd_bwd(
        device, precise_dtype(device), (2, 4, 2, *lengths, 16),
        lambda q, k, v: longreach.local_attention(q, k, v, window=window, causal=causal, dilation=dilation),
        lambda q, k, v: sdpa(q, k, v, gqa_via="enable_gqa", attn_mask=mask),
    )


@pytest.mark.parametrize("lengths", [(40, 40), (17, 45)], ids=lambda t: f"L{t[0]}x{t[1]}")
def test_global_tokens_equal_sdpa_mask(lengths, device):
    """Global keys are seen by every row; a row whose position is global sees every key."""
    q_len, k_len = lengths
    gmask = torch.zeros(2, k_len, dtype=torch.bool)
    gmask[0, [0, 5, k_len - 1]] = True
    gmask[1, [k_len - 3]] = True
    band = dense_allowed_mask(q_len, k_len, 2, 2, 1)
    mask = band[None].repeat(2, 1, 1)
    for b in range(2):
        for i in range(q_len):
            p = i + k_len - q_len
            mask[b, i] |= gmask[b]
            if gmask[b, p]:
                mask[b, i] = True
    mask, gmask = mask[:, None].to(device), gmask.to(device)
    compare_fwd_bwd(
        device, precise_dtype(device), (2, 4, 4, q_len, k_len, 16),
        lambda q, k, v: longreach.local_attention(q, k, v, window=(2, 2), global_mask=gmask),
        lambda q, k, v: sdpa(q, k, v, gqa_via="enable_gqa", attn_mask=mask),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["standard", "negated"])
def test_alibi_equals_sdpa_additive_bias(causal, sign, device):
    """ALiBi subtracts slope_h * |p(i) - j| from every score (full offset, both sides)."""
    q_len, k_len, heads = 19, 31, 4
    slopes = sign * standard_alibi_slopes(heads)
    pos = torch.arange(q_len)[:, None] + (k_len - q_len)
    distance = (pos - torch.arange(k_len)[None, :]).abs().to(torch.float64)
    bias = -slopes.to(torch.float64)[:, None, None] * distance  # (H, Lq, Lk)
    if causal:
        bias = bias.masked_fill(torch.arange(k_len)[None, None, :] > pos[None], float("-inf"))
    dtype = precise_dtype(device)
    bias, slopes = bias.to(device=device, dtype=dtype), slopes.to(device)
    compare_fwd_bwd(
        device, dtype, (2, heads, 2, q_len, k_len, 16),
        lambda q, k, v: longreach.local_attention(q, k, v, causal=causal, alibi_slopes=slopes),
        lambda q, k, v: sdpa(q, k, v, gqa_via="enable_gqa", attn_mask=bias),
    )


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_custom_scale_equals_sdpa(scale, device):
    compare_fwd_bwd(
        device, precise_dtype(device), (1, 4, 1, 23, 23, 80),
        lambda q, k, v: longreach.local_attention(q, k, v, causal=True, scale=scale),
        lambda q, k, v: sdpa(q, k, v, gqa_via="enable_gqa", is_causal=True, scale=scale),
    )
