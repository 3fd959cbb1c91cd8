"""The fused rotary op (longreach.apply_rotary / apply_rotary_qk) against
independent truths: a plain-PyTorch rotation written here (complex numbers for
the interleaved layout), Hugging Face's own apply_rotary_pos_emb, gradcheck in
float64, opcheck, torch.compile(fullgraph=True), and every bad-input error.
"""

from __future__ import annotations

import pytest
import torch

import longreach
from testenv import skip_unsupported_dtype

# ---------------------------------------------------------------------------
# Independent reference rotations.


def reference_rotary(x, cos, sin, position_ids=None, interleaved=False, conjugate=False):
    """Rotation in float64 from the definition: rotate-half via HF's formula
    x*cos + rotate_half(x)*sin, interleaved via complex multiplication."""
    B, H, L, D = x.shape
    half = cos.shape[-1]
    rot = 2 * half
    pos = torch.arange(L, device=x.device).expand(B, L) if position_ids is None else position_ids.expand(B, L)
    c = cos.double()[pos][:, None]  # (B, 1, L, half)
    s = sin.double()[pos][:, None]
    if conjugate:
        s = -s
    xr, rest = x.double()[..., :rot], x.double()[..., rot:]
    if interleaved:
        z = torch.view_as_complex(xr.reshape(B, H, L, half, 2).contiguous())
        y = torch.view_as_real(z * torch.complex(c, s)).reshape(B, H, L, rot)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotate_half = torch.cat((-x2, x1), dim=-1)
        y = xr * torch.cat((c, c), -1) + rotate_half * torch.cat((s, s), -1)
    return torch.cat((y, rest), dim=-1)


def rope_tables(table_len, half, device, dtype=torch.float32, factor=1.0):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.arange(table_len, dtype=torch.float64)[:, None] * inv_freq
    return (angles.cos() * factor).to(device=device, dtype=dtype), (angles.sin() * factor).to(device=device, dtype=dtype)


TOL = {torch.float64: 1e-12, torch.float32: 2e-6}

# (B, H, L, D, half): full rotary, partial rotary, a single position, a wide head.
SHAPES = [(2, 3, 17, 16, 8), (1, 2, 9, 20, 6), (3, 1, 1, 8, 4), (2, 2, 33, 128, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("ids", ["none", "batch", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(shape, interleaved, ids, dtype, device):
    skip_unsupported_dtype(device, dtype)
    B, H, L, D, half = shape
    x = torch.randn(B, H, L, D, dtype=dtype, device=device)
    cos, sin = rope_tables(64, half, device, dtype, factor=1.3)  # attention factor != 1: not a pure rotation
    pos = None
    if ids == "batch":
        pos = torch.randint(0, 64, (B, L), device=device)
    elif ids == "shared":
        pos = torch.randint(0, 64, (1, L), device=device)
    got = longreach.apply_rotary(x, cos, sin, pos, interleaved=interleaved)
    want = reference_rotary(x, cos, sin, pos, interleaved)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    # Features past rot_dim are copied exactly.
    assert torch.equal(got[..., 2 * half:], x[..., 2 * half:])


def test_inverse_rotation_undoes_rotation(device):
    x = torch.randn(2, 3, 10, 32, device=device)
    cos, sin = rope_tables(10, 16, device)
    y = longreach.apply_rotary(x, cos, sin)
    back = torch.ops.longreach.apply_rotary(y, cos, sin, None, False, True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.double(), reference_rotary(y, cos, sin, conjugate=True), rtol=2e-6, atol=2e-6)


def test_strided_inputs(device):
    """Hugging Face's q is (B, L, H, D).transpose(1, 2); also a non-contiguous last dim and float64 tables."""
    base = torch.randn(2, 11, 4, 24, device=device)
    cos, sin = rope_tables(11, 8, device)
    x = base.transpose(1, 2)
    torch.testing.assert_close(longreach.apply_rotary(x, cos, sin).double(), reference_rotary(x, cos, sin),
                               rtol=2e-6, atol=2e-6)
    y = torch.randn(2, 4, 11, 48, device=device)[..., ::2]
    torch.testing.assert_close(longreach.apply_rotary(y, cos.double(), sin.double()).double(),
                               reference_rotary(y, cos, sin), rtol=2e-6, atol=2e-6)
    wide = torch.randn(11, 16, device=device)  # a column slice of a wider table: non-contiguous rows
    c2, s2 = wide[:, :8], wide[:, 8:]
    torch.testing.assert_close(longreach.apply_rotary(x, c2, s2).double(), reference_rotary(x, c2, s2),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_low_precision(dtype, interleaved, device):
    """float32 math, one rounding at the end: at most 1 ulp from the exact result of the
    same low-precision input, and never worse than PyTorch's own same-dtype rotation."""
    x = torch.randn(2, 4, 40, 64, device=device).to(dtype)
    cos, sin = rope_tables(40, 32, device)
    got = longreach.apply_rotary(x, cos, sin, interleaved=interleaved)
    exact = reference_rotary(x, cos, sin, interleaved=interleaved)
    eps = torch.finfo(dtype).eps
    assert ((got.double() - exact).abs() <= eps * exact.abs() + 1e-30).all()  # |err| <= ulp(|y|) / 2 * 2
    same_dtype = reference_rotary_same_dtype(x, cos.to(dtype), sin.to(dtype), interleaved)
    assert (got.double() - exact).abs().max() <= 2 * (same_dtype.double() - exact).abs().max()


def reference_rotary_same_dtype(x, cos, sin, interleaved):
    """The rotation computed in x's dtype, as eager Hugging Face code does it."""
    half = cos.shape[-1]
    L = x.shape[2]
    c, s = cos[:L], sin[:L]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hugging_face_apply_rotary_pos_emb(dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128)
    hf_rope = LlamaRotaryEmbedding(config).to(device)
    q = torch.randn(2, 4, 20, 16, device=device).to(dtype)
    k = torch.randn(2, 2, 20, 16, device=device).to(dtype)
    pos = torch.stack([torch.arange(20), torch.arange(30, 50)]).to(device)
    hf_cos, hf_sin = hf_rope(q, pos)  # (B, L, D): the half-size table duplicated
    hq, hk = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    table_cos, table_sin = hf_rope(q.float(), torch.arange(128, device=device)[None])
    cos, sin = table_cos[0, :, :8], table_sin[0, :, :8]
    gq, gk = longreach.apply_rotary_qk(q, k, cos, sin, pos)
    if dtype == torch.float32:
        torch.testing.assert_close(gq, hq, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gk, hk, rtol=1e-6, atol=1e-6)
    else:  # HF rounds cos/sin and every product to bfloat16; we round once
        exact_q = reference_rotary(q, cos, sin, pos)
        assert (gq.double() - exact_q).abs().max() <= (hq.double() - exact_q).abs().max()
        torch.testing.assert_close(gq.float(), hq.float(), rtol=0.05, atol=0.05)


def test_qk_matches_two_calls(device):
    q = torch.randn(2, 4, 12, 32, device=device)
    k = torch.randn(2, 1, 12, 32, device=device)
    cos, sin = rope_tables(50, 12, device)
    pos = torch.randint(0, 50, (2, 12), device=device)
    for interleaved in (False, True):
        gq, gk = longreach.apply_rotary_qk(q, k, cos, sin, pos, interleaved)
        assert torch.equal(gq, longreach.apply_rotary(q, cos, sin, pos, interleaved))
        assert torch.equal(gk, longreach.apply_rotary(k, cos, sin, pos, interleaved))


def test_empty_inputs(device):
    cos, sin = rope_tables(8, 4, device)
    assert longreach.apply_rotary(torch.randn(0, 2, 3, 8, device=device), cos, sin).shape == (0, 2, 3, 8)
    assert longreach.apply_rotary(torch.randn(1, 2, 0, 8, device=device), cos, sin).shape == (1, 2, 0, 8)


# ---------------------------------------------------------------------------
# Autograd: gradcheck in float64 (x and the tables), double backward, opcheck.


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("table_grads", [False, True], ids=["x_only", "x_and_tables"])
def test_gradcheck(interleaved, table_grads, device):
    skip_unsupported_dtype(device, torch.float64)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = (t.requires_grad_(table_grads) for t in rope_tables(9, 4, device, torch.float64, factor=1.2))
    pos = torch.tensor([[0, 3, 3, 8, 1, 2, 3], [5, 5, 5, 0, 1, 7, 8]], device=device)  # repeats: table grads add up
    fn = lambda x, cos, sin: longreach.apply_rotary(x, cos, sin, pos, interleaved)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, cos, sin))
    assert torch.autograd.gradgradcheck(fn, (x, cos, sin))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_forward_mode_matches_reverse_mode(interleaved, device):
    """The jvp formula (the op is bilinear in x and the tables), with a partial rotary (D = 10,
    rot_dim = 8), against numerical derivatives and against reverse mode."""
    skip_unsupported_dtype(device, torch.float64)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in rope_tables(9, 4, device, torch.float64, factor=1.2))
    pos = torch.tensor([[0, 3, 3, 8, 1, 2, 3], [5, 5, 5, 0, 1, 7, 8]], device=device)
    fn = lambda x, cos, sin: longreach.apply_rotary(x, cos, sin, pos, interleaved)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, cos, sin), check_forward_ad=True, check_backward_ad=False)
    x0, cos0, sin0, pos0 = x.detach()[:1, :1, :3], cos.detach(), sin.detach(), pos[:1, :3]
    for f, at in ((lambda x: longreach.apply_rotary(x, cos0, sin0, pos0), x0),
                  (lambda c: longreach.apply_rotary(x0, c, sin0, pos0), cos0)):
        torch.testing.assert_close(torch.func.jacfwd(f)(at), torch.func.jacrev(f)(at), rtol=0, atol=1e-14)


def test_forward_mode_qk(device):
    skip_unsupported_dtype(device, torch.float64)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in rope_tables(6, 3, device, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, c, s: longreach.apply_rotary_qk(q, k, c, s, None, True),
                                    (q, k, cos, sin), check_forward_ad=True, check_backward_ad=False)


def test_torch_func_and_third_derivatives(device):
    """torch.func.grad and vmap work; derivatives of any order, since the backward is the op again."""
    skip_unsupported_dtype(device, torch.float64)
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64, device=device)
    cos, sin = rope_tables(5, 4, device, torch.float64)
    loss = lambda x: longreach.apply_rotary(x, cos, sin).pow(3).sum()  # noqa: E731
    ref_loss = lambda x: reference_rotary(x, cos, sin).pow(3).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss)(x), torch.func.grad(ref_loss)(x))
    third = torch.func.grad(lambda x: torch.func.grad(lambda x: torch.func.grad(loss)(x).sum())(x).sum())
    ref_third = torch.func.grad(lambda x: torch.func.grad(lambda x: torch.func.grad(ref_loss)(x).sum())(x).sum())
    torch.testing.assert_close(third(x), ref_third(x))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule, performance drop"
        got = torch.func.vmap(lambda x: longreach.apply_rotary(x, cos, sin))(x[:, None])
    torch.testing.assert_close(got[:, 0], longreach.apply_rotary(x, cos, sin))


def test_gradcheck_qk_and_conjugate(device):
    skip_unsupported_dtype(device, torch.float64)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in rope_tables(6, 3, device, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, c, s: longreach.apply_rotary_qk(q, k, c, s, None, True),
                                    (q, k, cos, sin))
    assert torch.autograd.gradcheck(
        lambda q, c, s: torch.ops.longreach.apply_rotary(q, c, s, None, False, True), (q, cos, sin))


def _opcheck_samples(device):
    cos, sin = rope_tables(16, 4, device)
    x = torch.randn(2, 3, 5, 12, device=device, requires_grad=True)
    pos = torch.randint(0, 16, (2, 5), device=device)
    yield "x", (x, cos, sin, None, False, False)
    yield "ids_interleaved", (x, cos, sin, pos, True, False)
    yield "conjugate_shared_ids", (x, cos, sin, pos[:1], False, True)
    yield "table_grads", (x, cos.clone().requires_grad_(), sin.clone().requires_grad_(), pos, False, False)


def test_opcheck(device):
    for _, args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.longreach.apply_rotary.default, args)
    q = torch.randn(2, 4, 5, 8, device=device, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, device=device, requires_grad=True)
    cos, sin = rope_tables(8, 4, device)
    torch.library.opcheck(torch.ops.longreach.apply_rotary_qk.default, (q, k, cos, sin, None, False, False))


# ---------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_without_recompiles(backend, device):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cos, sin = rope_tables(32, 8, device)

    def fn(q, k, pos):
        rq, rk = longreach.apply_rotary_qk(q, k, cos, sin, pos)
        return (longreach.apply_rotary(rq * 2.0, cos, sin, pos, interleaved=True) * rk).sum(-1)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            q = torch.randn(2, 2, 12, 16, device=device)
            k = torch.randn(2, 2, 12, 16, device=device)
            pos = torch.randint(0, 32, (2, 12), device=device)
            a = [t.clone().requires_grad_() for t in (q, k)]
            b = [t.clone().requires_grad_() for t in (q, k)]
            got, want = compiled(*a, pos), fn(*b, pos)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            cot = torch.randn_like(want)
            for ga, gb in zip(torch.autograd.grad(got, a, cot), torch.autograd.grad(want, b, cot)):
                torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_compile_traces_the_registered_op():
    import torch._dynamo
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    cos, sin = rope_tables(8, 4, "cpu")
    compiled = torch.compile(lambda x: longreach.apply_rotary(x, cos, sin), backend=recorder, fullgraph=True)
    compiled(torch.randn(1, 2, 8, 8))
    assert "longreach.apply_rotary" in recorder.graphs[0].code


# ---------------------------------------------------------------------------
# Bad input: each error names the argument and the value.


def _bad(device):
    x = torch.randn(2, 3, 6, 8, device=device)
    cos, sin = rope_tables(10, 4, device)
    return x, cos, sin


@pytest.mark.parametrize(
    "case, match",
    [
        ("odd_head_dim", r"rotate rot_dim = 10 features, but x has head dim 9"),
        ("too_many_columns", r"cos / sin have 5 columns, so they rotate rot_dim = 10 features, but x has head dim 8"),
        ("shape_mismatch", r"cos and sin must have the same shape, got cos \[10, 4\] and sin \[10, 3\]"),
        ("table_not_2d", r"cos must be a 2-D table .* got shape \[10, 4, 1\]"),
        ("dtype_mismatch", r"cos and sin must share one floating dtype"),
        ("x_not_4d", r"x must be a 4-D tensor \(B, H, L, D\), got shape \[3, 6, 8\]"),
        ("x_int", r"x has dtype torch.int64; expected float32"),
        ("ids_too_large", r"position_ids holds 10 but the cos / sin tables have only 10 rows \(positions 0 \.\. 9\)"),
        ("ids_negative", r"position_ids holds -3; positions must be >= 0"),
        ("ids_dtype", r"position_ids must be int64, got torch.int32"),
        ("ids_shape", r"position_ids must have shape \(B, L\) = \(2, 6\) or \(1, L\), got \[2, 5\]"),
        ("too_long_without_ids", r"x has sequence length L = 12 but the cos / sin tables have only 10 rows"),
    ],
)
def test_bad_input(case, match, device):
    x, cos, sin = _bad(device)
    pos = None
    if case == "odd_head_dim":
        x = torch.randn(2, 3, 6, 9, device=device)
        cos, sin = rope_tables(10, 5, device)
    elif case == "too_many_columns":
        cos, sin = rope_tables(10, 5, device)
    elif case == "shape_mismatch":
        sin = sin[:, :3]
    elif case == "table_not_2d":
        cos, sin = cos[..., None], sin[..., None]
    elif case == "dtype_mismatch":
        sin = sin.double()
    elif case == "x_not_4d":
        x = x[0]
    elif case == "x_int":
        x = x.long()
    elif case == "ids_too_large":
        pos = torch.tensor([[0, 1, 2, 3, 4, 10], [0, 1, 2, 3, 4, 5]], device=device)
    elif case == "ids_negative":
        pos = torch.tensor([[0, 1, 2, 3, 4, -3]], device=device)
    elif case == "ids_dtype":
        pos = torch.zeros(2, 6, dtype=torch.int32, device=device)
    elif case == "ids_shape":
        pos = torch.zeros(2, 5, dtype=torch.int64, device=device)
    elif case == "too_long_without_ids":
        x = torch.randn(2, 3, 12, 8, device=device)
    with pytest.raises((TypeError, ValueError), match=match):
        longreach.apply_rotary(x, cos, sin, pos)


@pytest.mark.parametrize("on_meta", ["x", "cos", "sin", "position_ids"])
def test_meta_tensor_among_cpu_ones_raises(on_meta):
    """A meta tensor would route the call to the fake kernel, which returns uninitialised memory."""
    cos, sin = rope_tables(8, 2, "cpu")
    args = dict(x=torch.randn(1, 2, 4, 4), cos=cos, sin=sin, position_ids=torch.arange(4)[None])
    args[on_meta] = args[on_meta].to("meta")
    expected = "x" if on_meta != "x" else "cos"
    with pytest.raises(ValueError, match=rf"apply_rotary: ({on_meta}|{expected}) is on (meta|cpu) but x is on "):
        longreach.apply_rotary(**args)


@pytest.mark.parametrize("on_meta", ["q", "k", "cos", "sin", "position_ids"])
def test_meta_tensor_among_cpu_ones_raises_qk(on_meta):
    cos, sin = rope_tables(8, 2, "cpu")
    args = dict(q=torch.randn(1, 2, 4, 4), k=torch.randn(1, 1, 4, 4), cos=cos, sin=sin,
                position_ids=torch.arange(4)[None])
    args[on_meta] = args[on_meta].to("meta")
    with pytest.raises(ValueError, match=r"apply_rotary_qk: \w+ is on (meta|cpu) but q is on (cpu|meta); all tensor"):
        longreach.apply_rotary_qk(**args)


def test_all_meta_is_shape_inference():
    cos, sin = rope_tables(8, 2, "meta")
    out = longreach.apply_rotary(torch.empty(1, 2, 4, 4, device="meta"), cos, sin)
    assert out.device.type == "meta" and out.shape == (1, 2, 4, 4)


def test_qk_errors_name_apply_rotary_qk_and_q_as_the_expected_shape():
    cos, sin = rope_tables(8, 2, "cpu")
    q, k = torch.randn(2, 2, 4, 4), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"apply_rotary_qk: q and k share position_ids, so they must have the same "
                                         r"batch size and length, got q of shape \(2, 2, 4, 4\) and k of shape "
                                         r"\(1, 2, 4, 4\)"):
        longreach.apply_rotary_qk(q, k, cos, sin, torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match=r"apply_rotary_qk: q must be a 4-D tensor"):
        longreach.apply_rotary_qk(q[0], k, cos, sin)
    # The kernel's own checks, too, name the function called.
    with pytest.raises(ValueError, match=r"^apply_rotary_qk: k has sequence length L = 9 but the cos / sin tables "
                                         r"have only 8 rows"):
        longreach.apply_rotary_qk(q, torch.randn(2, 2, 9, 4), cos, sin)
    with pytest.raises(ValueError, match=r"^apply_rotary_qk: position_ids holds 8 but the cos / sin tables"):
        longreach.apply_rotary_qk(q, k[:1].expand(2, -1, -1, -1), cos, sin, torch.tensor([[0, 1, 2, 8]]))


def test_bad_python_arguments():
    x = torch.randn(1, 1, 2, 4)
    cos, sin = rope_tables(2, 2, "cpu")
    with pytest.raises(TypeError, match=r"apply_rotary: cos must be a tensor, got \[\[1\.0, 0\.0\]\] \(list\)"):
        longreach.apply_rotary(x, [[1.0, 0.0]], sin)
    with pytest.raises(TypeError, match=r"apply_rotary: interleaved must be a bool \(True or False\), got 1 \(int\)"):
        longreach.apply_rotary(x, cos, sin, None, 1)
    with pytest.raises(TypeError, match=r"apply_rotary: position_ids must be an int64 tensor .*got \[0, 1\] \(list\)"):
        longreach.apply_rotary(x, cos, sin, [0, 1])
    with pytest.raises(TypeError, match=r"apply_rotary_qk: q and k must share one dtype"):
        longreach.apply_rotary_qk(x, x.double(), cos, sin)
    with pytest.raises(ValueError, match=r"apply_rotary_qk: k must be a 4-D tensor "
                                         r"\(B, H, L, D\), got shape \(1, 2, 4\)"):
        longreach.apply_rotary_qk(x, x[0], cos, sin)
