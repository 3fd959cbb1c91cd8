"""Autograd and compiler integration of the fused op:
torch.autograd.gradcheck in float64, torch.library.opcheck on the registered
ops, torch.compile(fullgraph=True) forward and backward without recompiles,
the gradient that flows through the log-sum-exp output, torch.func's reverse
mode and vmap, and the clear errors of what is not supported (double backward,
forward mode) instead of silently zero derivatives.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import forward_ad

import longreach
from longreach import reference
from attention_testing import assert_close, balanced_alibi_slopes, grads, random_qkv, standard_alibi_slopes
from testenv import skip_unsupported_dtype

# (name, shapes (B, Hq, Hk, Lq, Lk, D), keyword arguments)
GRADCHECK_CONFIGS = [
    ("plain", (1, 2, 2, 6, 6, 4), dict()),
    ("causal_gqa_short_q", (2, 4, 2, 4, 9, 3), dict(window=(3, 0), causal=True)),
    ("dilation", (1, 2, 1, 9, 9, 4), dict(window=(2, 1), dilation=2)),
    ("dilation3_lse", (1, 2, 2, 8, 11, 3), dict(window=(1, 2), dilation=3, return_lse=True)),
    ("alibi_per_batch", (2, 4, 4, 5, 7, 3), dict(window=(2, 2), alibi_slopes="balanced_bh")),
    ("softcap", (1, 2, 2, 6, 6, 4), dict(softcap=1.5, scale=2.0, alibi_slopes="standard")),
    ("sigmoid", (1, 2, 1, 7, 7, 4), dict(score="sigmoid", window=(2, 2), softcap=3.0)),
    ("sigmoid_bias_alibi", (2, 2, 2, 5, 8, 3), dict(score="sigmoid", sigmoid_bias=0.5, alibi_slopes="balanced")),
    ("global_tokens", (2, 2, 1, 8, 8, 3), dict(window=(1, 0), causal=True, global_mask="some", return_lse=True)),
]


def resolve(kwargs, batch, q_heads, k_len, device):
    """Turn the symbolic tensor arguments of a config into tensors."""
    kwargs = dict(kwargs)
    slopes = kwargs.get("alibi_slopes")
    if slopes == "standard":
        kwargs["alibi_slopes"] = standard_alibi_slopes(q_heads).to(device)
    elif slopes == "balanced":
        kwargs["alibi_slopes"] = balanced_alibi_slopes(q_heads).to(device)
    elif slopes == "balanced_bh":
        kwargs["alibi_slopes"] = torch.stack([balanced_alibi_slopes(q_heads) * (b + 1) for b in range(batch)]).to(device)
    if kwargs.get("global_mask") == "some":
        mask = torch.zeros(batch, k_len, dtype=torch.bool)
        mask[0, [0, k_len // 2]] = True
        mask[-1, k_len - 1] = True
        kwargs["global_mask"] = mask.to(device)
    return kwargs


@pytest.mark.parametrize("name,shapes,kwargs", GRADCHECK_CONFIGS, ids=[c[0] for c in GRADCHECK_CONFIGS])
def test_gradcheck(name, shapes, kwargs, device):
    skip_unsupported_dtype(device, torch.float64)
    batch, q_heads, _, _, k_len, _ = shapes
    inputs = [t.requires_grad_() for t in random_qkv(*shapes, torch.float64, device)]
    kwargs = resolve(kwargs, batch, q_heads, k_len, device)
    assert torch.autograd.gradcheck(lambda q, k, v: longreach.local_attention(q, k, v, **kwargs), inputs)


# ---------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration and AOT dispatch.


def fwd_args(shapes, kwargs, dtype, device, requires_grad):
    """Positional arguments of torch.ops.longreach.local_attention_fwd for a config."""
    batch, q_heads, _, _, k_len, head_dim = shapes
    kw = resolve(kwargs, batch, q_heads, k_len, device)
    q, k, v = (t.requires_grad_(requires_grad) for t in random_qkv(*shapes, dtype, device))
    window = kw.get("window", (None, None))
    left = -1 if window[0] is None else window[0]
    right = 0 if kw.get("causal") else (-1 if window[1] is None else window[1])
    return (
        q, k, v, kw.get("global_mask"), kw.get("alibi_slopes"), left, right, kw.get("dilation", 1),
        kw.get("score", "softmax"), kw.get("sigmoid_bias"), float(kw.get("softcap") or 0.0),
        float(kw.get("scale", head_dim**-0.5)),
    )


OPCHECK_SAMPLES = [c for c in GRADCHECK_CONFIGS if c[0] in ("causal_gqa_short_q", "dilation3_lse", "sigmoid", "global_tokens", "softcap")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,shapes,kwargs", OPCHECK_SAMPLES, ids=[c[0] for c in OPCHECK_SAMPLES])
def test_opcheck_forward(name, shapes, kwargs, dtype, device):
    skip_unsupported_dtype(device, dtype)
    for requires_grad in (False, True):
        torch.library.opcheck(
            torch.ops.longreach.local_attention_fwd.default, fwd_args(shapes, kwargs, dtype, device, requires_grad)
        )


@pytest.mark.parametrize("with_grad_lse", [False, True])
@pytest.mark.parametrize("name,shapes,kwargs", OPCHECK_SAMPLES, ids=[c[0] for c in OPCHECK_SAMPLES])
def test_opcheck_backward(name, shapes, kwargs, with_grad_lse, device):
    args = fwd_args(shapes, kwargs, torch.float32, device, requires_grad=False)
    out, lse = torch.ops.longreach.local_attention_fwd(*args)
    grad_lse = torch.randn_like(lse) if with_grad_lse and args[8] == "softmax" else None
    bwd_args = (torch.randn_like(out), grad_lse, *args[:3], out, lse, *args[3:])
    # Without inputs that require grad: the backward op has no derivative of its own
    # (differentiating it raises, see test_double_backward_raises).
    torch.library.opcheck(
        torch.ops.longreach.local_attention_bwd.default,
        bwd_args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    # Its Autograd kernel (the one that raises) is registered where autograd finds it.
    grad_out = bwd_args[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.longreach.local_attention_bwd.default, (grad_out, *bwd_args[1:]),
                          test_utils="test_autograd_registration")


# ---------------------------------------------------------------------------
# torch.compile


def _attention_loss_fn(slopes, gmask):
    def fn(q, k, v):
        out, lse = longreach.local_attention(
            q, k, v, window=(3, 0), causal=True, dilation=2, alibi_slopes=slopes, global_mask=gmask,
            softcap=20.0, return_lse=True,
        )
        return out * 2.0, lse.exp()  # some surrounding ops so the graph is more than the op

    return fn


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager_without_recompiles(backend, device):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    shapes = (2, 4, 2, 24, 30, 16)
    slopes = balanced_alibi_slopes(4).to(device)
    gmask = torch.zeros(2, 30, dtype=torch.bool, device=device)
    gmask[:, 0] = True
    fn = _attention_loss_fn(slopes, gmask)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):  # fresh tensors of the same shape: one compilation only
            q, k, v = random_qkv(*shapes, torch.float32, device)
            a_in = [t.clone().requires_grad_() for t in (q, k, v)]
            b_in = [t.clone().requires_grad_() for t in (q, k, v)]
            got, want = compiled(*a_in), fn(*b_in)
            cot = [torch.randn_like(t) for t in want]
            for a, b, what in zip(got, want, ("out", "exp(lse)")):
                assert_close(a, b, 1e-6, what)
            for name, ga, gb in zip(("dq", "dk", "dv"), grads(got, cot, a_in), grads(want, cot, b_in)):
                assert_close(ga, gb, 1e-6, name)
    assert counter.frame_count == 1


def test_compile_traces_the_registered_ops():
    """The graph handed to the backend calls the longreach ops, not a graph break or a fallback."""
    import torch._dynamo
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    compiled = torch.compile(lambda q, k, v: longreach.local_attention(q, k, v, window=(2, 2)), backend=recorder, fullgraph=True)
    compiled(*random_qkv(1, 2, 2, 8, 8, 4, torch.float32, "cpu"))
    code = recorder.graphs[0].code
    assert "longreach.local_attention_fwd" in code, code


# ---------------------------------------------------------------------------
# Gradient through the log-sum-exp output.


@pytest.mark.parametrize("use_out", [False, True], ids=["lse_only", "lse_and_out"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(window=(4, 1), dilation=2, alibi_slopes="balanced"), dict(causal=True, softcap=5.0, global_mask="some")],
    ids=["plain", "window_dilation_alibi", "causal_softcap_global"],
)
def test_lse_gradient_matches_reference(kwargs, use_out, device):
    skip_unsupported_dtype(device, torch.float64)
    shapes = (2, 4, 2, 21, 30, 16)
    kwargs = resolve(kwargs, 2, 4, 30, device)
    q, k, v = random_qkv(*shapes, torch.float64, device)
    a_in = [t.clone().requires_grad_() for t in (q, k, v)]
    b_in = [t.clone().requires_grad_() for t in (q, k, v)]
    got = longreach.local_attention(*a_in, **kwargs, return_lse=True)
    want = reference.local_attention(*b_in, **kwargs, return_lse=True)
    assert_close(got[1], want[1], 1e-12, "lse")
    cot = [torch.randn_like(t) for t in want]
    outputs = slice(0, 2) if use_out else slice(1, 2)
    for name, ga, gb in zip(
        ("dq", "dk", "dv"), grads(got[outputs], cot[outputs], a_in), grads(want[outputs], cot[outputs], b_in)
    ):
        assert_close(ga, gb, 1e-10, name)


# ---------------------------------------------------------------------------
# torch.func and higher-order derivatives. Reverse mode goes through the kernels;
# what they cannot differentiate (the backward op, forward mode) raises
# NotImplementedError naming it instead of returning zeros (issue 12, item 5).

DOUBLE_BACKWARD = r"longreach.local_attention: double backward .* is not supported"
FORWARD_MODE = r"longreach.local_attention: forward-mode AD .* is not supported; use reverse mode"
FN_KWARGS = dict(window=(2, 1), softcap=3.0, causal=False)


def _fn(q, k, v):
    return longreach.local_attention(q, k, v, **FN_KWARGS)


def _ref(q, k, v):
    return reference.local_attention(q, k, v, **FN_KWARGS)


def _small_qkv(device, requires_grad=False):
    skip_unsupported_dtype(device, torch.float64)
    return [t.requires_grad_(requires_grad) for t in random_qkv(1, 2, 1, 5, 6, 3, torch.float64, device)]


def test_double_backward_raises(device):
    q, k, v = _small_qkv(device, requires_grad=True)
    (grad_q,) = torch.autograd.grad(_fn(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(grad_q.sum(), (q, k, v))
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        torch.autograd.gradgradcheck(_fn, (q, k, v))


def test_create_graph_alone_gives_the_first_derivative(device):
    """create_graph=True is fine as long as the gradient itself is not differentiated."""
    q, k, v = _small_qkv(device, requires_grad=True)
    got = torch.autograd.grad(_fn(q, k, v).pow(2).sum(), (q, k, v), create_graph=True)
    want = torch.autograd.grad(_ref(q, k, v).pow(2).sum(), (q, k, v))
    for a, b, name in zip(got, want, ("dq", "dk", "dv")):
        assert_close(a, b, 1e-12, name)


@pytest.mark.parametrize("how", ["jacfwd", "jvp", "hessian", "forward_ad", "forward_ad_no_grad"])
def test_forward_mode_raises(how, device):
    q, k, v = _small_qkv(device)
    f = lambda q: _fn(q, k, v)  # noqa: E731
    with pytest.raises(NotImplementedError, match=FORWARD_MODE):
        if how == "jacfwd":
            torch.func.jacfwd(f)(q)
        elif how == "jvp":
            torch.func.jvp(f, (q,), (torch.ones_like(q),))
        elif how == "hessian":
            torch.func.hessian(lambda q: f(q).sum())(q)
        else:
            with torch.set_grad_enabled(how == "forward_ad"), forward_ad.dual_level():
                f(forward_ad.make_dual(q, torch.ones_like(q)))


def test_nested_torch_func_grad_raises(device):
    q, k, v = _small_qkv(device)
    inner = torch.func.grad(lambda q: _fn(q, k, v).pow(2).sum())
    with pytest.raises(NotImplementedError, match=DOUBLE_BACKWARD):
        torch.func.grad(lambda q: inner(q).sum())(q)


def test_torch_func_reverse_mode_matches_reference(device):
    q, k, v = _small_qkv(device)
    loss = lambda fn: lambda q, k, v: fn(q, k, v).pow(2).sum()  # noqa: E731
    for a, b, name in zip(torch.func.grad(loss(_fn), argnums=(0, 1, 2))(q, k, v),
                          torch.func.grad(loss(_ref), argnums=(0, 1, 2))(q, k, v), ("dq", "dk", "dv")):
        assert_close(a, b, 1e-12, f"torch.func.grad {name}")
    cot = torch.randn_like(q)
    for a, b, name in zip(torch.func.vjp(_fn, q, k, v)[1](cot), torch.func.vjp(_ref, q, k, v)[1](cot),
                          ("dq", "dk", "dv")):
        assert_close(a, b, 1e-12, f"torch.func.vjp {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule, performance drop" for the ops
        got = torch.func.jacrev(lambda k: _fn(q, k, v))(k)
    assert_close(got, torch.func.jacrev(lambda k: _ref(q, k, v))(k), 1e-12, "torch.func.jacrev")


def test_vmap_matches_a_loop(device):
    q, k, v = _small_qkv(device)
    qs = torch.stack([q, 2 * q, -q])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(lambda q: _fn(q, k, v))(qs)
        grads_got = torch.func.vmap(torch.func.grad(lambda q: _fn(q, k, v).pow(2).sum()))(qs)
    assert_close(got, torch.stack([_fn(x, k, v) for x in qs]), 0.0, "vmap")
    grads_want = torch.stack([torch.func.grad(lambda q: _ref(q, k, v).pow(2).sum())(x) for x in qs])
    assert_close(grads_got, grads_want, 1e-12, "vmap(grad)")


def test_raw_op_under_torch_func_names_the_python_function():
    q, *rest = fwd_args(GRADCHECK_CONFIGS[0][1], {}, torch.float64, "cpu", requires_grad=False)
    with pytest.raises(RuntimeError, match=r"local_attention_fwd.* cannot be differentiated by torch.func "
                                           r"transforms when called directly; call longreach.local_attention"):
        torch.func.grad(lambda q: torch.ops.longreach.local_attention_fwd(q, *rest)[0].sum())(q)
