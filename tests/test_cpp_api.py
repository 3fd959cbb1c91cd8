"""The C++ (LibTorch) API: examples/cpp and tests/cpp are configured with cmake against the
installed CMake package (longreach.cmake_prefix_path), built, run, and their printed values
compared with the Python API on the same torch.manual_seed inputs. The build dirs are cached
under build/cpp_tests, so a rerun only relinks. Skipped without cmake or a C++ compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longreach

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CMAKE = shutil.which("cmake", path=str(BIN)) or shutil.which("cmake")
NINJA = shutil.which("ninja", path=str(BIN)) or shutil.which("ninja")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
pytestmark = pytest.mark.skipif(not (CMAKE and NINJA and CXX), reason="needs cmake, ninja and a C++ compiler")


def _build_and_run(source: Path, name: str, program: str) -> dict:
    build = ROOT / "build" / "cpp_tests" / name
    prefix = f"{longreach.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    if not (build / "build.ninja").exists():
        conf = subprocess.run([CMAKE, "-S", str(source), "-B", str(build), "-G", "Ninja",
                               f"-DCMAKE_MAKE_PROGRAM={NINJA}", "-DCMAKE_BUILD_TYPE=Release",
                               f"-DCMAKE_PREFIX_PATH={prefix}"], capture_output=True, text=True, timeout=300)
        if conf.returncode != 0 and torch.version.cuda:
            # Torch's CMake config of a CUDA build wants a CUDA toolkit it can configure (docs/cpp.md)
            shutil.rmtree(build, ignore_errors=True)
            pytest.skip(f"find_package(Torch) of a CUDA build of torch failed here:\n{conf.stderr[-2000:]}")
        assert conf.returncode == 0, conf.stdout + conf.stderr
    subprocess.run([CMAKE, "--build", str(build)], check=True, capture_output=True, text=True, timeout=600)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([str(build / program)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    values = {}
    for line in run.stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key == "error":  # `error <case> <type> <message>`
            case, _, rest = rest.partition(" ")
            key = f"error {case}"
        values[key] = rest
    return values


def test_library_has_no_python_symbols():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm")
    lib = os.path.join(longreach.cmake_prefix_path, "liblongreach.so")
    undefined = subprocess.run([nm, "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
    assert not [s for s in undefined.split() if s.startswith("Py") or s.startswith("_Py")]


def test_example_trains_and_matches_python():
    got = _build_and_run(ROOT / "examples" / "cpp", "example", "train_local_attention")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8).requires_grad_() for _ in range(3))
    out = longreach.local_attention(q, k, v, window=(4, 0), causal=True)
    (out * out).sum().backward()
    for name, want in (("out_sum", out.sum()), ("grad_q_sum", q.grad.sum()), ("grad_k_sum", k.grad.sum()),
                       ("grad_v_sum", v.grad.sum())):
        assert float(got[name]) == pytest.approx(want.item(), rel=1e-5, abs=1e-5), name
    assert float(got["fd_error"]) < 1e-6
    losses = [float(got[f"loss_{i}"]) for i in range(8)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def _show(t: torch.Tensor):
    flat = t.detach().double().flatten()
    return flat.sum().item(), (flat * torch.linspace(0, 1, flat.numel(), dtype=torch.float64)).sum().item()


def test_api_checks_match_python():
    got = _build_and_run(ROOT / "tests" / "cpp", "api_checks", "api_checks")
    want = {}
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8).requires_grad_()
    k, v = (torch.randn(2, 2, 10, 8).requires_grad_() for _ in range(2))
    slopes = (torch.rand(4) * 0.5).requires_grad_()
    sinks = torch.randn(4).requires_grad_()
    out, lse = longreach.local_attention(q, k, v, window=(3, 2), alibi_slopes=slopes, sinks=sinks, softcap=5.0,
                                         return_lse=True)
    ((out * out).sum() + lse.sum()).backward()
    want.update(dense_out=out, dense_lse=lse, dense_gq=q.grad, dense_gk=k.grad, dense_gv=v.grad,
                dense_gslopes=slopes.grad, dense_gsinks=sinks.grad)
    q, k, v = (torch.randn(12, 2, 8).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = longreach.local_attention_varlen(q, k, v, cu, cu, 7, 7, window=(2, 0), causal=True, score="sigmoid")
    (out * out).sum().backward()
    want.update(varlen_out=out, varlen_gq=q.grad, varlen_gk=k.grad, varlen_gv=v.grad)
    x = torch.randn(1, 2, 6, 8).requires_grad_()
    cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    pos = torch.tensor([[3, 1, 4, 1, 5, 9]])
    y = longreach.apply_rotary(x, cos, sin, pos, interleaved=True)
    (y * y.detach().flip(-1)).sum().backward()
    want.update(rotary_out=y, rotary_gx=x.grad)
    with torch.no_grad():
        qd = torch.randn(1, 2, 1, 8)
        k_cache, v_cache = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
        k_cache[:, :, :4] = torch.randn(1, 2, 4, 8)
        v_cache[:, :, :4] = torch.randn(1, 2, 4, 8)
        kn, vn = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        out, lse = longreach.local_attention_with_kvcache(qd, k_cache, v_cache, kn, vn, cache_seqlens=torch.tensor(
            [4], dtype=torch.int32), window=(2, None), return_lse=True)
    want.update(kvcache_out=out, kvcache_lse=lse, kvcache_k_cache=k_cache)
    q = torch.randn(1, 4, 12, 8).requires_grad_()
    k, v = (torch.randn(1, 2, 12, 8).requires_grad_() for _ in range(2))
    out = longreach.local_attention(q, k, v, window=(5, 0), causal=True, chunk=4,
                                    chunk_shift=torch.tensor([0, 2, 0, 2]), dropout_p=0.3)
    (out * out).sum().backward()
    want.update(chunk_drop_out=out, chunk_drop_gq=q.grad, chunk_drop_gk=k.grad, chunk_drop_gv=v.grad)
    with torch.no_grad():
        qd, k_cache, v_cache = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
        out, lse = longreach.local_attention_with_kvcache(qd, k_cache, v_cache, cache_seqlens=torch.tensor(
            [5], dtype=torch.int32), causal=True, chunk=3, return_lse=True)
    want.update(kvcache_chunk_out=out, kvcache_chunk_lse=lse)
    for name, tensor in want.items():
        total, weighted = (float(x) for x in got[name].split())
        assert (total, weighted) == pytest.approx(_show(tensor), rel=1e-4, abs=1e-4), name
    # The ops' checks reach C++ with Python's exception types, naming the argument.
    assert got["error bad_dilation"].startswith("ValueError") and "dilation" in got["error bad_dilation"]
    assert got["error bad_dtype"].startswith("TypeError"), got["error bad_dtype"]
    assert got["error bad_dropout_p"].startswith("ValueError") and "dropout_p" in got["error bad_dropout_p"]
    assert got["error chunk_shift_without_chunk"].startswith("ValueError")
    assert "chunk" in got["error chunk_shift_without_chunk"]
    assert got["error lse_of_sigmoid"].startswith("ValueError")
    assert got["error double_backward"].startswith("NotImplementedError")
