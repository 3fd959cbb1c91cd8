"""Sink tokens (StreamingLLM), learnable sinks (gpt-oss) and causal global tokens in the
training ops (docs/semantics.md), against the dense reference and transformers' gpt_oss math."""

from __future__ import annotations

import itertools

import pytest
import torch

import longreach
from longreach import reference

OPS = torch.ops.longreach


def _finite(t):
    return torch.nan_to_num(t, neginf=-1e4)


def _run(fn, q, k, v, sinks, **kw):
    out, lse = fn(q, k, v, sinks=sinks, return_lse=True, **kw)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    gl = torch.randn(lse.shape, dtype=lse.dtype, generator=torch.Generator().manual_seed(2))
    loss = (out * g).sum() + (torch.where(torch.isfinite(lse), lse, 0) * gl).sum()
    ins = [t for t in (q, k, v, sinks) if t is not None]
    return out, lse, torch.autograd.grad(loss, ins)


CASES = list(itertools.product(
    [(5, 40), (40, 40), (70, 33)],  # (Lq, Lk): prefix, square, Lq > Lk
    [(3, 0, True), (2, 2, False), (None, 0, True)],  # window and causal
    [1, 2],  # dilation
    [False, True],  # global tokens
    [0, 3],  # sink_tokens
    [False, True],  # sinks
    [False, True],  # key padding
))


@pytest.mark.parametrize("shape,win,dilation,glob,n_sink,with_sinks,pad", CASES[::3])
def test_dense_float64_vs_reference(shape, win, dilation, glob, n_sink, with_sinks, pad):
    lq, lk = shape
    b, h, hk, d = 2, 4, 2, 8
    g = torch.Generator().manual_seed(hash((shape, win, dilation, glob, n_sink, with_sinks, pad)) % 2**31)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(b, h, lq, d), mk(b, hk, lk, d), mk(b, hk, lk, d)
    sinks = mk(h) if with_sinks else None
    kw = dict(window=win[:2], causal=win[2], dilation=dilation, sink_tokens=n_sink,
              global_mask=(torch.rand(b, lk, generator=g) < 0.15) if glob else None,
              key_padding_mask=(torch.rand(b, lk, generator=g) < 0.2) if pad else None,
              alibi_slopes=torch.tensor([0.1, -0.2, 0.3, 0.05]) if dilation == 2 else None,
              softcap=5.0 if n_sink else None)
    o, lse, grads = _run(longreach.local_attention, q, k, v, sinks, **kw)
    ro, rlse, rgrads = _run(reference.local_attention, q, k, v, sinks, **kw)
    torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(_finite(lse), _finite(rlse), atol=1e-10, rtol=1e-10)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_low_precision(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 100, 16, dtype=dtype) for _ in range(3))
    sinks = torch.randn(4, dtype=dtype)
    kw = dict(window=(7, 0), causal=True, sink_tokens=4, global_mask=torch.rand(1, 100) < 0.05)
    out = longreach.local_attention(q, k, v, sinks=sinks, **kw)
    ref = reference.local_attention(q.double(), k.double(), v.double(), sinks=sinks.double(), **kw)
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_varlen_vs_reference():
    torch.manual_seed(0)
    lens_q, lens_k = [5, 0, 30, 12], [20, 7, 30, 3]
    cq = torch.tensor([0] + list(itertools.accumulate(lens_q)))
    ck = torch.tensor([0] + list(itertools.accumulate(lens_k)))
    mk = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v, sinks = mk(cq[-1], 4, 8), mk(ck[-1], 2, 8), mk(ck[-1], 2, 8), mk(4)
    for causal, glob in ((True, True), (False, True), (True, False)):
        kw = dict(window=(4, 0 if causal else 1), causal=causal, sink_tokens=2, dilation=2,
                  global_mask=(torch.rand(ck[-1]) < 0.2) if glob else None)
        fn = lambda *a, **x: longreach.local_attention_varlen(*a[:3], cq, ck, 30, 30, **x)  # noqa: E731
        rf = lambda *a, **x: reference.local_attention_varlen(*a[:3], cq, ck, **x)  # noqa: E731
        o, lse, grads = _run(fn, q, k, v, sinks, **kw)
        ro, rlse, rgrads = _run(rf, q, k, v, sinks, **kw)
        torch.testing.assert_close(o, ro, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(_finite(lse), _finite(rlse), atol=1e-10, rtol=1e-10)
        for a, r in zip(grads, rgrads):
            torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


def test_causal_globals_do_not_leak_the_future():
    """A causal output row must not change when a later key changes, globals included."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))
    gm = torch.zeros(1, 50, dtype=torch.bool)
    gm[0, [3, 20, 45]] = True
    out = longreach.local_attention(q, k, v, window=(4, 0), causal=True, global_mask=gm, sink_tokens=2)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] += 1.0
    v2[:, :, 30:] += 1.0
    out2 = longreach.local_attention(q, k2, v2, window=(4, 0), causal=True, global_mask=gm, sink_tokens=2)
    torch.testing.assert_close(out[:, :, :30], out2[:, :, :30], atol=0, rtol=0)
    # bidirectional (causal=False) globals still see and are seen by every position
    mask = reference.allowed_keys(50, 50, (4, 0), False, 1, gm)
    assert mask[0, 10, 45] and mask[0, 20, 49]


def test_sinks_match_gpt_oss_eager_math():
    """transformers' gpt_oss eager_attention_forward: concatenate the sink logit column, softmax, drop it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(4, dtype=torch.float64)
    scale = 8 ** -0.5
    w = q @ k.transpose(-1, -2) * scale
    w = w + torch.full((12, 12), float("-inf"), dtype=torch.float64).triu(1)
    logits = torch.cat([w, sinks.reshape(1, -1, 1, 1).expand(2, -1, 12, 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    expected = probs @ v
    out = longreach.local_attention(q, k, v, causal=True, sinks=sinks)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_sinks_gradcheck_and_dtype():
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_()  # noqa: E731
    q, k, v, sinks = mk(1, 2, 9, 4), mk(1, 1, 12, 4), mk(1, 1, 12, 4), mk(2)
    gm = torch.zeros(1, 12, dtype=torch.bool)
    gm[0, 6] = True

    def f(q, k, v, sinks):
        out, lse = longreach.local_attention(q, k, v, window=(2, 0), causal=True, sink_tokens=2, global_mask=gm,
                                             sinks=sinks, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
    # the gradient comes back in sinks' dtype (gpt-oss keeps them in the model dtype)
    s16 = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    longreach.local_attention(q.detach().float(), k.detach().float(), v.detach().float(), sinks=s16).sum().backward()
    assert s16.grad.dtype == torch.bfloat16 and s16.grad.shape == (2,)


def test_rows_without_keys_have_the_sink_lse():
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    sinks = torch.tensor([0.5, -1.0])
    out, lse = longreach.local_attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert (out[:, :, :3] == 0).all()  # rows at negative positions (Lq > Lk)
    torch.testing.assert_close(lse[0, :, :3], sinks[:, None].expand(2, 3))
    out, lse = longreach.local_attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)
    assert (out == 0).all() and torch.equal(lse[0], sinks[:, None].expand(2, 6))


def test_compile_fullgraph_with_sinks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, requires_grad=True)

    def f(q, k, v, sinks):
        return longreach.local_attention(q, k, v, window=(4, 0), causal=True, sink_tokens=2, sinks=sinks).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g1 = torch.autograd.grad(f(q, k, v, sinks), (q, k, v, sinks))
    g2 = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case,error", [
    (dict(sinks=torch.zeros(3)), ValueError),
    (dict(sinks=torch.zeros(4, dtype=torch.int64)), TypeError),
    (dict(sinks=torch.zeros(4), score="sigmoid"), ValueError),
    (dict(sink_tokens=-1), ValueError),
])
def test_errors_agree(case, error):
    q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(error, match="sink"):
        longreach.local_attention(q, k, v, **case)
    score = case.get("score", "softmax")
    with pytest.raises(error, match="sink"):
        OPS.local_attention_fwd(q, k, v, None, None, -1, -1, 1, score, None, 0.0, 0.3, None, False,
                                case.get("sink_tokens", 0), case.get("sinks"))


def test_local_self_attention_sinks():
    torch.manual_seed(0)
    m = longreach.nn.LocalSelfAttention(32, 4, window=8, sink_tokens=2, learnable_sinks=True, positional=None)
    assert isinstance(m.sinks, torch.nn.Parameter) and m.sinks.shape == (4,)
    with torch.no_grad():
        m.sinks.normal_()
    x = torch.randn(2, 20, 32)
    m(x).square().sum().backward()
    assert m.sinks.grad is not None and m.sinks.grad.abs().sum() > 0
    plain = longreach.nn.LocalSelfAttention(32, 4, window=8, positional=None)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "sinks"})
    assert not torch.allclose(plain(x), m(x))
    with pytest.raises(ValueError, match="learnable_sinks"):
        longreach.nn.LocalSelfAttention(32, 4, window=8, score="sigmoid", learnable_sinks=True)
