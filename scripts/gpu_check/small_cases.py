"""Small forward + backward cases that reach every CUDA code path, for compute-sanitizer
(racecheck, synccheck, memcheck) in scripts/gpu_check.sh: the WMMA products (float16 / bfloat16,
each head-dim bucket: 64, 128, 256), the float32 loops, 16-byte loads (D % 8 == 0) and scalar
loads (D = 20), warp shuffles, global-row and global-key blocks with GQA, Lq > Lk (rows that see
nothing), decoding, sigmoid, ALiBi with its slope gradient, a packed batch, a grid whose
heads x batch pairs exceed 65535 (folded into grid.y x grid.z), and the decode op's kernels
(local_attention_with_kvcache: paged with splits and the merge kernel, rolling with sinks).

Each case is also compared with the CPU kernels in float32 at tests/test_cuda.py's tolerances, so
a run without a sanitizer is a correctness check too. Exits non-zero on the first failure.

    python scripts/gpu_check/small_cases.py [--quick]

--quick (the sanitizer runs): the 256 bucket and the packed batch in float16 only, no folded grid.
"""

from __future__ import annotations

import sys

import torch

import longreach

TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(name, got, want, dtype):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = ((got.float().cpu() - want.float()) / scale).abs().max().item() if want.numel() else 0.0
    if not err <= TOL[dtype] * 4:  # the tolerances are per element against atol + rtol * |want|
        raise AssertionError(f"{name}: scaled max difference {err:.2e} over {TOL[dtype] * 4:.1e}")


def case(label, dtype, B, Hq, Hk, Lq, Lk, D, glob=0, alibi=False, **kw):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for H, L in ((Hq, Lq), (Hk, Lk), (Hk, Lk)))
    go = torch.randn(B, Hq, Lq, D, generator=g)
    if glob:
        gm = torch.zeros(B, Lk, dtype=torch.bool)
        gm[:, 1::glob] = True
        kw["global_mask"] = gm
    slopes = (torch.randn(B, Hq, generator=g) * 0.3) if alibi else None

    def run(device, dt):
        args = [t.to(device=device, dtype=dt).requires_grad_() for t in (q, k, v)]
        extra = dict(kw)
        if "global_mask" in extra:
            extra["global_mask"] = extra["global_mask"].to(device)
        sl = None
        if slopes is not None:
            sl = slopes.to(device).requires_grad_()
            extra["alibi_slopes"] = sl
        out = longreach.local_attention(*args, **extra)
        out.backward(go.to(device=device, dtype=dt))
        grads = [t.grad for t in args] + ([sl.grad] if sl is not None else [])
        return [out.detach()] + grads

    got = run("cuda", dtype)
    torch.cuda.synchronize()
    want = run("cpu", torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dslopes"), got, want):
        _close(f"{label} {dtype} {name}", a, b, dtype)


def varlen_case(dtype):
    lq, lk = [5, 0, 70, 1, 33], [7, 4, 66, 0, 33]
    cq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lq), 4, 64, generator=g)
    k, v = (torch.randn(sum(lk), 2, 64, generator=g) for _ in range(2))
    go = torch.randn(q.shape, generator=g)
    gm = torch.zeros(sum(lk), dtype=torch.bool)
    gm[::9] = True

    def run(device, dt):
        args = [t.to(device=device, dtype=dt).requires_grad_() for t in (q, k, v)]
        out = longreach.local_attention_varlen(*args, cq.to(device), ck.to(device), max(lq), max(lk), window=(5, 2),
                                               dilation=2, global_mask=gm.to(device))
        out.backward(go.to(device=device, dtype=dt))
        return [out.detach()] + [t.grad for t in args]

    got = run("cuda", dtype)
    want = run("cpu", torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        _close(f"varlen {dtype} {name}", a, b, dtype)


def decode_case(label, dtype, layout, B, Hq, Hk, Lq, D, lens, splits=0, **kw):
    """The decode op's CUDA kernel (csrc/cuda/decode_blocks.cuh) on a paged or rolling cache
    against the CPU decode op in float32: out, lse and the appended cache."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k_new, v_new = torch.randn(B, Hk, Lq, D, generator=g), torch.randn(B, Hk, Lq, D, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if layout == "paged":
        block_size, max_blocks = 16, -(-(max(lens) + Lq) // 16)
        cache_shape = (B * max_blocks + 1, block_size, Hk, D)
        table = torch.randperm(B * max_blocks + 1, generator=g)[:B * max_blocks].view(B, max_blocks).int()
        extra = dict(block_table=table)
    else:
        cache_shape, table, extra = (B, Hk, 40, D), None, dict(rolling=True)
    k_cache, v_cache = torch.randn(cache_shape, generator=g), torch.randn(cache_shape, generator=g)

    def run(device, dt):
        kc, vc = k_cache.to(device=device, dtype=dt), v_cache.to(device=device, dtype=dt)
        ex = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in {**extra, **kw}.items()}
        out, lse = longreach.local_attention_with_kvcache(
            q.to(device=device, dtype=dt), kc, vc, k_new.to(device=device, dtype=dt), v_new.to(device=device, dtype=dt),
            cache_seqlens=seqlens.to(device), num_splits=splits, return_lse=True, **ex)
        return out, lse, kc

    with torch.no_grad():
        got = run("cuda", dtype)
        torch.cuda.synchronize()
        want = run("cpu", torch.float32)
    for name, a, b in zip(("out", "lse", "k_cache"), got, want):
        _close(f"{label} {dtype} {name}", a, b, dtype)


def main() -> int:
    quick = "--quick" in sys.argv
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for i, dt in enumerate(dtypes):
        full = not quick or i == 0
        case("d64_causal_gqa_vec", dt, 1, 2, 1, 70, 70, 64, window=(31, 0), causal=True)
        case("d128_global_gqa_dilated", dt, 1, 4, 2, 100, 120, 128, glob=11, window=(3, 5), dilation=2)
        if full:
            case("d256_sigmoid", dt, 1, 2, 2, 64, 64, 256, window=(24, 24), score="sigmoid")
        case("d20_scalar_softcap_alibi", dt, 1, 2, 1, 50, 60, 20, alibi=True, window=(10, 3), softcap=20.0)
        case("lq_gt_lk_global", dt, 1, 2, 2, 90, 40, 32, glob=7, window=(5, 0), causal=True)
        case("decode_mqa", dt, 1, 8, 1, 1, 300, 128, window=(20, 0), causal=True)
        # The decode op's own kernel: paged GQA with 3 splits (the merge kernel), a rolling ring with sinks.
        decode_case("kvcache_paged_gqa_splits", dt, 2, 8, 2, 2, 64, (70, 33), splits=3, window=(48, 0),
                    alibi_slopes=torch.linspace(0.1, 0.4, 8))
        decode_case("kvcache_rolling_sinks_d20", dt, 2, 4, 4, 1, 20, (90, 7), window=(30, 0), sink_tokens=4,
                    sinks=torch.zeros(4))
        if full:
            varlen_case(dt)
        print(f"small cases: {dt} ok", flush=True)
    if not quick:  # 200K tiny blocks: too slow under the sanitizers
        case("grid_fold_66000_pairs", torch.float16, 66000, 1, 1, 1, 2, 16, window=(1, 0), causal=True)
    print("small cases: all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
