"""key_padding_mask in the batched op, longreach.local_attention(..., key_padding_mask=) (issue 13, section 3).

PyTorch's convention: (B, Lk) bool, True = padding, any pattern (holes in the middle included).
A padded position holds no key (nor a global one), the other keys keep their positions, query
rows at padded positions return zeros (lse -inf, zero gradients), and the default sigmoid bias
counts each row's real keys. The oracles:

- longreach.reference.local_attention(..., key_padding_mask=) (the dense mask), over a seeded
  randomized grid of every feature crossed with padding patterns, forward (out, lse) and every
  gradient (q, k, v, learnable ALiBi slopes), float64;
- for contiguous padding (left, right, both, a static cache's unused tail), the slicing path of
  longreach.padding.local_attention_padded, which calls the op without a mask on each row's
  run of real keys: an independent computation of the same semantics;
- for holes, a dense SDPA-style computation written here from the boolean mask.

Also: the content of padded positions is never read into a result; gradcheck; opcheck;
torch.compile(fullgraph=True) with no recompilation when the mask's values change; float32,
bfloat16 and float16 against the float64 result; bad masks raise naming the argument.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import longreach
from longreach import reference
from longreach.padding import local_attention_padded
from attention_testing import grads, scaled_error
from testenv import extended_tests_enabled, skip_unsupported_dtype

DEFAULT_CASES = 300
EXTENDED_CASES = 3000
PATTERNS = ["none", "all", "holes", "sparse_holes", "left", "right", "both", "alternate", "one_row_empty"]


def padding_for(pattern: str, batch: int, k_len: int, rng: random.Random) -> torch.Tensor:
    pad = torch.zeros(batch, k_len, dtype=torch.bool)
    for b in range(batch):
        if pattern == "all":
            pad[b] = True
        elif pattern in ("holes", "sparse_holes"):
            p = 0.5 if pattern == "holes" else 0.1
            pad[b] = torch.tensor([rng.random() < p for _ in range(k_len)], dtype=torch.bool)
        elif pattern in ("left", "both"):
            pad[b, : rng.randint(0, k_len)] = True
        if pattern in ("right", "both"):
            pad[b, k_len - rng.randint(0, k_len - pad[b].sum().item()):] = True
        elif pattern == "alternate":
            pad[b, b % 2::2] = True
    if pattern == "one_row_empty":
        pad[-1] = True
    return pad


def draw_case(seed: int):
    rng = random.Random(seed)
    hk = rng.choice([1, 2])
    shape = dict(batch=rng.choice([1, 2, 3]), kv_heads=hk, q_heads=hk * rng.choice([1, 2]),
                 head_dim=rng.choice([4, 8, 16]))
    k_len = rng.choice([1, 2, 7, 33, 64, 65, 130, 200])
    q_len = rng.choice([k_len, k_len, max(1, k_len // 3), 1, k_len + 5])
    kw = dict(window=rng.choice([(None, None), (5, 0), (16, 3), (0, 0), (40, 40), (3, None)]),
              causal=rng.random() < 0.3, dilation=rng.choice([1, 1, 2, 3]),
              score=rng.choice(["softmax", "softmax", "sigmoid"]))
    if kw["score"] == "sigmoid" and rng.random() < 0.3:
        kw["sigmoid_bias"] = -1.5
    if rng.random() < 0.3:
        kw["global_mask"] = torch.tensor([[rng.random() < 0.1 for _ in range(k_len)] for _ in range(shape["batch"])])
    if rng.random() < 0.3:
        kw["alibi_slopes"] = torch.rand(shape["q_heads"] if rng.random() < 0.5 else (shape["batch"], shape["q_heads"]),
                                        dtype=torch.float32)
    if rng.random() < 0.2:
        kw["softcap"] = 5.0
    pattern = rng.choice(PATTERNS)
    pad = padding_for(pattern, shape["batch"], k_len, rng)
    return shape, q_len, k_len, kw, pattern, pad


def run_both(q, k, v, kw, pad, *, learn_slopes=False):
    """Output, lse and gradients of the op and the reference for one upstream gradient."""
    softmax = kw["score"] == "softmax"
    results = []
    for fn in (longreach.local_attention, reference.local_attention):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        kwargs = dict(kw)
        if learn_slopes and kwargs.get("alibi_slopes") is not None:
            kwargs["alibi_slopes"] = kwargs["alibi_slopes"].detach().clone().requires_grad_(True)
            inputs.append(kwargs["alibi_slopes"])
        res = fn(*inputs[:3], key_padding_mask=pad, return_lse=softmax, **kwargs)
        out, lse = res if softmax else (res, None)
        g = torch.Generator().manual_seed(7)
        go = torch.randn(out.shape, generator=g, dtype=out.dtype)
        outs, cots = [out], [go]
        if softmax:
            outs.append(lse)
            cots.append(torch.where(torch.isfinite(lse), torch.randn(lse.shape, generator=g, dtype=lse.dtype), 0.0))
        results.append((out, lse, grads(outs, cots, inputs)))
    return results


@pytest.mark.parametrize("seed", range(EXTENDED_CASES if extended_tests_enabled() else DEFAULT_CASES),
                         ids=lambda s: f"s{s}-")
def test_matches_reference_randomized(seed):
    shape, q_len, k_len, kw, pattern, pad = draw_case(seed)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape["batch"], shape["q_heads"], q_len, shape["head_dim"], dtype=torch.float64, generator=gen)
    k, v = (torch.randn(shape["batch"], shape["kv_heads"], k_len, shape["head_dim"], dtype=torch.float64,
                        generator=gen) for _ in range(2))
    (out, lse, g), (r_out, r_lse, r_g) = run_both(q, k, v, kw, pad, learn_slopes=True)
    what = f"{pattern} Lq={q_len} Lk={k_len} {kw}"
    assert scaled_error(out, r_out) < 1e-10, what
    if lse is not None:
        assert scaled_error(lse, r_lse) < 1e-10, what
    for name, a, b in zip(("dq", "dk", "dv", "dslopes"), g, r_g):
        tol = 1e-6 if name == "dslopes" else 1e-10  # the slope gradient is float32, as the slopes
        assert scaled_error(a, b) < tol, f"{name}: {what}"


def test_padded_rows_are_zero_with_zero_gradients():
    q, k, v = (torch.randn(2, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[0, 10:15] = True
    pad[1, ::3] = True
    out, lse = longreach.local_attention(q, k, v, window=(8, 8), key_padding_mask=pad, return_lse=True)
    rows = pad[:, None, :].expand(2, 2, 40)
    assert (out[rows] == 0).all() and torch.isinf(lse[rows]).all() and (lse[rows] < 0).all()
    assert (out[~rows].abs().sum(-1) > 0).all()
    dq, dk, dv = torch.autograd.grad((out ** 2).sum() + lse[~rows].sum(), (q, k, v))
    assert (dq[rows] == 0).all() and (dk[rows] == 0).all() and (dv[rows] == 0).all()


@pytest.mark.parametrize("kind", ["left", "right", "both", "one_row_empty"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("causal,window", [(True, (6, 0)), (False, (4, 3)), (True, (None, 0)), (False, (None, None))])
@pytest.mark.parametrize("q_len", [30, 1, 9])
def test_contiguous_padding_matches_slicing(kind, score, causal, window, q_len):
    """The slicing oracle (padding.py): each row's run of real keys as its own unmasked call."""
    batch, k_len = 4, 30
    pad = torch.zeros(batch, k_len, dtype=torch.bool)
    for b in range(batch):
        if kind in ("left", "both"):
            pad[b, : 3 * b] = True
        if kind in ("right", "both"):
            pad[b, k_len - 2 * b:] = True
    if kind == "one_row_empty":
        pad[1] = True
        pad[2, :5] = True
    q = torch.randn(batch, 4, q_len, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(batch, 2, k_len, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    slopes = torch.rand(4, dtype=torch.float32) * 0.2
    kw = dict(causal=causal, window=window, score=score, alibi_slopes=slopes, dilation=1)
    out = longreach.local_attention(q, k, v, key_padding_mask=pad, **kw)
    want = local_attention_padded(q, k, v, ~pad, **kw)
    # padding.py keeps query rows outside their row's run at zero, as the op does for padded rows;
    # with causal windows it also zeroes real rows after the run (their keys are cut): compare real rows.
    pos = torch.arange(q_len) + k_len - q_len
    real_row = ~pad[:, pos]  # (B, Lq)
    sel = real_row[:, None, :].expand(batch, 4, q_len)
    assert scaled_error(out[sel], want[sel]) < 1e-12
    assert (out[~sel] == 0).all()
    if not want.requires_grad:  # every query row padded
        return
    go = torch.randn_like(out) * sel[..., None]
    got_g = torch.autograd.grad(out, (q, k, v), go)
    want_g = torch.autograd.grad(want, (q, k, v), go)
    for name, a, b in zip("qkv", got_g, want_g):
        assert scaled_error(a, b) < 1e-12, name


def _dense_masked(q, k, v, pad, left, right, dilation, score):
    """Softmax or sigmoid over the band & real keys, written from the boolean mask (SDPA style);
    rows at padded positions zero."""
    q_len, k_len = q.shape[2], k.shape[2]
    pos = torch.arange(q_len) + k_len - q_len
    delta = torch.arange(k_len)[None, :] - pos[:, None]
    band = (delta % dilation == 0) & (delta // dilation >= -left) & (delta // dilation <= right)
    allowed = band[None] & ~pad[:, None, :] & ~pad[:, pos][:, :, None]  # (B, Lq, Lk)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if score == "softmax":
        w = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    else:
        n = (~pad).sum(1).clamp(max=left + right + 1).to(s.dtype)
        w = torch.sigmoid(s - torch.log(n)[:, None, None, None]) * allowed[:, None]
    return w @ v


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_holes_match_a_dense_masked_computation(score, dilation):
    batch, length = 3, 150
    pad = torch.rand(batch, length) < 0.3
    pad[0, 40:110] = True  # a long hole crossing blocks of 64 rows
    q, k, v = (torch.randn(batch, 2, length, 16, dtype=torch.float64) for _ in range(3))
    out = longreach.local_attention(q, k, v, window=(20, 5), dilation=dilation, score=score, key_padding_mask=pad)
    want = _dense_masked(q, k, v, pad, 20, 5, dilation, score)
    assert scaled_error(out, want) < 1e-12


def test_padded_content_is_never_read():
    """Huge values in padded q, k, v (and in padded global keys) change nothing."""
    batch, length = 2, 140
    pad = torch.rand(batch, length) < 0.25
    gm = torch.zeros(batch, length, dtype=torch.bool)
    gm[:, ::17] = True  # some of them padded
    q, k, v = (torch.randn(batch, 2, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kw = dict(window=(16, 16), global_mask=gm, key_padding_mask=pad)
    out = longreach.local_attention(q, k, v, **kw)
    sel = pad[:, None, :, None].expand_as(q)
    q2, k2, v2 = (torch.where(sel, 1e6, t.detach()).requires_grad_(True) for t in (q, k, v))
    out2 = longreach.local_attention(q2, k2, v2, **kw)
    assert torch.equal(out, out2)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(out2, (q2, k2, v2), go)):
        assert torch.equal(a, b)


def test_an_all_false_mask_is_the_unpadded_op():
    q, k, v = (torch.randn(2, 2, 100, 8) for _ in range(3))
    pad = torch.zeros(2, 100, dtype=torch.bool)
    for score in ("softmax", "sigmoid"):
        a = longreach.local_attention(q, k, v, window=(10, 0), score=score)
        b = longreach.local_attention(q, k, v, window=(10, 0), score=score, key_padding_mask=pad)
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_against_float64(device, dtype):
    skip_unsupported_dtype(device, dtype)
    pad = torch.rand(2, 200) < 0.3
    q, k, v = (torch.randn(2, 4, 200, 32, dtype=torch.float64) for _ in range(3))
    want = longreach.local_attention(q, k, v, window=(50, 0), causal=True, key_padding_mask=pad)
    got = longreach.local_attention(*(t.to(device, dtype) for t in (q, k, v)), window=(50, 0), causal=True,
                                    key_padding_mask=pad.to(device))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    assert scaled_error(got.cpu(), want) < tol


def test_gradcheck():
    pad = torch.tensor([[0, 1, 0, 0, 1, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    q, k, v = (torch.randn(2, 2, 10, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2, 2, dtype=torch.float64).float().requires_grad_(False)
    for score in ("softmax", "sigmoid"):
        def f(q, k, v):
            return longreach.local_attention(q, k, v, window=(3, 2), score=score, alibi_slopes=slopes,
                                             key_padding_mask=pad)
        assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck():
    pad = torch.rand(2, 24) < 0.3
    q, k, v = (torch.randn(2, 2, 24, 8, requires_grad=True) for _ in range(3))
    args = (q, k, v, None, None, 5, 0, 1, "softmax", None, 0.0, 8 ** -0.5, pad)
    torch.library.opcheck(torch.ops.longreach.local_attention_fwd.default, args)


def test_compile_fullgraph_without_recompiling_for_new_masks():
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 48, 8, requires_grad=True) for _ in range(3))

    def step(q, k, v, pad):
        return longreach.local_attention(q, k, v, window=(6, 0), causal=True, key_padding_mask=pad).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for trial in range(3):
            pad = torch.rand(2, 48) < 0.3
            loss = compiled(q, k, v, pad)
            (dq,) = torch.autograd.grad(loss, q)
            want = step(q, k, v, pad)
            (want_dq,) = torch.autograd.grad(want, q)
            assert torch.allclose(loss, want) and torch.allclose(dq, want_dq)


@pytest.mark.parametrize("mask,match", [
    (torch.zeros(2, 5, dtype=torch.bool), r"key_padding_mask must have shape \(B, Lk\) = \(2, 6\), got \[2, 5\]"),
    (torch.zeros(6, dtype=torch.bool), r"key_padding_mask must have shape \(B, Lk\) = \(2, 6\), got \[6\]"),
    (torch.zeros(2, 6), r"key_padding_mask must be a bool tensor, got torch.float32"),
    ([[False] * 6] * 2, r"key_padding_mask must be a bool tensor of shape \(B, Lk\) or None, got"),
])
def test_bad_masks_are_rejected(mask, match):
    q = torch.randn(2, 2, 6, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        longreach.local_attention(q, q, q, key_padding_mask=mask)


def test_a_mask_on_another_device_is_rejected():
    q = torch.randn(2, 2, 6, 4)
    with pytest.raises(ValueError, match=r"key_padding_mask is on meta but q is on cpu"):
        longreach.local_attention(q, q, q, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device="meta"))
