"""bfloat16 forward and backward on the CPU's bf16 products (csrc/cpu/bf16_ops.h)
against PyTorch's own bf16 computation: out and every gradient (dq, dk, dv,
d sinks) at most twice PyTorch's error against a float64 truth (the rule of
test_local_attention_edge_cases), with the kernels forced on
(LONGREACH_CPU_BF16=1) and off (=0). The switch is read once per process, so
each setting runs in its own subprocess; the subprocess reports the errors and
this file judges them.

PyTorch's computation: SDPA in bf16 with the allowed-key mask
(reference.allowed_keys, an independent dense mask) where SDPA can express the
case, else the eager attention of Hugging Face's decoders (bf16 matmuls, softmax
in float32 cast back to bf16; learnable sinks as gpt-oss's extra logit column).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import longreach  # noqa: F401  (registers torch.ops.longreach)

SCRIPT = r"""
import json, math, sys, torch
import torch.nn.functional as F
import longreach
from longreach import reference
sys.path.insert(0, sys.argv[1])
from attention_testing import grads, random_qkv, rms_error, scaled_error

CASES = [
    # (id, (B, Hq, Hk, Lq, Lk, D), kwargs; "globals": scattered global tokens, "sinks": learnable sinks)
    ("d64-causal-window", (1, 2, 2, 300, 300, 64), dict(window=(50, 0), causal=True)),
    ("d128-gqa-window-dilation", (1, 4, 2, 260, 260, 128), dict(window=(30, 30), dilation=2)),
    ("d40-gqa-causal-globals", (2, 4, 2, 200, 200, 40), dict(window=(24, 0), causal=True, globals=True)),
    ("d72-mqa-window-sinks", (1, 4, 1, 150, 150, 72), dict(window=(16, 16), sinks=True)),
    ("d64-unbounded-two-tiles-lq-lt-lk", (1, 2, 1, 1030, 1100, 64), dict()),
    ("d48-softcap-globals", (1, 2, 2, 180, 180, 48), dict(window=(20, 5), softcap=5.0, globals=True)),
    ("d33-odd-dim", (1, 2, 2, 120, 120, 33), dict(window=(10, 10))),  # odd D: the float products
]


def torch_bf16(q, k, v, allowed, sinks, softcap, scale):
    if sinks is None and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True, scale=scale)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    w = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    if sinks is not None:
        w = w[..., :-1]
    return w @ v


results = []
gen = torch.Generator().manual_seed(0)
for name, (B, Hq, Hk, Lq, Lk, D), kw in CASES:
    kw = dict(kw)
    q, k, v = random_qkv(B, Hq, Hk, Lq, Lk, D, torch.bfloat16, "cpu", generator=gen)
    extra = {}
    if kw.pop("globals", False):
        extra["global_mask"] = torch.rand(B, Lk, generator=gen) < 0.03
    sinks = None
    if kw.pop("sinks", False):
        sinks = torch.randn(Hq, generator=gen).bfloat16()
    scale = 1 / math.sqrt(D)
    allowed = reference.allowed_keys(Lq, Lk, kw.get("window", (None, None)), kw.get("causal", False),
                                     kw.get("dilation", 1), extra.get("global_mask"))
    leaves = {}
    for who, dtype in (("ours", torch.bfloat16), ("torch", torch.bfloat16), ("exact", torch.float64)):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        s = sinks.detach().to(dtype).requires_grad_() if sinks is not None else None
        if who == "torch":
            o = torch_bf16(*ins, allowed, s, kw.get("softcap"), scale)
        else:
            fn = longreach.local_attention if who == "ours" else reference.local_attention
            o = fn(*ins, **kw, **extra, sinks=s)
        leaves[who] = (o, ins + ([s] if s is not None else []))
    g = torch.randn(leaves["exact"][0].shape, dtype=torch.float64, generator=gen)
    quantities = {}
    for who, (o, ins) in leaves.items():
        gs = grads([o], [g.to(o.dtype)], ins)
        quantities[who] = dict(zip(["out", "dq", "dk", "dv", "dsinks"], [o] + list(gs)))
    for what in quantities["exact"]:
        e = quantities["exact"][what]
        for measure in (scaled_error, rms_error):
            results.append(dict(case=name, what=what, measure=measure.__name__,
                                ours=measure(quantities["ours"][what], e), torch=measure(quantities["torch"][what], e)))
print(json.dumps({"kernels": torch.ops.longreach._debug_cpu_kernels(), "results": results}))
"""


# The float path, the AVX512_BF16 products and (where the CPU has it) AMX-BF16.
KERNELS = {"float": dict(LONGREACH_CPU_BF16="0"), "avx512_bf16": dict(LONGREACH_CPU_BF16="1", LONGREACH_CPU_AMX="0"),
           "amx_bf16": dict(LONGREACH_CPU_BF16="1", LONGREACH_CPU_AMX="1")}


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_bf16_forward_and_gradients_within_twice_torch(kernels):
    if "avx512" not in torch.ops.longreach._debug_cpu_kernels():
        pytest.skip("no AVX512 capability here")
    env = dict(os.environ, OMP_NUM_THREADS="1", **KERNELS[kernels])
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", SCRIPT, tests_dir], env=env, capture_output=True, text=True,
                         timeout=600)
    if kernels != "float" and run.returncode != 0 and "cannot run" in run.stderr:
        pytest.skip(f"this CPU cannot run the {kernels} kernels")
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["kernels"] == ("avx512" if kernels == "float" else f"avx512+{kernels}"), res["kernels"]
    eps = 2.0**-8
    bad = [r for r in res["results"] if not r["ours"] <= 2 * r["torch"] + 0.1 * eps]
    assert not bad, "longreach > 2 x torch's error + 0.1 eps:\n" + "\n".join(
        f"{r['case']} {r['what']} {r['measure']}: {r['ours']:.3g} vs torch {r['torch']:.3g}" for r in bad)
    whats = {(r["case"], r["what"]) for r in res["results"]}
    assert ("d72-mqa-window-sinks", "dsinks") in whats  # the sinks' gradient was compared
