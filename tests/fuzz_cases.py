"""Bad and extreme arguments for longreach.local_attention, apply_rotary and apply_rotary_qk,
and the child process that runs them (used by tests/test_bad_input_fuzz.py).

Every case is a `FuzzCase`: an id, a kind, the regex its error message must match (the
argument's name), and a zero-argument `call` (plus, for valid values, a `check` of the result
against an independent reference). Kinds:

- ``bad``: the call must raise TypeError, ValueError or RuntimeError (NotImplementedError
  included) with a message that names the argument and the function;
- ``extreme``: a valid but extreme value: the call must return, and its result (and for
  attention its gradients) must equal the reference on a small problem;
- ``either``: a value a library may reasonably reject or accept (a window of 2**64, a scale the
  compute dtype cannot hold, a NaN slope): a clean error as for ``bad``, or a result equal to
  the reference.

`child_main()` reads case ids (JSON) on stdin and runs them one by one, writing a JSON line
before (``start``) and after (``result``) each, so that the parent can attribute a crash or a
hang to the case that was running. It builds the cases itself from this module, so parent and
child agree on them by id.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

MARK = "@@fuzz@@ "
ALLOWED_ERRORS = ("TypeError", "ValueError", "RuntimeError")  # NotImplementedError is a RuntimeError
# Phrases that mean the message leaks C++ or dispatcher internals instead of explaining.
UNCLEAR_PHRASES = ("c10::", "long int", "std::", "Expected a value of type", "found type", "at::Tensor")


class HarnessError(Exception):
    """The case's own setup failed (a bug in this file, not in the library)."""


def prepared(build):
    """Run `build()` (the inputs of a call), turning its errors into HarnessError."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001
        raise HarnessError(f"building the inputs failed: {type(err).__name__}: {err}") from err


@dataclass
class FuzzCase:
    id: str
    kind: str  # bad | extreme | either
    names: str  # regex the message must match: the argument (or arguments) at fault
    function: str  # local_attention | apply_rotary | apply_rotary_qk: the message must name it
    call: Callable[[], object]
    check: Optional[Callable[[object], Tuple[bool, str]]] = None  # extreme / either: result vs reference


# ----------------------------------------------------------------------------- comparison


def compare(ours: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> Tuple[bool, str]:
    """Same shape, NaN and +-inf in the same places, finite entries within a scaled error
    (max |err| / max(1, max |expected|)), all in float64."""
    if not isinstance(ours, torch.Tensor):
        return False, f"{what}: got {type(ours).__name__}, expected a tensor"
    if tuple(ours.shape) != tuple(expected.shape):
        return False, f"{what}: shape {tuple(ours.shape)} != expected {tuple(expected.shape)}"
    a, e = ours.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64)
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        first = tuple(int(i) for i in (torch.isnan(a) != torch.isnan(e)).nonzero()[0])
        return False, (f"{what}: NaN in {int(torch.isnan(a).sum())} entries, expected {int(torch.isnan(e).sum())}; "
                       f"first difference at {first}: got {a[first].item()}, expected {e[first].item()}")
    inf = torch.isinf(e)
    if not torch.equal(torch.isinf(a), inf) or not torch.equal(a[inf], e[inf]):
        diff = (torch.isinf(a) != inf) | (inf & (a != e))
        first = tuple(int(i) for i in diff.nonzero()[0])
        return False, f"{what}: infinities differ at {first}: got {a[first].item()}, expected {e[first].item()}"
    fin = torch.isfinite(e)
    if fin.any():
        err = float((a[fin] - e[fin]).abs().max() / max(1.0, float(e[fin].abs().max())))
        if not err <= tol:
            return False, f"{what}: scaled error {err:.3g} > {tol:.3g}"
    return True, f"{what}: equal to the reference"


# ----------------------------------------------------------------------------- attention

B, HQ, HK, L, D = 2, 4, 2, 8, 16


def qkv(batch=B, q_heads=HQ, kv_heads=HK, q_len=L, k_len=L, head_dim=D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)

    return (draw(batch, q_heads, q_len, head_dim), draw(batch, kv_heads, k_len, head_dim),
            draw(batch, kv_heads, k_len, head_dim))


_DEFAULT = object()


def attention_call(q=_DEFAULT, k=_DEFAULT, v=_DEFAULT, **kwargs):
    """A local_attention call with the default (valid) tensors where none are given."""
    def call():
        import longreach

        dq, dk, dv = prepared(qkv)
        return longreach.local_attention(dq if q is _DEFAULT else q, dk if k is _DEFAULT else k,
                                         dv if v is _DEFAULT else v, **kwargs)

    return call


POISON_AT = (0, 0, 3, 5)  # (batch, head, position, feature) of the NaN / inf in the poisoned cases


def attention_extreme(kwargs, ref_kwargs=None, shapes=None, dtype=torch.float64, tol=None, backward=True,
                      poison=None):
    """(call, check) of a valid extreme configuration: the output, lse and gradients of the op
    against longreach.reference in float64 on `ref_kwargs` (an equivalent sane configuration,
    e.g. dilation 10**6 for 2**62, where the reference cannot take the value itself).

    ``poison=(which, value)`` puts a NaN or inf into q, k or v at POISON_AT. For q and k the
    dense reference has the semantics (NaN in the rows that use the entry, nowhere else); for v
    it would spread 0 * NaN to every row of the head, so the expected result is the reference on
    the clean v with that one feature set to the value in the rows whose window holds the key."""
    shapes = shapes or {}
    ref_kwargs = dict(kwargs if ref_kwargs is None else ref_kwargs)
    tol = tol if tol is not None else (1e-10 if dtype == torch.float64 else 2e-5)

    def tensors():
        q, k, v = qkv(dtype=dtype, **shapes)
        if poison is not None:
            {"q": q, "k": k, "v": v}[poison[0]][POISON_AT] = poison[1]
        return q, k, v

    def resolve(kw):
        return {key: (val() if callable(val) else val) for key, val in kw.items()}

    def call():
        import longreach

        q, k, v, kw = prepared(lambda: (*(t.requires_grad_() for t in tensors()), resolve(kwargs)))
        got = longreach.local_attention(q, k, v, **kw)
        got = got if isinstance(got, tuple) else (got,)
        grads = None
        if backward:
            cot = [torch.ones_like(g) for g in got]
            cot = [torch.where(torch.isfinite(g), c, torch.zeros_like(c)) for g, c in zip(got, cot)]
            grads = torch.autograd.grad(got, (q, k, v), cot, allow_unused=True, materialize_grads=True)
        return got, grads

    def check(result):
        from longreach import reference

        got, grads = result
        q, k, v = (t.to(torch.float64).requires_grad_() for t in tensors())
        if poison is not None and poison[0] == "v":
            v = v.detach().clone()
            v[POISON_AT] = 0.0
        want = reference.local_attention(q, k, v, **resolve(ref_kwargs))
        want = want if isinstance(want, tuple) else (want,)
        if poison is not None and poison[0] == "v":
            b, h, j, f = POISON_AT
            kw = resolve(ref_kwargs)
            gm = kw.get("global_mask")
            allowed = reference.allowed_keys(q.shape[2], k.shape[2], kw.get("window", (None, None)) or (None, None),
                                             kw.get("causal", False), kw.get("dilation", 1), gm)
            rows = allowed[min(b, allowed.shape[0] - 1), :, j]
            group = q.shape[1] // k.shape[1]
            out = want[0].detach().clone()
            got_out = got[0].detach().to(torch.float64)
            for hq in range(h * group, (h + 1) * group):
                out[b, hq, rows, f] = poison[1]
                # docs/semantics.md: like a dense P @ V (0 * NaN = NaN), the fused products may also
                # spread a NaN / inf in v_j to other rows of the same 64-row block (all L rows here),
                # in that feature only; such an entry must then be NaN, never a finite wrong value.
                spread = ~rows & torch.isnan(got_out[b, hq, :, f])
                out[b, hq, spread, f] = math.nan
            want = (out,) + want[1:]
        if len(got) != len(want):
            return False, f"returned {len(got)} tensors, expected {len(want)}"
        for name, a, e in zip(("out", "lse"), got, want):
            ok, detail = compare(a, e, tol, name)
            if not ok:
                return ok, detail
        if backward:
            cot = [torch.where(torch.isfinite(w), torch.ones_like(w), torch.zeros_like(w)) for w in want]
            want_grads = torch.autograd.grad(want, (q, k, v), cot, allow_unused=True, materialize_grads=True)
            for name, a, e in zip(("dq", "dk", "dv"), grads, want_grads):
                ok, detail = compare(a, e, tol, name)
                if not ok:
                    return ok, detail
        return True, "out, lse and gradients equal to the reference"

    return call, check


def _attention_cases() -> List[FuzzCase]:
    cases: List[FuzzCase] = []
    F = "local_attention"

    def bad(cid, names, **call_args):
        cases.append(FuzzCase(f"attn-{cid}", "bad", names, F, attention_call(**call_args)))

    def extreme(cid, kwargs, **kw):
        call, check = attention_extreme(kwargs, **kw)
        cases.append(FuzzCase(f"attn-{cid}", "extreme", r".", F, call, check))

    def either(cid, names, kwargs, **kw):
        call, check = attention_extreme(kwargs, **kw)
        cases.append(FuzzCase(f"attn-{cid}", "either", names, F, call, check))

    q0, k0, v0 = qkv()
    # --- q, k, v: wrong types, dtypes, ranks, shapes, devices
    for name, t in (("q", q0), ("k", k0), ("v", v0)):
        pat = rf"\b{name}\b"
        for label, value in (("str", "abc"), ("list", t.tolist()), ("numpy", t.numpy()), ("bool", True),
                             ("None", None), ("complex", 1j), ("int", 3), ("float", 1.5)):
            bad(f"{name}-{label}", pat, **{name: value})
        for label, dtype in (("complex64", torch.complex64), ("int32", torch.int32), ("int64", torch.int64),
                             ("bool_dtype", torch.bool), ("float64", torch.float64), ("float16", torch.float16),
                             ("uint8", torch.uint8)):
            bad(f"{name}-{label}", pat, **{name: t.to(dtype)})
        bad(f"{name}-rank3", pat, **{name: t[0]})
        bad(f"{name}-rank5", pat, **{name: t[None]})
        bad(f"{name}-rank0", pat, **{name: torch.tensor(1.0)})
        bad(f"{name}-meta", pat, **{name: t.to("meta")})
    for label, dtype in (("complex64", torch.complex64), ("int32", torch.int32), ("bool", torch.bool),
                         ("float8", getattr(torch, "float8_e4m3fn", torch.int8))):
        bad(f"qkv-all-{label}", r"\b(q|k|v)\b", q=q0.to(dtype), k=k0.to(dtype), v=v0.to(dtype))
    bad("k-batch", r"\bk\b|batch", k=qkv(batch=3)[1], v=qkv(batch=3)[2])
    bad("k-head-dim", r"\bk\b|head dim", k=k0[..., :8], v=v0[..., :8])
    bad("v-length", r"\bv\b", v=qkv(k_len=9)[2])
    bad("v-head-dim", r"\bv\b", v=v0[..., :8])
    bad("kv-heads-not-divisor", r"heads|\bk\b", k=qkv(kv_heads=3)[1], v=qkv(kv_heads=3)[2])
    bad("kv-zero-heads", r"heads|\bk\b", k=k0[:, :0], v=v0[:, :0])
    bad("qkv-zero-head-dim", r"\bq\b|head dim|\bD\b", q=q0[..., :0], k=k0[..., :0], v=v0[..., :0])
    bad("qkv-all-meta-k-cpu", r"\bk\b|device", q=q0.to("meta"), v=v0.to("meta"))
    # --- window
    pat = r"window"
    for label, value in (("str", "ab"), ("int", 3), ("triple", (1, 2, 3)), ("single", (1,)), ("empty", ()),
                         ("dict", {0: 1, 1: 2}), ("set", {1, 2}), ("numpy", np.array([1, 2])),
                         ("tensor", torch.tensor([1, 2])), ("float-side", (1.5, 0)), ("bool-side", (True, 0)),
                         ("bool-right", (0, False)), ("str-side", ("1", 0)), ("complex-side", (1j, 0)),
                         ("negative", (-1, 0)), ("negative-right", (0, -5)), ("min-int64", (-2**63, 0)),
                         ("below-min-int64", (0, -2**64)), ("nan", (math.nan, 0)), ("inf", (math.inf, 0)),
                         ("tensor-side", (torch.tensor(1), 0)), ("numpy-side", (np.array([3]), 0)),
                         ("nested", ((1, 2), 0)), ("bool", True)):
        bad(f"window-{label}", pat, window=value)
    # --- causal
    for label, value in (("str", "no"), ("empty-str", ""), ("int1", 1), ("int0", 0), ("None", None),
                         ("float", 0.5), ("list", [True]), ("tensor", torch.tensor(True)), ("complex", 1j)):
        bad(f"causal-{label}", r"causal", causal=value)
    # --- dilation
    for label, value in (("zero", 0), ("negative", -1), ("min-int64", -2**63), ("below-min-int64", -2**64),
                         ("float", 1.5), ("float-integral", 2.0), ("str", "2"), ("True", True), ("False", False),
                         ("None", None), ("complex", 1j), ("nan", math.nan), ("inf", math.inf), ("list", [2]),
                         ("numpy", np.array(2)), ("tensor", torch.tensor(2))):
        bad(f"dilation-{label}", r"dilation", dilation=value)
    # --- global_mask
    g0 = torch.zeros(B, L, dtype=torch.bool)
    g0[:, 3] = True
    for label, value in (("list", g0.tolist()), ("numpy", g0.numpy()), ("str", "abc"), ("bool", True),
                         ("int", 1), ("complex", 1j), ("float", g0.float()), ("int64", g0.long()),
                         ("uint8", g0.to(torch.uint8)), ("complex-tensor", g0.to(torch.complex64)),
                         ("length", torch.ones(B, L + 1, dtype=torch.bool)), ("rank1", torch.ones(L, dtype=torch.bool)),
                         ("rank3", torch.ones(1, B, L, dtype=torch.bool)),
                         ("batch", torch.ones(B + 1, L, dtype=torch.bool)), ("rank0", torch.tensor(True)),
                         ("meta", g0.to("meta")), ("empty", torch.ones(0, 0, dtype=torch.bool))):
        bad(f"global_mask-{label}", r"global_mask", global_mask=value)
    # --- alibi_slopes
    s0 = torch.full((HQ,), 0.25)
    for label, value in (("float", 0.5), ("list", [0.5] * HQ), ("numpy", s0.numpy()), ("str", "x"), ("bool", True),
                         ("complex", 1j), ("length", torch.ones(HQ + 1)), ("kv-heads", torch.ones(HK)),
                         ("batch", torch.ones(B + 1, HQ)), ("rank3", torch.ones(B, HQ, 1)), ("rank0", torch.tensor(0.5)),
                         ("float64", s0.double()), ("float16", s0.half()), ("int", s0.long()),
                         ("bool-tensor", s0 > 0), ("complex-tensor", s0.to(torch.complex64)), ("meta", s0.to("meta")),
                         ("empty", torch.ones(0))):
        bad(f"alibi_slopes-{label}", r"alibi_slopes", alibi_slopes=value)
    # --- score
    for label, value in (("unknown", "relu"), ("empty", ""), ("case", "Softmax"), ("None", None), ("int", 1),
                         ("bytes", b"softmax"), ("list", ["softmax"]), ("bool", True)):
        bad(f"score-{label}", r"score", score=value)
    # --- sigmoid_bias
    for label, value in (("str", "x"), ("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("list", [1.0]),
                         ("complex", 1j), ("bool", True), ("numpy-array", np.array([0.5]))):
        bad(f"sigmoid_bias-{label}", r"sigmoid_bias", score="sigmoid", sigmoid_bias=value)
    bad("sigmoid_bias-nan-with-softmax", r"sigmoid_bias", sigmoid_bias=math.nan)
    bad("sigmoid_bias-str-with-softmax", r"sigmoid_bias", sigmoid_bias="x")
    # --- softcap
    for label, value in (("str", "1"), ("True", True), ("False", False), ("nan", math.nan), ("inf", math.inf),
                         ("-inf", -math.inf), ("zero", 0), ("zero-float", 0.0), ("negative", -1.0), ("list", [1.0]),
                         ("complex", 1j), ("tensor-1d", torch.ones(2)), ("numpy-array", np.array([30.0]))):
        bad(f"softcap-{label}", r"softcap", softcap=value)
    # --- scale
    for label, value in (("str", "1"), ("tensor-1d", torch.ones(2)), ("nan", math.nan), ("inf", math.inf),
                         ("-inf", -math.inf), ("complex", 1j), ("list", [1.0]), ("True", True),
                         ("numpy-array", np.array([0.5]))):
        bad(f"scale-{label}", r"scale", scale=value)
    # --- return_lse
    for label, value in (("str", "yes"), ("int", 1), ("None", None), ("list", [True]), ("tensor", torch.tensor(True))):
        bad(f"return_lse-{label}", r"return_lse", return_lse=value)
    bad("return_lse-with-sigmoid", r"return_lse", score="sigmoid", return_lse=True)

    # --- valid edges: zero sizes
    for label, shapes in (("batch0", dict(batch=0)), ("lq0", dict(q_len=0)), ("lk0", dict(k_len=0)),
                          ("lq0-lk0", dict(q_len=0, k_len=0)), ("lq-gt-lk", dict(q_len=11, k_len=3)),
                          ("d1", dict(head_dim=1)), ("mqa", dict(kv_heads=1))):
        extreme(f"zero-or-small-{label}", dict(window=(2, 1), return_lse=True), shapes=shapes)
    # --- valid extreme integers (issue 12, item 3): no crash, result equal to the reference
    big_d = 10**6  # any dilation >= max(Lq, Lk) is the same problem
    for dlabel, dil in (("2pow31-1", 2**31 - 1), ("2pow31", 2**31), ("2pow32+1", 2**32 + 1), ("2pow53", 2**53),
                        ("2pow53+1", 2**53 + 1), ("2pow62", 2**62), ("2pow63-2", 2**63 - 2), ("2pow63-1", 2**63 - 1)):
        for wname, window in (("w3", (3, 3)), ("wnone", (None, None)), ("whuge", (2**62, 2**62)),
                              ("wmax", (2**63 - 1, 2**63 - 1))):
            ref_window = tuple(None if (s is not None and s > 10**6) else s for s in window)
            extreme(f"dilation-{dlabel}-{wname}", dict(window=window, dilation=dil),
                    ref_kwargs=dict(window=ref_window, dilation=big_d))
        extreme(f"dilation-{dlabel}-causal-global-lq-gt-lk",
                dict(window=(3, 3), dilation=dil, causal=True, global_mask=lambda: _gmask(B, 5, [1])),
                ref_kwargs=dict(window=(3, 3), dilation=big_d, causal=True, global_mask=lambda: _gmask(B, 5, [1])),
                shapes=dict(q_len=9, k_len=5))
    extreme("dilation-2pow53-L1000", dict(window=(None, None), dilation=2**53),
            ref_kwargs=dict(window=(None, None), dilation=big_d), shapes=dict(q_len=1000, k_len=1000, head_dim=4,
                                                                             q_heads=2, kv_heads=1, batch=1))
    for wname, window in (("left-2pow62", (2**62, 0)), ("right-2pow62", (0, 2**62)), ("max-left", (2**63 - 1, 0)),
                          ("max-right", (1, 2**63 - 1)), ("max-both", (2**63 - 1, 2**63 - 1))):
        for dil in (1, 3):
            ref_window = tuple(None if s > 10**6 else s for s in window)
            extreme(f"window-{wname}-dil{dil}", dict(window=window, dilation=dil),
                    ref_kwargs=dict(window=ref_window, dilation=dil))
    extreme("window-list", dict(window=[2, 1]), ref_kwargs=dict(window=(2, 1)))
    extreme("window-2pow62-causal", dict(window=(2**62, 2**62), causal=True), ref_kwargs=dict(window=(None, 0), causal=True))
    extreme("window-None", dict(window=None), ref_kwargs=dict(window=(None, None)))
    # Values past int64: reject with a clear message, or compute the equivalent problem.
    for label, window, ref in (("2pow63", (2**63, 0), (None, 0)), ("2pow64", (2**64, 2**64), (None, None)),
                               ("1e30", (10**30, 1), (None, 1))):
        either(f"window-{label}", r"window", dict(window=window), ref_kwargs=dict(window=ref))
    for dlabel, dil in (("2pow63", 2**63), ("2pow64", 2**64), ("1e30", 10**30)):
        either(f"dilation-{dlabel}", r"dilation", dict(window=(3, 3), dilation=dil),
               ref_kwargs=dict(window=(3, 3), dilation=big_d))
    # --- valid extreme floats
    extreme("softcap-1e300-f64", dict(softcap=1e300, return_lse=True), ref_kwargs=dict(return_lse=True))
    extreme("softcap-1e30-f32", dict(softcap=1e30, return_lse=True), ref_kwargs=dict(return_lse=True),
            dtype=torch.float32)
    extreme("softcap-1e-300-f64", dict(softcap=1e-300, return_lse=True))
    extreme("softcap-min-subnormal-f64", dict(softcap=5e-324))
    either("softcap-1e39-f32", r"softcap", dict(softcap=1e39), ref_kwargs=dict(), dtype=torch.float32)
    either("softcap-1e300-f32", r"softcap", dict(softcap=1e300), ref_kwargs=dict(), dtype=torch.float32)
    extreme("scale-zero", dict(scale=0.0, return_lse=True))
    extreme("scale-negative", dict(scale=-1.0, return_lse=True))
    extreme("scale-int", dict(scale=1), ref_kwargs=dict(scale=1.0))
    extreme("scale-1e300-f64", dict(scale=1e300, return_lse=False), backward=False)
    extreme("scale-min-subnormal-f64", dict(scale=5e-324))
    either("scale-1e39-f32", r"scale", dict(scale=1e39), dtype=torch.float32, backward=False)
    either("scale-1e300-f32", r"scale", dict(scale=1e300), dtype=torch.float32, backward=False)
    either("scale-0d-tensor", r"scale", dict(scale=torch.tensor(0.5)), ref_kwargs=dict(scale=0.5))
    either("softcap-0d-tensor", r"softcap", dict(softcap=torch.tensor(5.0)), ref_kwargs=dict(softcap=5.0))
    either("sigmoid_bias-0d-tensor", r"sigmoid_bias", dict(score="sigmoid", sigmoid_bias=torch.tensor(-1.0)),
           ref_kwargs=dict(score="sigmoid", sigmoid_bias=-1.0))
    extreme("sigmoid_bias-1e30-f32", dict(score="sigmoid", sigmoid_bias=1e30), dtype=torch.float32)
    extreme("sigmoid_bias-minus-1e30-f32", dict(score="sigmoid", sigmoid_bias=-1e30), dtype=torch.float32)
    either("sigmoid_bias-1e300-f32", r"sigmoid_bias", dict(score="sigmoid", sigmoid_bias=1e300), dtype=torch.float32)
    extreme("sigmoid_bias-1e300-f64", dict(score="sigmoid", sigmoid_bias=1e300))
    extreme("alibi-1e30", dict(alibi_slopes=lambda: torch.full((HQ,), 1e30), return_lse=True))
    extreme("alibi-minus-1e30", dict(alibi_slopes=lambda: torch.full((HQ,), -1e30), return_lse=True))
    extreme("alibi-expanded-batch", dict(alibi_slopes=lambda: torch.tensor([0.5, -0.25, 0.125, 1.0]).expand(B, HQ)))
    extreme("global_mask-expanded", dict(window=(1, 0), global_mask=lambda: _gmask(1, L, [5]).expand(B, L)))
    extreme("global_mask-all-lq-gt-lk", dict(window=(0, 0), global_mask=lambda: torch.ones(B, 4, dtype=torch.bool),
                                             return_lse=True), shapes=dict(q_len=9, k_len=4))
    # NaN / inf inside the tensors (issue 12, item 7): NaN in the affected rows, as the float64
    # reference gives, never finite garbage or zeros. A NaN slope may also be rejected.
    for dtype, dname in ((torch.float64, "f64"), (torch.float32, "f32"), (torch.bfloat16, "bf16"),
                         (torch.float16, "f16")):
        for score in ("softmax", "sigmoid"):
            for which, value in (("q", math.nan), ("k", math.nan), ("v", math.nan), ("v", math.inf)):
                extreme(f"{'nan' if math.isnan(value) else 'inf'}-in-{which}-{score}-{dname}",
                        dict(window=(2, 2), score=score), dtype=dtype, backward=False, poison=(which, value),
                        tol=_low_tol(dtype))
    for label, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
        either(f"alibi-{label}", r"alibi_slopes",
               dict(window=(2, 2), alibi_slopes=lambda value=value: torch.tensor([0.5, value, 0.25, 0.125])),
               backward=False)
    # Everything on meta is shape inference, not an error.
    cases.append(FuzzCase("attn-all-meta", "extreme", r".", F, _all_meta_call, _all_meta_check))
    return cases


def _low_tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


def _gmask(batch, length, keys):
    m = torch.zeros(batch, length, dtype=torch.bool)
    m[:, keys] = True
    return m


def _all_meta_call():
    import longreach

    q, k, v = (t.to("meta") for t in qkv())
    return longreach.local_attention(q, k, v, window=(2, 1), return_lse=True)


def _all_meta_check(result):
    out, lse = result
    ok = out.device.type == "meta" and tuple(out.shape) == (B, HQ, L, D) and tuple(lse.shape) == (B, HQ, L)
    return ok, f"meta out {tuple(out.shape)} on {out.device}, lse {tuple(lse.shape)}"


# ----------------------------------------------------------------------------- rotary

RB, RH, RHK, RL, RD, TABLE, HALF = 2, 3, 1, 8, 16, 12, 4


def rope_tables(table_len=TABLE, half=HALF, dtype=torch.float32):
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(table_len, dtype=torch.float64)[:, None] * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotary_reference(x, cos, sin, position_ids=None, interleaved=False):
    """Rotation in float64 from the definition (y1 = x1 c - x2 s, y2 = x2 c + x1 s)."""
    Bx, Hx, Lx, Dx = x.shape
    half = cos.shape[-1]
    pos = torch.arange(Lx).expand(Bx, Lx) if position_ids is None else position_ids.expand(Bx, Lx)
    c = cos.double()[pos][:, None]
    s = sin.double()[pos][:, None]
    y = x.double().clone()
    idx1 = torch.arange(0, 2 * half, 2) if interleaved else torch.arange(half)
    idx2 = idx1 + 1 if interleaved else idx1 + half
    x1, x2 = x.double()[..., idx1], x.double()[..., idx2]
    y[..., idx1] = x1 * c - x2 * s
    y[..., idx2] = x2 * c + x1 * s
    return y


def _x(batch=RB, heads=RH, length=RL, dim=RD, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, dtype=torch.float64, generator=gen).to(dtype)


def rotary_call(fn, **over):
    def call():
        import longreach

        def build():
            cos, sin = rope_tables()
            args = dict(cos=cos, sin=sin, position_ids=None, interleaved=False)
            if fn == "apply_rotary":
                args = dict(x=_x(), **args)
            else:
                args = dict(q=_x(), k=_x(heads=RHK, seed=2), **args)
            args.update(over)
            return args

        return getattr(longreach, fn)(**prepared(build))

    return call


def rotary_extreme(fn, x_shape=None, cos_sin=None, position_ids=None, interleaved=False, x_dtype=torch.float32,
                   tol=2e-6, k_shape=None):
    def inputs():
        cos, sin = cos_sin() if cos_sin else rope_tables()
        xs = [_x(**(x_shape or {}), dtype=x_dtype)]
        if fn == "apply_rotary_qk":
            xs.append(_x(**{**(x_shape or {}), "heads": RHK, **(k_shape or {})}, dtype=x_dtype, seed=2))
        pos = position_ids() if callable(position_ids) else position_ids
        return xs, cos, sin, pos

    def call():
        import longreach

        xs, cos, sin, pos = prepared(inputs)
        out = getattr(longreach, fn)(*xs, cos, sin, pos, interleaved=interleaved)
        return out if isinstance(out, tuple) else (out,)

    def check(result):
        xs, cos, sin, pos = inputs()
        for name, got, x in zip(("q", "k") if fn == "apply_rotary_qk" else ("x",), result, xs):
            ok, detail = compare(got, rotary_reference(x, cos, sin, pos, interleaved), tol, name)
            if not ok:
                return ok, detail
        return True, "equal to the reference rotation"

    return call, check


def _rotary_cases() -> List[FuzzCase]:
    cases: List[FuzzCase] = []
    cos0, sin0 = rope_tables()
    pos0 = torch.arange(RL)[None]
    for fn in ("apply_rotary", "apply_rotary_qk"):
        short = "rot" if fn == "apply_rotary" else "rotqk"

        def bad(cid, names, **over):
            cases.append(FuzzCase(f"{short}-{cid}", "bad", names, fn, rotary_call(fn, **over)))

        xs = ("x",) if fn == "apply_rotary" else ("q", "k")
        for name in xs:
            t = _x(heads=RHK if name == "k" else RH)
            pat = rf"\b{name}\b"
            for label, value in (("str", "abc"), ("list", t.tolist()), ("numpy", t.numpy()), ("None", None),
                                 ("bool", True), ("complex", 1j), ("int", 3)):
                bad(f"{name}-{label}", pat, **{name: value})
            for label, dtype in (("complex64", torch.complex64), ("int64", torch.int64), ("bool_dtype", torch.bool),
                                 ("uint8", torch.uint8)):
                bad(f"{name}-{label}", pat, **{name: t.to(dtype)})
            bad(f"{name}-rank3", pat, **{name: t[0]})
            bad(f"{name}-rank5", pat, **{name: t[None]})
            bad(f"{name}-rank0", pat, **{name: torch.tensor(1.0)})
            bad(f"{name}-meta", pat, **{name: t.to("meta")})
            bad(f"{name}-too-long-for-table", rf"{pat}|cos|sin|table", **{name: _x(length=TABLE + 1,
                                                                                heads=RHK if name == "k" else RH)})
            bad(f"{name}-head-dim-below-rot-dim", rf"{pat}|cos|sin|rot_dim",
                **{name: _x(dim=2 * HALF - 2, heads=RHK if name == "k" else RH)})
        if fn == "apply_rotary_qk":
            # With position ids given, k must match them (and q) in batch and length.
            bad("k-batch-with-position-ids", r"\bk\b|batch|position_ids", k=_x(batch=RB + 1, heads=RHK),
                position_ids=torch.arange(RL).expand(RB, RL).contiguous())
            bad("k-length-with-position-ids", r"\bk\b|length|position_ids", k=_x(length=RL - 1, heads=RHK),
                position_ids=pos0)
            bad("k-dtype", r"\bk\b|dtype", k=_x(heads=RHK, dtype=torch.float64))
            # Without ids each tensor can be rotated by its own positions 0 .. L-1: reject, or do that.
            for label, k_shape in (("k-batch", dict(batch=RB + 1)), ("k-length", dict(length=RL - 1)),
                                   ("k-head-dim", dict(dim=RD + 2)), ("k-zero-heads", dict(heads=0))):
                call, check = rotary_extreme(fn, k_shape=k_shape)
                cases.append(FuzzCase(f"{short}-{label}", "either", r"\bk\b|batch|length|head", fn, call, check))
        for name, t in (("cos", cos0), ("sin", sin0)):
            pat = rf"\b{name}\b"
            for label, value in (("str", "abc"), ("list", t.tolist()), ("numpy", t.numpy()), ("None", None),
                                 ("bool", True), ("float", 0.5), ("complex", 1j)):
                bad(f"{name}-{label}", pat, **{name: value})
            for label, dtype in (("complex64", torch.complex64), ("int64", torch.int64), ("bool_dtype", torch.bool),
                                 ("float64-vs-float32", torch.float64), ("float16-vs-float32", torch.float16)):
                bad(f"{name}-{label}", r"\bcos\b|\bsin\b", **{name: t.to(dtype)})
            bad(f"{name}-rank1", r"\bcos\b|\bsin\b", **{name: t[:, 0]})
            bad(f"{name}-rank3", r"\bcos\b|\bsin\b", **{name: t[None]})
            bad(f"{name}-rank0", r"\bcos\b|\bsin\b", **{name: torch.tensor(1.0)})
            bad(f"{name}-meta", r"\bcos\b|\bsin\b|device", **{name: t.to("meta")})
            bad(f"{name}-shape-mismatch", r"\bcos\b|\bsin\b", **{name: t[:, :HALF - 1]})
        bad("tables-too-wide", r"\bcos\b|\bsin\b|rot_dim", cos=rope_tables(half=RD // 2 + 1)[0],
            sin=rope_tables(half=RD // 2 + 1)[1])
        bad("tables-no-columns", r"\bcos\b|\bsin\b|column", cos=cos0[:, :0], sin=sin0[:, :0])
        bad("tables-too-short", r"\bcos\b|\bsin\b|table", cos=cos0[: RL - 1], sin=sin0[: RL - 1])
        bad("tables-meta", r"\bcos\b|\bsin\b|device", cos=cos0.to("meta"), sin=sin0.to("meta"))
        pat = r"position_ids"
        for label, value in (("float", pos0.float()), ("int32", pos0.int()), ("bool", pos0 > 0),
                             ("complex", pos0.to(torch.complex64)), ("list", pos0.tolist()), ("numpy", pos0.numpy()),
                             ("str", "abc"), ("int", 3), ("complex-scalar", 1j), ("batch", torch.zeros(RB + 1, RL).long()),
                             ("rank1", torch.arange(RL)), ("length", torch.arange(RL + 1)[None]),
                             ("rank3", pos0[None]), ("rank0", torch.tensor(0)),
                             ("negative", torch.full((1, RL), -1)), ("past-table", torch.full((1, RL), TABLE)),
                             ("2pow62", torch.full((1, RL), 2**62)), ("min-int64", torch.full((1, RL), -2**63)),
                             ("max-int64", torch.full((1, RL), 2**63 - 1)), ("meta", pos0.to("meta"))):
            bad(f"position_ids-{label}", pat, position_ids=value)
        for label, value in (("int1", 1), ("int0", 0), ("str", "no"), ("None", None), ("float", 1.0), ("list", [True]),
                             ("tensor", torch.tensor(True))):
            bad(f"interleaved-{label}", r"interleaved", interleaved=value)

        def extreme(cid, **kw):
            call, check = rotary_extreme(fn, **kw)
            cases.append(FuzzCase(f"{short}-{cid}", "extreme", r".", fn, call, check))

        extreme("batch0", x_shape=dict(batch=0))
        extreme("length0", x_shape=dict(length=0))
        extreme("full-rot-dim", cos_sin=lambda: rope_tables(half=RD // 2))
        extreme("last-table-row", position_ids=lambda: torch.full((1, RL), TABLE - 1))
        extreme("expanded-position-ids", position_ids=lambda: torch.arange(RL)[None].expand(RB, RL))
        extreme("interleaved", interleaved=True)
        extreme("huge-table-values", cos_sin=lambda: tuple(t * 1e30 for t in rope_tables()))
        extreme("float64", x_dtype=torch.float64, cos_sin=lambda: rope_tables(dtype=torch.float64), tol=1e-12)
    return cases


def build_cases() -> List[FuzzCase]:
    cases = _attention_cases() + _rotary_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate fuzz case ids"
    return cases


# ----------------------------------------------------------------------------- the child


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype} on {value.device}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def _emit(record: dict) -> None:
    sys.stdout.write(MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


def run_one(case: FuzzCase) -> dict:
    try:
        result = case.call()
    except HarnessError as err:
        return {"outcome": "harness_error", "detail": str(err)[:2000]}
    except BaseException as err:  # noqa: BLE001  (classified by the parent)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        return {"outcome": "raised", "type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__],
                "message": str(err)[:2000]}
    record = {"outcome": "returned", "value": _describe(result)[:500]}
    if case.check is not None:
        try:
            ok, detail = case.check(result)
        except Exception as err:  # noqa: BLE001
            ok, detail = False, f"the check itself failed: {type(err).__name__}: {err}"
        record.update(match=bool(ok), detail=detail[:1000])
    return record


def child_main() -> None:
    import longreach  # noqa: F401  (an import failure is a failed start, not a case's error)

    torch.set_num_threads(1)
    wanted = json.loads(sys.stdin.read())
    cases = {c.id: c for c in build_cases()}
    _emit({"ready": True})
    for cid in wanted:
        _emit({"start": cid})
        start = time.perf_counter()
        record = run_one(cases[cid])
        record.update(id=cid, seconds=round(time.perf_counter() - start, 4))
        # The case's tensors are freed here (refcounts; a young-generation collection for any
        # cycle), so heap damage shows up at its own case. A full collection costs 30 ms.
        gc.collect(0)
        _emit(record)
    _emit({"done": True})
