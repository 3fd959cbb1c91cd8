"""Attention dropout (dropout_p) of local_attention and local_attention_varlen, CPU.

Oracles: longreach.reference with the keep mask that longreach.dropout.keep_mask computes
from the same (seed, offset) with torch integer ops (an independent Philox4x32-10), and
plain statistics (keep rate, the mean over many seeds against the op without dropout)."""

import pytest
import torch

import longreach
from longreach import reference
from longreach.dropout import draw_seed, keep_mask, philox4x32_10


def _qkv(B=2, Hq=4, Hk=2, Lq=37, Lk=41, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=dtype) for h, L in ((Hq, Lq), (Hk, Lk), (Hk, Lk))]


def _op_and_seed(fn, *args, **kwargs):
    """fn(...) with dropout, and the (seed, offset) it drew (the generator is restored and redrawn)."""
    state = torch.get_rng_state()
    seed = draw_seed()
    torch.set_rng_state(state)
    return fn(*args, **kwargs), seed


def test_philox_known_answer():
    # Random123's known-answer vectors for philox4x32_10 (kat_vectors): the Python Philox is right,
    # the kernels' (csrc/common/philox.h) are compared with it below.
    ones = [torch.tensor([0xFFFFFFFF])] * 4
    assert [int(t) for t in philox4x32_10(ones, 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    zeros = [torch.tensor([0])] * 4
    assert [int(t) for t in philox4x32_10(zeros, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


CASES = [
    dict(),
    dict(window=(5, 3), dilation=2),
    dict(window=(4, 0), causal=True, alibi_slopes=torch.rand(4, dtype=torch.float32)),
    dict(score="sigmoid", window=(6, 6)),
    dict(window=(3, 3), global_mask=torch.rand(2, 41) < 0.2, softcap=5.0),
    dict(sinks=torch.randn(4, dtype=torch.float64), sink_tokens=2, window=(4, 0), causal=True),
    # three chunk grids (one call per grid, a GQA kv head split across two): the mask stays the
    # whole call's, keyed by each head's index in it
    dict(window=(8, 0), causal=True, chunk=6, chunk_shift=torch.tensor([0, 3, 0, 4])),
]

SEVERAL_GRIDS = dict(chunk=7, chunk_shift=torch.tensor([0, 3, 3, 5]))


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_equals_reference_with_the_same_mask(options):
    q, k, v = _qkv()
    p = 0.3
    out, seed = _op_and_seed(longreach.local_attention, q, k, v, dropout_p=p, **options)
    mask = keep_mask(seed, p, 2, 4, 37, 41)
    expected = reference.local_attention(q, k, v, dropout_mask=mask, dropout_p=p, **options)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # the mask matters: without it the result differs
    assert not torch.allclose(out, reference.local_attention(q, k, v, **options))


@pytest.mark.parametrize("chunks", [{}, SEVERAL_GRIDS], ids=["one_grid", "several_chunk_grids"])
def test_gradients_equal_reference_with_the_same_mask(chunks):
    q, k, v = (t.requires_grad_() for t in _qkv(Lq=70, Lk=70))
    p = 0.25
    torch.manual_seed(5)
    out, lse = longreach.local_attention(q, k, v, window=(9, 2), dropout_p=p, return_lse=True, **chunks)
    torch.manual_seed(5)
    mask = keep_mask(draw_seed(), p, 2, 4, 70, 70)
    ref_out, ref_lse = reference.local_attention(q, k, v, window=(9, 2), dropout_mask=mask, dropout_p=p,
                                                 return_lse=True, **chunks)
    torch.testing.assert_close(lse, ref_lse)  # lse is not affected by dropout
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * go).sum() + (ref_lse * gl).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradcheck_fixed_seed(score):
    """The backward regenerates the forward's mask: with the generator reset before every
    call, the op is a fixed function and float64 gradcheck holds."""
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, Hq=2, Hk=1, Lq=9, Lk=11, D=4))

    def f(q, k, v):
        torch.manual_seed(1234)
        return longreach.local_attention(q, k, v, window=(3, 2), score=score, dropout_p=0.4)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("chunks", [{}, SEVERAL_GRIDS], ids=["one_grid", "several_chunk_grids"])
def test_varlen_equals_reference_per_sequence(chunks):
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [5, 0, 33, 20], [9, 4, 33, 20]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    p = 0.5
    out, seed = _op_and_seed(longreach.local_attention_varlen, q, k, v, cu_q, cu_k, 33, 33, window=(6, 1),
                             dropout_p=p, **chunks)
    pieces = []
    for i in range(4):
        rows, keys = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        one = [t.transpose(0, 1)[None] for t in (q[rows], k[keys], v[keys])]
        mask = keep_mask(seed, p, 4, 4, lens_q[i], lens_k[i])[i:i + 1]  # batch index = the sequence
        pieces.append(reference.local_attention(*one, window=(6, 1), dropout_mask=mask, dropout_p=p, **chunks)[0]
                      .transpose(0, 1))
    expected = torch.cat(pieces)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * go).sum(), (q, k, v)),
                    torch.autograd.grad((expected * go).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_keep_rate_and_mean_over_seeds():
    q, k, v = _qkv(B=1, Hq=2, Hk=2, Lq=64, Lk=64, D=8)
    p = 0.2
    mask = keep_mask(torch.tensor([123, 456]), p, 4, 8, 128, 128)
    assert abs(mask.double().mean().item() - (1 - p)) < 0.005  # 524288 draws: 6 standard deviations
    plain = longreach.local_attention(q, k, v, window=(7, 7))
    torch.manual_seed(0)
    n = 400
    mean = sum(longreach.local_attention(q, k, v, window=(7, 7), dropout_p=p) for _ in range(n)) / n
    # Unbiased: E[out] = out without dropout. Per-element spread of one draw is O(|v|) / sqrt(15 keys).
    assert (mean - plain).abs().mean() < 0.02
    assert (mean - plain).abs().max() < 0.15


def test_deterministic_across_thread_counts():
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, Hq=4, Hk=4, Lq=200, Lk=200, D=16, dtype=torch.float32))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            out = longreach.local_attention(q, k, v, window=(31, 31), dropout_p=0.3)
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_p_zero_is_the_op_without_dropout():
    q, k, v = _qkv(dtype=torch.float32)
    state = torch.get_rng_state()
    out = longreach.local_attention(q, k, v, window=(5, 5), dropout_p=0.0)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    assert torch.equal(out, longreach.local_attention(q, k, v, window=(5, 5)))


def test_p_one_gives_zeros():
    q, k, v = (t.requires_grad_() for t in _qkv())
    out, lse = longreach.local_attention(q, k, v, window=(5, 5), dropout_p=1.0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, longreach.local_attention(q, k, v, window=(5, 5), return_lse=True)[1])
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_same_generator_state_same_result():
    q, k, v = _qkv()
    torch.manual_seed(11)
    a = longreach.local_attention(q, k, v, dropout_p=0.5)
    b = longreach.local_attention(q, k, v, dropout_p=0.5)  # the generator moved on: another mask
    torch.manual_seed(11)
    assert torch.equal(a, longreach.local_attention(q, k, v, dropout_p=0.5))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                        ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_p(bad, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="dropout_p"):
        longreach.local_attention(q, k, v, dropout_p=bad)


def test_bad_p_in_the_op_itself():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout_p must be in"):
        torch.ops.longreach.local_attention_fwd(q, k, v, None, None, -1, -1, 1, "softmax", None, 0.0, 0.5,
                                                dropout_p=2.0, dropout_seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dropout_seed"):
        torch.ops.longreach.local_attention_fwd(q, k, v, None, None, -1, -1, 1, "softmax", None, 0.0, 0.5,
                                                dropout_p=0.5)


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=torch.float32))
    f = torch.compile(lambda q, k, v: longreach.local_attention(q, k, v, window=(4, 4), dropout_p=0.3),
                      fullgraph=True, backend="aot_eager")
    out = f(q, k, v)
    out.sum().backward()
    kept = out != 0
    assert 0 < kept.float().mean() <= 1 and torch.isfinite(q.grad).all()
