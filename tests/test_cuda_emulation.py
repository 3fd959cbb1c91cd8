"""The CUDA attention kernels, run on the host (tests/emulation/), against the
CPU kernels and the reference: the GPU tests' configurations and tolerances,
checked without a GPU.

What this covers: the CUDA kernels' tile schedule, masks (window, dilation,
global rows and keys), online softmax, sigmoid, ALiBi, soft-capping, lse and
both backward passes, and the rounding of P and dS to the input dtype before
the tile products, exactly as the CUDA code does them, through the 16-byte
load path (a memcpy with an alignment check on the host) and with the WMMA
products' preconditions checked (block_ops.cuh: check_wmma_operands). The real
thread layout runs in tests/test_cuda_threaded_emulation.py; the tensor-core
products themselves need a GPU (tests/test_cuda.py).

Building the emulation takes a minute or two, so these tests run only with
LONGREACH_CUDA_EMULATION=1 (the CUDA step of .ci/run sets it) or
LONGREACH_EXTENDED_TESTS=1.
"""

from __future__ import annotations

import os

import pytest
import torch

import longreach
from longreach import reference
from testenv import extended_tests_enabled
from test_cuda import CONFIGS, TOL, _make_inputs, _run

pytestmark = pytest.mark.skipif(
    not (os.environ.get("LONGREACH_CUDA_EMULATION", "") not in ("", "0") or extended_tests_enabled()),
    reason="set LONGREACH_CUDA_EMULATION=1 to build and run the host emulation of the CUDA kernels",
)


@pytest.fixture(scope="module")
def emulation():
    import cuda_emulation

    return cuda_emulation.load()


def _op_args(q, kw):
    window = kw.get("window", (None, None))
    left, right = longreach.ops.normalize_window(window, kw.get("causal", False))
    softcap = kw.get("softcap")
    return (
        kw.get("global_mask"),
        kw.get("alibi_slopes"),
        left,
        right,
        kw.get("dilation", 1),
        kw.get("score", "softmax"),
        kw.get("sigmoid_bias"),
        0.0 if softcap is None else float(softcap),
        q.shape[-1] ** -0.5,
    )


def _emulated_run(emulation, q, k, v, kw, grad_seed=1):
    """What tests/test_cuda.py's _run computes, with the emulated kernels."""
    args = _op_args(q, kw)
    out, lse = emulation.fwd(q, k, v, *args)
    softmax = kw.get("score", "softmax") == "softmax"
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(out)
    grad_lse = torch.where(torch.isfinite(lse), 0.1, 0.0).float() if softmax else None
    dq, dk, dv, *_ = emulation.bwd(grad, grad_lse, q, k, v, out, lse, *args)
    return out, (lse if softmax else None), dq, dk, dv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name,kwargs,shape", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_emulated_cuda_kernels_match_cpu(emulation, name, kwargs, shape, dtype):
    _check_against_cpu(emulation, name, kwargs, shape, dtype)


# GQA / MQA configurations: (B, Hq, Hk, Lq, Lk, D) with Hq > Hk.
GQA_CONFIGS = [c for c in CONFIGS if c[2][1] > c[2][2]]


@pytest.mark.parametrize("split", ["0", "1"], ids=["dkv_per_kv_head", "dkv_per_query_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name,kwargs,shape", GQA_CONFIGS, ids=[c[0] for c in GQA_CONFIGS])
def test_emulated_cuda_gqa_dkv_schedules_match_cpu(emulation, monkeypatch, name, kwargs, shape, dtype, split):
    """Both dK/dV schedules of GQA / MQA (attention_entry.h dkv_split_by_query_head): a block
    per kv head summing its group in shared memory, and a block per query head whose float32
    parts are summed afterwards, forced with LONGREACH_CUDA_DKV_SPLIT (left alone, these small
    grids take the split: the emulation assumes 132 SMs)."""
    assert len(GQA_CONFIGS) >= 3
    monkeypatch.setenv("LONGREACH_CUDA_DKV_SPLIT", split)
    _check_against_cpu(emulation, name, kwargs, shape, dtype)


def _check_against_cpu(emulation, name, kwargs, shape, dtype):
    q, k, v, kw = _make_inputs(shape, kwargs, dtype, "cpu")
    got = _emulated_run(emulation, q, k, v, kw)
    want = _run(q.float(), k.float(), v.float(), kw)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if a is None:
            continue
        if label == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b)), "empty rows must match"
            a, b = a[torch.isfinite(a)], b[torch.isfinite(b)]
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **TOL[dtype], msg=f"{name} {label}")


@pytest.mark.parametrize(
    "q_len,k_len,window,causal,dilation,every",
    [
        (37, 53, (5, 3), False, 1, None),
        (53, 37, (7, 0), False, 3, 5),  # bidirectional globals: causal ones are CPU-only so far (issue 14)
        (1, 40, (None, None), False, 2, 7),
        (90, 30, (4, 0), True, 1, None),  # rows at negative positions see nothing
        (9, 8, (0, 0), False, 1, 6),  # Lq > Lk with global keys (issue 12: the CPU backward's dK/dV were wrong)
        (150, 40, (2, 1), False, 2, 9),
        (64, 64, (0, 0), False, 4, 9),
        (70, 70, (2, None), False, 3, 4),
    ],
)
def test_emulated_cuda_kernels_match_reference_in_float32(emulation, q_len, k_len, window, causal, dilation, every):
    B, Hq, Hk, D = 2, 4, 2, 24
    q, k, v = torch.randn(B, Hq, q_len, D), torch.randn(B, Hk, k_len, D), torch.randn(B, Hk, k_len, D)
    kw = dict(window=window, causal=causal, dilation=dilation)
    if every:
        gm = torch.zeros(B, k_len, dtype=torch.bool)
        gm[0, ::every] = True
        gm[1, 3] = True
        kw["global_mask"] = gm
    for extra in (dict(), dict(alibi_slopes=torch.randn(B, Hq) * 0.3, softcap=4.0), dict(score="sigmoid")):
        args = _op_args(q, {**kw, **extra})
        out, lse = emulation.fwd(q, k, v, *args)
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        ref = reference.local_attention(qr, kr, vr, **kw, **extra)
        torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-5)
        go = torch.randn_like(out)
        dq, dk, dv, *_ = emulation.bwd(go, None, q, k, v, out, lse, *args)
        for got, want in zip((dq, dk, dv), torch.autograd.grad(ref, (qr, kr, vr), go.double())):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("where", ["q", "k"])
def test_emulated_cuda_kernels_give_nan_rows_for_nan_inputs(emulation, score, where):
    """A NaN score makes its row NaN (the running max used to drop it: zeros)."""
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    (q if where == "q" else k)[0, 1, 17, 2] = float("nan")
    kw = dict(window=(2, 3), score=score)
    out, lse = emulation.fwd(q, k, v, *_op_args(q, kw))
    want = reference.local_attention(q, k, v, **kw)
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(want).any(-1))
    assert torch.isnan(out).any(-1).sum() == (1 if where == "q" else 6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_emulated_cuda_alibi_slope_gradient_matches_the_reference(emulation, score, softcap):
    """d loss / d slopes from the dQ pass (per-block sums at each block's first row) against autograd of the reference."""
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 150, 140, 16
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, D)
    gm = torch.zeros(B, Lk, dtype=torch.bool)
    gm[0, ::13] = True
    slopes = torch.randn(B, Hq) * 0.3
    kw = dict(window=(9, 4), dilation=2, global_mask=gm, alibi_slopes=slopes, score=score, softcap=softcap)
    args = _op_args(q, kw)
    out, lse = emulation.fwd(q, k, v, *args)
    go = torch.randn_like(out)
    _, _, _, dslopes, _ = emulation.bwd(go, None, q, k, v, out, lse, *args, alibi_grad=True)
    sr = slopes.double().requires_grad_()
    ref = reference.local_attention(q.double(), k.double(), v.double(), **{**kw, "alibi_slopes": sr})
    (want,) = torch.autograd.grad(ref, sr, go.double())
    torch.testing.assert_close(dslopes.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_emulated_cuda_varlen_matches_the_cpu_kernels(emulation, dtype, score):
    """Packed batches through the CUDA blocks (per-sequence views, starts, packed lse and
    global lists, per-sequence slope sums) against the CPU varlen kernels."""
    lq, lk = [5, 0, 70, 1, 130, 3, 40], [7, 4, 66, 0, 140, 3, 20]
    Hq, Hk, D = 4, 2, 24
    cq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lq), Hq, D).to(dtype)
    k, v = (torch.randn(sum(lk), Hk, D).to(dtype) for _ in range(2))
    gm = torch.zeros(sum(lk), dtype=torch.bool)
    gm[::9] = True
    slopes = torch.randn(len(lq), Hq) * 0.3
    args = (cq, ck, max(lq), max(lk), gm, slopes, 5, 2, 2, score, None, 2.0, D ** -0.5)
    out, lse = emulation.varlen_fwd(q, k, v, *args)
    # The CPU kernels on the same dtype: both round the output (and so the softmax row constant
    # dO . O) to it, which the slope gradient's cancelling sum of dS * |p - j| is sensitive to.
    want_out, want_lse = torch.ops.longreach.local_attention_varlen_fwd(q, k, v, *args)
    go = torch.randn(out.shape).to(dtype)
    got = emulation.varlen_bwd(go, None, q, k, v, out, lse, *args, True)
    want = torch.ops.longreach.local_attention_varlen_bwd(go, None, q, k, v, want_out, want_lse, *args, True)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), want_out.float(), **tol)
    if score == "softmax":
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[fin], want_lse[fin], **tol)
    for name, a, b in zip(("dq", "dk", "dv", "dslopes"), got, want):
        scale = max(1.0, b.abs().max().item())
        # The CUDA slope gradient uses the row constant dO . O of the rounded output, which the
        # CPU kernels correct (docs/cuda.md): in bfloat16 it carries that rounding times distances.
        close = dict(atol=0.15, rtol=0.0) if name == "dslopes" and dtype == torch.bfloat16 else tol
        torch.testing.assert_close(a.float() / scale, b.float() / scale, **close, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("q_len,k_len,dilation", [(150, 150, 1), (40, 150, 2), (170, 150, 1)])
def test_emulated_cuda_key_padding_matches_the_cpu_kernels(emulation, score, q_len, k_len, dilation):
    """key_padding_mask through the CUDA blocks (padded rows and keys out of every tile, padded
    global keys dropped from the lists, the default sigmoid bias from each row's real keys)
    against the CPU kernels, in float32: holes, a long run crossing blocks, an empty row."""
    B, Hq, Hk, D = 3, 4, 2, 24
    q = torch.randn(B, Hq, q_len, D)
    k, v = (torch.randn(B, Hk, k_len, D) for _ in range(2))
    pad = torch.rand(B, k_len) < 0.3
    pad[0, 30:110] = True
    pad[2] = True
    gm = torch.zeros(B, k_len, dtype=torch.bool)
    gm[:, ::11] = True
    slopes = torch.rand(B, Hq) * 0.2
    args = (gm, slopes, 12, 3, dilation, score, None, 0.0, D ** -0.5)
    out, lse = emulation.fwd(q, k, v, *args, key_padding_mask=pad)
    want_out, want_lse = torch.ops.longreach.local_attention_fwd(q, k, v, *args, key_padding_mask=pad)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    if score == "softmax":
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        fin = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-5, rtol=1e-5)
    go = torch.randn(out.shape)
    got = emulation.bwd(go, None, q, k, v, out, lse, *args, True, key_padding_mask=pad)
    want = torch.ops.longreach.local_attention_bwd(go, None, q, k, v, want_out, want_lse, *args, True,
                                                   key_padding_mask=pad)
    for name, a, b in zip(("dq", "dk", "dv", "dslopes"), got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fold_limit", [7, 65535])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_emulated_cuda_grid_folds_head_batch_pairs(emulation, fold_limit, packed):
    """heads x batch pairs fold into rows of grid.y blocks (csrc/cuda/grid_fold.h: 65535 on the
    device, so batches x heads beyond one grid dimension run). The emulation walks the same folded
    grid, here with rows of 7 so 3 heads x 5 sequences fill 3 rows, the last with surplus blocks:
    a block mapped to the wrong (head, batch) pair, or a pair dropped, leaves a wrong row."""
    B, Hq, Hk, D = 5, 6, 3, 8  # the dK/dV pass folds 3 kv heads x 5, the others 6 x 5
    lq, lk = [9, 1, 12, 4, 7], [9, 3, 10, 6, 7]
    q, k, v = (torch.randn(B, H, L, D) for H, L in ((Hq, 12), (Hk, 10), (Hk, 10)))
    go = torch.randn(B, Hq, 12, D)
    emulation.set_grid_fold_limit(fold_limit)
    try:
        if packed:
            cq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
            ck = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
            q, go = (torch.cat([t[b, :, : lq[b]].transpose(0, 1) for b in range(B)]) for t in (q, go))
            k, v = (torch.cat([t[b, :, : lk[b]].transpose(0, 1) for b in range(B)]) for t in (k, v))
            args = (cq, ck, max(lq), max(lk), None, None, 3, 1, 1, "softmax", None, 0.0, D ** -0.5)
            got_out, got_lse = emulation.varlen_fwd(q, k, v, *args)
            got = emulation.varlen_bwd(go, None, q, k, v, got_out, got_lse, *args, False)
            want_out, want_lse = torch.ops.longreach.local_attention_varlen_fwd(q, k, v, *args)
            want = torch.ops.longreach.local_attention_varlen_bwd(go, None, q, k, v, want_out, want_lse, *args, False)
        else:
            args = _op_args(q, dict(window=(3, 1)))
            got_out, got_lse = emulation.fwd(q, k, v, *args)
            got = emulation.bwd(go, None, q, k, v, got_out, got_lse, *args)
            want_out, want_lse = torch.ops.longreach.local_attention_fwd(q, k, v, *args)
            want = torch.ops.longreach.local_attention_bwd(go, None, q, k, v, want_out, want_lse, *args, False)
    finally:
        emulation.set_grid_fold_limit(65535)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(window=(3, 0)),
        dict(window=(2, 1), dilation=2, softcap=5.0),
        dict(window=(4, 0), global_idx=(0, 9)),
        dict(window=(2, 2), key_padding=True),
    ],
    ids=["causal-band", "dilated-softcap", "globals", "padding"],
)
def test_emulated_learnable_sinks_match_cpu(emulation, case, dtype):
    """Learnable sinks (gpt-oss) in the CUDA kernel bodies: out, lse and every
    gradient (grad_sinks included) equal the CPU op's, with GQA (4 q heads on
    2 kv heads), one sink at -inf and one large enough to dominate."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 23, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 23, 16, generator=g).to(dtype) for _ in range(2))
    sinks = torch.tensor([0.5, float("-inf"), 6.0, -1.0])
    kw = dict(window=case["window"], dilation=case.get("dilation", 1), softcap=case.get("softcap"))
    if "global_idx" in case:
        mask = torch.zeros(2, 23, dtype=torch.bool)
        mask[:, list(case["global_idx"])] = True
        kw["global_mask"] = mask
    padding = None
    if case.get("key_padding"):
        padding = torch.zeros(2, 23, dtype=torch.bool)
        padding[1, 18:] = True
    args = _op_args(q, kw)
    out, lse = emulation.fwd(q, k, v, *args, key_padding_mask=padding, sinks=sinks)
    op = torch.ops.longreach
    want_out, want_lse = op.local_attention_fwd(q, k, v, *args, padding, False, 0, sinks)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), want_out.float(), **tol)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-4, rtol=1e-4)
    go = torch.randn(out.shape, generator=g).to(dtype)
    glse = torch.randn(lse.shape, generator=g)
    got = emulation.bwd(go, glse, q, k, v, want_out, want_lse.float(), *args, key_padding_mask=padding, sinks=sinks)
    want = op.local_attention_bwd(go, glse, q, k, v, want_out, want_lse, *args, False, padding, False, 0, sinks)
    for label, a, b in zip(("dq", "dk", "dv", "dslopes", "dsinks"), got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{label}: {m}")
    assert got[4].shape == (4,) and got[4][1] == 0  # a -inf sink has no gradient


def test_emulated_sinks_without_keys(emulation):
    """No keys at all: lse = sink, out = 0, d sink = the sum of dlse (as on CPU)."""
    q = torch.randn(1, 2, 3, 8)
    k = v = torch.randn(1, 2, 0, 8)
    sinks = torch.tensor([1.5, -2.0])
    args = _op_args(q, dict(window=(2, 0)))
    out, lse = emulation.fwd(q, k, v, *args, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.view(1, 2, 1).expand(1, 2, 3))
    glse = torch.randn(1, 2, 3)
    *_, dsinks = emulation.bwd(torch.randn_like(out), glse, q, k, v, out, lse, *args, sinks=sinks)
    torch.testing.assert_close(dsinks, glse.sum((0, 2)))


def test_emulated_cuda_rejects_sequences_past_32_bit_indices(emulation):
    """The masks compare indices within a sequence in 32 bits (attention_blocks.cuh
    TileSide ranges): a sequence of 2^31 rows is refused with a clear error before
    anything is allocated (expanded views cost no memory), forward and backward."""
    n = 2**31
    q = torch.zeros(1, 1, 1, 8).expand(1, 1, n, 8)
    k = v = torch.zeros(1, 1, 4, 8)
    args = _op_args(q, dict(window=(2, 0)))
    with pytest.raises(ValueError, match=r"Lq = 2147483648, Lk = 4 exceed .*expected at most 2147483647"):
        emulation.fwd(q, k, v, *args)
    lse = torch.zeros(1, 1, 1).expand(1, 1, n)
    with pytest.raises(ValueError, match=r"Lq = 2147483648, Lk = 4 exceed .*expected at most 2147483647"):
        emulation.bwd(q, None, q, k, v, q, lse, *args)


# ---------------------------------------------------------------- chunks --
# (name, kwargs): chunk sizes 1, not dividing the lengths, past them; shifts half a chunk
# (LongLoRA / SCCA: two chunk grids, so two calls) and arbitrary per head (negative, past the
# chunk); with a window, dilation and global tokens. Lq = 45 rows on Lk = 50 keys, GQA 4 on 2.
CHUNK_CASES = [
    ("chunk1", dict(chunk=1)),
    ("chunk7_not_dividing", dict(chunk=7, window=(4, 2))),
    ("chunk_past_lengths", dict(chunk=80, window=(5, 0), causal=True)),
    ("half_shift", dict(chunk=8, chunk_shift=[0, 4, 0, 4])),
    ("arbitrary_shifts", dict(chunk=9, chunk_shift=[0, 3, -5, 13], window=(6, 3))),
    ("dilated", dict(chunk=10, chunk_shift=[2, 2, 2, 2], window=(3, 3), dilation=2)),
    ("globals_sigmoid", dict(chunk=6, chunk_shift=[0, 3, 1, 0], global_every=9, score="sigmoid")),
    ("alibi_softcap", dict(chunk=12, chunk_shift=[0, 6, 6, 0], alibi=True, softcap=5.0)),
]


def _chunk_kwargs(case, B, Lk):
    kw = {key: val for key, val in case.items() if key not in ("global_every", "alibi")}
    if "chunk_shift" in kw:
        kw["chunk_shift"] = torch.tensor(kw["chunk_shift"])
    if "global_every" in case:
        gm = torch.zeros(B, Lk, dtype=torch.bool)
        gm[:, :: case["global_every"]] = True
        gm[-1, 2] = True
        kw["global_mask"] = gm
    if case.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, 4) * 0.3
    return kw


@pytest.mark.parametrize("name,case", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_emulated_cuda_chunks_match_the_reference(emulation, name, case):
    """chunk= / chunk_shift= through the CUDA blocks (the chunk grid in every block plan and
    mask, heads with different shifts split per grid as on CPU) against the dense reference."""
    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 45, 50, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g) for _ in range(2))
    kw = _chunk_kwargs(case, B, Lk)
    chunk, shift = kw.pop("chunk"), kw.pop("chunk_shift", None)
    args = _op_args(q, kw)
    out, lse = emulation.fwd(q, k, v, *args, chunk=chunk, chunk_shift=shift)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference.local_attention(qr, kr, vr, **kw, chunk=chunk, chunk_shift=shift)
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-5)
    go = torch.randn(out.shape, generator=g)
    dq, dk, dv, *_ = emulation.bwd(go, None, q, k, v, out, lse, *args, chunk=chunk, chunk_shift=shift)
    for label, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(ref, (qr, kr, vr), go.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{label}: {m}")


def _packed_batch(Hq=4, Hk=2, D=16):
    """A packed batch with empty and one-token sequences (queries and keys of unequal lengths):
    per-sequence lengths, cu_seqlens and q (total_q, Hq, D), k and v (total_k, Hk, D)."""
    lq, lk = [5, 0, 30, 1, 37], [7, 4, 26, 0, 40]
    cq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lq), Hq, D)
    k, v = (torch.randn(sum(lk), Hk, D) for _ in range(2))
    return lq, lk, cq, ck, q, k, v


@pytest.mark.parametrize("shift", [None, [0, 5, 5, 0]], ids=["one_grid", "two_grids"])
def test_emulated_cuda_varlen_chunks_match_the_cpu_kernels(emulation, shift):
    """Packed batches with chunks (per-sequence positions, empty sequences, a grid split
    across a GQA group) against the CPU varlen op, forward and backward."""
    lq, lk, cq, ck, q, k, v = _packed_batch()
    D = q.shape[-1]
    gm = torch.zeros(sum(lk), dtype=torch.bool)
    gm[::11] = True
    shift_t = None if shift is None else torch.tensor(shift)
    args = (cq, ck, max(lq), max(lk), gm, None, 6, 2, 1, "softmax", None, 0.0, D ** -0.5)
    cd = dict(chunk=10, chunk_shift=shift_t)
    out, lse = emulation.varlen_fwd(q, k, v, *args, **cd)
    op = torch.ops.longreach
    want_out, want_lse = op.local_attention_varlen_fwd(q, k, v, *args, False, 0, None, 10, shift_t, 0.0, None)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-5, rtol=1e-5)
    go = torch.randn(out.shape)
    got = emulation.varlen_bwd(go, None, q, k, v, out, lse, *args, False, **cd)
    want = op.local_attention_varlen_bwd(go, None, q, k, v, want_out, want_lse, *args, False, False, 0, None, 10,
                                         shift_t, 0.0, None)
    for label, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{label}: {m}")


# --------------------------------------------------------------- dropout --

def _dense_op_tail(dropout_p, seed, chunk=0, shift=None):
    """local_attention_fwd's arguments after scale: no padding, sinks or causal globals."""
    return (None, False, 0, None, chunk, shift, dropout_p, seed)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 1.0])
@pytest.mark.parametrize(
    "case",
    [dict(window=(6, 2)), dict(window=(5, 0), dilation=2, global_every=7, score="sigmoid"),
     dict(window=(None, None), chunk=8, chunk_shift=[3, 3, 3, 3], alibi=True, softcap=4.0),
     dict(window=(7, 0), chunk=8, chunk_shift=[0, 4, 0, 5])],
    ids=["band", "dilated_globals_sigmoid", "chunked_alibi_softcap", "three_chunk_grids_gqa"],
)
def test_emulated_cuda_dropout_matches_the_cpu_kernels(emulation, case, dropout_p):
    """Attention dropout in the CUDA blocks: the same dropout_seed gives the CPU op's keep
    bits (common/philox.h keyed by (batch * Hq + head, row, key)) in the forward and both
    backward passes, so out, lse and every gradient equal the CPU op's (float32); the
    reference with longreach.dropout.keep_mask's mask is the independent check of out."""
    from longreach.dropout import keep_mask

    B, Hq, Hk, Lq, Lk, D = 2, 4, 2, 40, 44, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g) for _ in range(2))
    kw = _chunk_kwargs(case, B, Lk)
    chunk, shift = kw.pop("chunk", 0), kw.pop("chunk_shift", None)
    seed = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 977], dtype=torch.int64)
    args = _op_args(q, kw)
    cd = dict(chunk=chunk, chunk_shift=shift, dropout_p=dropout_p, dropout_seed=seed)
    out, lse = emulation.fwd(q, k, v, *args, **cd)
    op = torch.ops.longreach
    tail = _dense_op_tail(dropout_p, seed, chunk, shift)
    want_out, want_lse = op.local_attention_fwd(q, k, v, *args, *tail)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)  # lse is taken before dropout
    if dropout_p == 1.0:
        assert torch.equal(out, torch.zeros_like(out))
    mask = keep_mask(seed, dropout_p, B, Hq, Lq, Lk)
    ref = reference.local_attention(q.double(), k.double(), v.double(), **kw, chunk=chunk, chunk_shift=shift,
                                    dropout_mask=mask, dropout_p=dropout_p)
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-5)
    go = torch.randn(out.shape, generator=g)
    glse = torch.randn(lse.shape, generator=g) if kw.get("score", "softmax") == "softmax" else None
    got = emulation.bwd(go, glse, q, k, v, out, lse, *args, **cd)
    want = op.local_attention_bwd(go, glse, q, k, v, want_out, want_lse, *args, False, *tail)
    for label, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, atol=1e-5, rtol=1e-5, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 1.0])
def test_emulated_cuda_varlen_dropout_matches_the_cpu_kernels(emulation, dropout_p):
    """Packed batches: the mask's batch index is the sequence (as on CPU), rows and keys per sequence."""
    lq, lk, cq, ck, q, k, v = _packed_batch()
    D = q.shape[-1]
    seed = torch.tensor([-7, 2**40 + 3], dtype=torch.int64)
    args = (cq, ck, max(lq), max(lk), None, None, 8, 3, 1, "softmax", None, 0.0, D ** -0.5)
    cd = dict(dropout_p=dropout_p, dropout_seed=seed)
    out, lse = emulation.varlen_fwd(q, k, v, *args, **cd)
    op = torch.ops.longreach
    tail = (False, 0, None, 0, None, dropout_p, seed)
    want_out, want_lse = op.local_attention_varlen_fwd(q, k, v, *args, *tail)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-5, rtol=1e-5)
    go = torch.randn(out.shape)
    got = emulation.varlen_bwd(go, None, q, k, v, out, lse, *args, False, **cd)
    want = op.local_attention_varlen_bwd(go, None, q, k, v, want_out, want_lse, *args, False, *tail)
    for label, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{label}: {m}")
