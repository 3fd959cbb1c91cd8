"""CUDA kernels: parity with the CPU kernels and the reference, determinism,
streams and CUDA graphs. Every GPU test skips on a machine without one; the
tests at the bottom check what a GPU-less machine can (import, error message).

The CPU test suite also runs on CUDA through the `device` fixture of
conftest.py; these tests add what only makes sense with two devices.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import longreach
from longreach import reference
from longreach._library import check_device_supported

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Output / gradient tolerances of the CUDA kernels against the CPU float32 result.
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}

# (name, kwargs for local_attention, shapes (B, Hq, Hk, Lq, Lk, D))
CONFIGS = [
    ("unbounded", {}, (2, 4, 4, 70, 70, 64)),
    ("causal_band", dict(window=(31, 0), causal=True), (2, 4, 2, 150, 150, 64)),
    ("band_decode", dict(window=(20, 0), causal=True), (1, 8, 1, 1, 300, 128)),
    ("bottom_right_lq_gt_lk", dict(window=(5, 0), causal=True), (1, 2, 2, 90, 40, 32)),
    ("symmetric_dilated", dict(window=(6, 6), dilation=3), (2, 2, 2, 130, 130, 80)),
    ("global_tokens", dict(window=(4, 4), global_every=17), (2, 4, 4, 120, 120, 64)),
    ("global_dilated_gqa", dict(window=(3, 5), dilation=2, global_every=11), (2, 6, 2, 100, 120, 128)),
    ("alibi_softcap", dict(window=(40, 0), causal=True, alibi="head", softcap=20.0), (2, 4, 4, 96, 96, 64)),
    ("alibi_batch_balanced", dict(window=(16, 16), alibi="batch_head"), (2, 4, 4, 64, 64, 64)),
    ("sigmoid", dict(window=(12, 12), score="sigmoid", alibi="head"), (2, 4, 4, 80, 80, 64)),
    # bidirectional globals (causal=False): causal global tokens are CPU-only so far (issue 14)
    ("sigmoid_global", dict(window=(8, 0), causal=False, score="sigmoid", global_every=13), (1, 2, 2, 70, 70, 32)),
    ("head_dim_256", dict(window=(24, 24)), (1, 2, 2, 100, 100, 256)),
    ("head_dim_odd", dict(window=(10, 3)), (1, 2, 1, 50, 60, 20)),
]


def _make_inputs(shape, kwargs, dtype, device, seed=0):
    B, Hq, Hk, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hk, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hk, Lk, D, generator=g).to(device=device, dtype=dtype)
    kw = {key: val for key, val in kwargs.items() if key not in ("global_every", "alibi")}
    if "global_every" in kwargs:
        gm = torch.zeros(B, Lk, dtype=torch.bool)
        gm[:, :: kwargs["global_every"]] = True
        gm[-1, 1] = True  # batch elements differ
        kw["global_mask"] = gm.to(device)
    if kwargs.get("alibi") == "head":
        kw["alibi_slopes"] = longreach_alibi(Hq).to(device)
    elif kwargs.get("alibi") == "batch_head":
        slopes = longreach_alibi(Hq)
        kw["alibi_slopes"] = torch.stack([slopes, -slopes]).to(device)  # signed (balanced) slopes
    return q, k, v, kw


def longreach_alibi(heads):
    return torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def _run(q, k, v, kw, grad_seed=1):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    softmax = kw.get("score", "softmax") == "softmax"
    res = longreach.local_attention(q, k, v, return_lse=softmax, **kw)
    out, lse = res if softmax else (res, None)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g).to(out)
    loss = (out.float() * grad.float()).sum()
    if lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + torch.where(finite, lse, torch.zeros_like(lse)).sum() * 0.1
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out, lse, dq, dk, dv


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name,kwargs,shape", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_cuda_matches_cpu_forward_and_backward(name, kwargs, shape, dtype):
    q, k, v, kw = _make_inputs(shape, kwargs, dtype, "cuda")
    got = _run(q, k, v, kw)
    # The CPU kernels in float32 from the same (rounded) inputs are the yardstick.
    kw_cpu = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    want = _run(q.float().cpu(), k.float().cpu(), v.float().cpu(), kw_cpu)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        if a is None:
            continue
        if label == "lse":
            assert torch.equal(torch.isinf(a.cpu()), torch.isinf(b)), "empty rows must match"
            a, b = a[torch.isfinite(a)], b[torch.isfinite(b)]
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a.float().cpu() / scale, b.float() / scale, **TOL[dtype], msg=f"{name} {label}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_learnable_sinks_match_cpu(dtype):
    """Learnable sinks (gpt-oss) on CUDA: out, lse and the gradients of q, k, v
    and sinks equal the CPU op's (GQA, a -inf sink, globals)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 70, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 70, 64, generator=g).to(dtype) for _ in range(2))
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[:, 5] = True
    sinks = torch.tensor([0.5, float("-inf"), 4.0, -1.0])
    results = []
    for dev, t in (("cuda", dtype), ("cpu", torch.float32)):
        qq, kk, vv, ss = (x.to(dev, t).detach().requires_grad_() for x in (q, k, v, sinks))
        out, lse = longreach.local_attention(qq, kk, vv, window=(9, 2), global_mask=mask.to(dev), sinks=ss,
                                             return_lse=True)
        loss = (out.float() * torch.linspace(-1, 1, 64, device=dev)).sum() + lse.sum() * 0.1
        results.append((out, lse, *torch.autograd.grad(loss, (qq, kk, vv, ss))))
    for a, b in zip(*results):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float().cpu(), b, atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])


def _cuda_and_cpu_runs(dtype, kwargs, seed=11, shape=(2, 4, 2, 150, 160, 64)):
    """(out, lse, dq, dk, dv) on CUDA in dtype and on CPU in float32 from the same rounded
    inputs; torch.manual_seed before each call gives both the same dropout_seed."""
    B, Hq, Hk, Lq, Lk, D = shape
    q, k, v, _ = _make_inputs(shape, {}, dtype, "cpu", seed=seed)
    results = []
    for dev, t in (("cuda", dtype), ("cpu", torch.float32)):
        kw = {key: (val.to(dev) if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
        torch.manual_seed(1234)
        results.append(_run(q.to(dev, t), k.to(dev, t), v.to(dev, t), kw))
    return results


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [dict(chunk=32, window=(20, 0), causal=True), dict(chunk=48, chunk_shift=torch.tensor([0, 24, 0, 24])),
     dict(chunk=7, chunk_shift=torch.tensor([0, 3, -2, 9]), window=(5, 5), dilation=2)],
    ids=["causal_chunks", "half_shift_gqa", "arbitrary_shifts_dilated"],
)
def test_cuda_chunks_match_cpu(kwargs, dtype):
    """chunk= / chunk_shift= on CUDA (one kernel call per chunk grid) against the CPU op."""
    got, want = _cuda_and_cpu_runs(dtype, kwargs)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float().cpu() / scale, b.float() / scale, **TOL[dtype], msg=label)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 1.0])
def test_cuda_dropout_matches_cpu(dropout_p, dtype):
    """Attention dropout on CUDA: the same seed gives the CPU op's mask (common/philox.h), so
    out, lse and the gradients agree to the dtype's tolerance; p = 1 drops every weight."""
    got, want = _cuda_and_cpu_runs(dtype, dict(window=(24, 8), chunk=40, dropout_p=dropout_p))
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float().cpu() / scale, b.float() / scale, **TOL[dtype], msg=label)
    if dropout_p == 1.0:
        assert torch.count_nonzero(got[0]) == 0


@needs_gpu
def test_cuda_matches_reference_in_float32_with_strided_inputs():
    B, L, H, D = 2, 75, 4, 64
    x = torch.randn(B, L, 3 * H, D, device="cuda")
    q, k, v = (t.transpose(1, 2) for t in x.split(H, dim=2))  # (B, H, L, D) views, not contiguous
    assert not q.is_contiguous()
    kw = dict(window=(9, 2), dilation=2)
    out = longreach.local_attention(q, k, v, **kw)
    ref = reference.local_attention(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_gpu
def test_fully_masked_rows_give_zeros_minus_inf_and_zero_gradients():
    # Lq > Lk with causal: the first Lq - Lk rows sit at negative positions and see no key.
    q = torch.randn(1, 2, 10, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 2, 4, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(1, 2, 4, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    out, lse = longreach.local_attention(q, k, v, window=(2, 0), causal=True, return_lse=True)
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert torch.isinf(lse[:, :, :6]).all() and (lse[:, :, :6] < 0).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :, :6], torch.zeros_like(q.grad[:, :, :6]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_backward_is_deterministic(dtype):
    q, k, v, kw = _make_inputs((2, 8, 2, 200, 200, 64), dict(window=(50, 0), causal=False, global_every=37), dtype, "cuda")
    first = _run(q, k, v, kw)
    for _ in range(3):
        again = _run(q, k, v, kw)
        for a, b in zip(first, again):
            if a is not None:
                assert torch.equal(a, b), "CUDA results must be bitwise reproducible"


@needs_gpu
def test_kernels_run_on_the_current_stream():
    q, k, v, kw = _make_inputs((2, 4, 4, 256, 256, 64), dict(window=(32, 0), causal=True), torch.float16, "cuda")
    want = longreach.local_attention(q, k, v, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Inputs written on the side stream right before the op: a kernel on another
        # stream could read them before the writes land.
        q2, k2, v2 = q * 1, k * 1, v * 1
        got = longreach.local_attention(q2, k2, v2, **kw)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@needs_gpu
def test_torch_compile_reduce_overhead_cuda_graphs():
    """CUDA-graph capture fails if a kernel is launched on a stream other than
    the current (capturing) one, and replays must match eager results; the
    backward graph is captured too."""
    torch._dynamo.reset()
    q, k, v, kw = _make_inputs((2, 4, 2, 128, 128, 64), dict(window=(24, 0), causal=True), torch.bfloat16, "cuda")

    def attention(q, k, v):
        return longreach.local_attention(q, k, v, **kw)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        return out.detach().clone(), [t.grad for t in leaves]

    want_out, want_grads = run(attention)
    compiled = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got_out, got_grads = run(compiled)
    torch.cuda.synchronize()
    torch.testing.assert_close(got_out, want_out, atol=0, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_gpu
def test_cuda_rejects_float64_and_huge_head_dims_clearly():
    q = torch.randn(1, 1, 4, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="q has dtype torch.float64; the CUDA kernels support float16, bfloat16 and float32"):
        longreach.local_attention(q, q, q)
    q = torch.randn(1, 1, 4, 264, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 264 is not supported"):
        longreach.local_attention(q, q, q)


@needs_gpu
def test_inputs_on_another_gpu_run_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v, kw = _make_inputs((1, 2, 2, 64, 64, 64), dict(window=(8, 8)), torch.float16, "cuda:1")
    with torch.cuda.device(0):
        out = longreach.local_attention(q, k, v, **kw)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out, longreach.local_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), **kw).to(out), **TOL[torch.float16])


# ------------------------------------------------ decoding (KV caches) --
# The decode op's CUDA kernel (csrc/cuda/decode_blocks.cuh) against the CPU decode op on the same
# problems as the host emulation (tests/test_cuda_decode_emulation.py: every cache layout, GQA/MQA,
# ALiBi, softcap, sigmoid, dilation, sinks, sink tokens, chunks, head dims 20 to 256).


def _decode_on_both(problem, num_splits=0):
    """(cuda out, lse, k_cache, v_cache), (cpu ...) of one decode call; the caches are copies."""
    cpu = problem.cpu(num_splits)
    gpu = problem.to("cuda")
    k_cache, v_cache = gpu.k_cache.clone(), gpu.v_cache.clone()
    out, lse = torch.ops.longreach.local_attention_kvcache_fwd(*gpu.args(k_cache, v_cache, num_splits))
    return (out.cpu(), lse.cpu(), k_cache.cpu(), v_cache.cpu()), cpu


def _decode_cases():
    from test_cuda_decode_emulation import CASES

    return sorted(CASES)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", _decode_cases())
def test_cuda_decode_matches_the_cpu_decode_op(name, dtype):
    from test_cuda_decode_emulation import CASES, Problem

    problem = Problem(dtype=dtype, **CASES[name])
    (out, lse, kc, vc), (cpu_out, cpu_lse, cpu_kc, cpu_vc) = _decode_on_both(problem)
    torch.testing.assert_close(out, cpu_out, **TOL[dtype])
    if problem.opts.get("score") != "sigmoid":
        torch.testing.assert_close(lse, cpu_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kc, cpu_kc, atol=0, rtol=0, equal_nan=True)  # the same append
    torch.testing.assert_close(vc, cpu_vc, atol=0, rtol=0, equal_nan=True)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_decode_splits_agree_and_empty_rows(dtype):
    from test_cuda_decode_emulation import CASES, Problem

    problem = Problem(dtype=dtype, **CASES["paged256-long-history"])
    (one, one_lse, _, _), _ = _decode_on_both(problem, 1)
    for splits in (0, 2, 7, 128):  # 0: the heuristic, which splits this small batch on any GPU
        (out, lse, _, _), _ = _decode_on_both(problem, splits)
        torch.testing.assert_close(out, one, **TOL[dtype])
        torch.testing.assert_close(lse, one_lse, atol=1e-4, rtol=1e-4)
    for splits in (1, 3):  # rows without keys: zeros and lse -inf (the sink logit with sinks)
        empty = Problem(dtype=dtype, Lq=3, lens=(0, 2), append=False, window=(2, 0), dilation=4,
                        sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))
        (out, lse, _, _), (cpu_out, cpu_lse, _, _) = _decode_on_both(empty, splits)
        assert (out[0] == 0).all()
        torch.testing.assert_close(lse, cpu_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, cpu_out, **TOL[dtype])


@needs_gpu
def test_cuda_decode_public_api_runs_on_the_current_stream_and_rejects_clearly():
    from test_cuda_decode_emulation import CASES, Problem

    gpu = Problem(**CASES["rolling-wraps-sinks"]).to("cuda")
    kw = dict(cache_seqlens=gpu.seqlens, rolling=True, sink_tokens=gpu.sink_tokens, window=(12, 0), return_lse=True)
    expected = longreach.local_attention_with_kvcache(gpu.q, gpu.k_cache.clone(), gpu.v_cache.clone(), gpu.k_new,
                                                      gpu.v_new, **kw)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.no_grad():
        got = longreach.local_attention_with_kvcache(gpu.q, gpu.k_cache.clone(), gpu.v_cache.clone(), gpu.k_new,
                                                     gpu.v_new, **kw)
    stream.synchronize()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    q = torch.randn(1, 2, 1, 8, device="cuda", dtype=torch.float64)
    cache = torch.zeros(1, 2, 4, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="local_attention_with_kvcache \\(CUDA\\): q has dtype torch.float64"):
        longreach.local_attention_with_kvcache(q, cache, cache.clone(), q, q, cache_seqlens=0)
    assert (cache == 0).all()  # rejected before the append
    q = torch.randn(1, 2, 1, 264, device="cuda", dtype=torch.float16)
    cache = torch.zeros(1, 2, 4, 264, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 264 is not supported"):
        longreach.local_attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=1)


# ----------------------------------------------------- without a GPU too --


def test_import_does_not_initialise_cuda():
    code = "import torch, longreach; assert not torch.cuda.is_initialized(), 'import initialised CUDA'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


class _FakeCudaTensor:
    device = torch.device("cuda", 0)


def test_missing_cuda_kernels_give_a_rebuild_hint(monkeypatch):
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda name, key: False)
    with pytest.raises(RuntimeError, match=r"local_attention_fwd: got a tensor on cuda:0, but this build of longreach "
                                           r"has no CUDA kernels.*LONGREACH_WITH_CUDA=ON pip install"):
        check_device_supported("local_attention_fwd", _FakeCudaTensor())


def test_cuda_kernel_registration_matches_the_build():
    """A build with CUDA kernels registers them for the CUDA dispatch key; the
    rebuild hint must then not fire (and must fire when they are missing)."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("longreach::local_attention_fwd", "CUDA")
    for op in ("local_attention_bwd", "local_attention_kvcache_fwd"):
        assert has_kernel == torch._C._dispatch_has_kernel_for_dispatch_key(f"longreach::{op}", "CUDA"), op
    if has_kernel:
        check_device_supported("local_attention_fwd", _FakeCudaTensor())  # no error
    else:
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            check_device_supported("local_attention_fwd", _FakeCudaTensor())


# ------------------------------------------------------------------ RoPE --


def _rope_tables(positions, half, dtype=torch.float32):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("ids", [None, "batch", "shared"])
def test_rotary_cuda_matches_cpu_forward_and_backward(dtype, interleaved, partial, ids):
    B, H, L, D = 2, 3, 37, 64
    half = 16 if partial else D // 2
    cos, sin = _rope_tables(100, half)
    x = torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2)  # strided (B, H, L, D)
    position_ids = None
    if ids == "batch":
        position_ids = torch.randint(0, 100, (B, L))
    elif ids == "shared":
        position_ids = torch.arange(5, 5 + L)[None]
    grad = torch.randn(B, H, L, D, dtype=dtype)

    def run(device):
        xd = x.to(device).requires_grad_()
        pid = None if position_ids is None else position_ids.to(device)
        out = longreach.apply_rotary(xd, cos.to(device), sin.to(device), pid, interleaved=interleaved)
        (gx,) = torch.autograd.grad(out, xd, grad.to(device))
        return out.cpu(), gx.cpu()

    (out_gpu, gx_gpu), (out_cpu, gx_cpu) = run("cuda"), run("cpu")
    # The GPU contracts x1*c - x2*s into fused multiply-adds: a last-bit difference.
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-6, rtol=1e-6)}.get(dtype, TOL[dtype])
    torch.testing.assert_close(out_gpu, out_cpu, **tol)
    torch.testing.assert_close(gx_gpu, gx_cpu, **tol)


@needs_gpu
def test_rotary_qk_cuda_matches_cpu_and_rejects_out_of_table_positions():
    cos, sin = _rope_tables(64, 16)
    q, k = torch.randn(2, 8, 40, 32), torch.randn(2, 2, 40, 32)
    pid = torch.randint(0, 64, (2, 40))
    got = longreach.apply_rotary_qk(q.cuda(), k.cuda(), cos.cuda(), sin.cuda(), pid.cuda())
    want = longreach.apply_rotary_qk(q, k, cos, sin, pid)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="position_ids holds 64 but the cos / sin tables have only 64 rows"):
        longreach.apply_rotary(q.cuda(), cos.cuda(), sin.cuda(), torch.full((1, 40), 64, device="cuda"))


@needs_gpu
def test_rotary_in_cuda_graphs_with_position_ids():
    torch._dynamo.reset()
    cos, sin = _rope_tables(128, 32)
    cos, sin = cos.cuda(), sin.cuda()
    q = torch.randn(2, 4, 50, 64, device="cuda", dtype=torch.bfloat16)
    pid = torch.randint(0, 128, (2, 50), device="cuda")

    def rope(q, pid):
        return longreach.apply_rotary(q, cos, sin, pid)

    compiled = torch.compile(rope, mode="reduce-overhead", fullgraph=True)
    want = rope(q, pid)
    for _ in range(3):
        got = compiled(q, pid)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@needs_gpu
def test_opcheck_on_cuda():
    q, k, v, kw = _make_inputs((1, 2, 1, 33, 41, 32), dict(window=(4, 2), dilation=2, global_every=9), torch.float32,
                               "cuda")
    for t in (q, k, v):
        t.requires_grad_()
    args = (q, k, v, kw["global_mask"], None, 4, 2, 2, "softmax", None, 0.0, 32 ** -0.5)
    torch.library.opcheck(torch.ops.longreach.local_attention_fwd.default, args)
    cos, sin = _rope_tables(50, 16)
    torch.library.opcheck(torch.ops.longreach.apply_rotary.default,
                          (q.detach(), cos.cuda(), sin.cuda(), None, False, False))
