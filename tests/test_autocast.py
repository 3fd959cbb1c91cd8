"""Autocast of the attention ops (python/longreach/ops/autocast.py), against SDPA's behaviour.

Inside torch.autocast the ops run in the region's dtype as F.scaled_dot_product_attention does:
q, k and v (floating, not float64) are cast, the ALiBi slopes stay float32. Checked on CPU
(bfloat16, the CPU autocast default, and float16): output dtype equal to SDPA's in the same
region, values bit-equal to casting by hand, backward to float32 leaves (gradients float32,
equal to the hand-cast ones), torch.compile(fullgraph=True) under autocast, the varlen op,
float64 left alone, and nothing cast outside a region.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longreach


def _qkv(grad=True, lq=12, lk=12):
    make = lambda *s: torch.randn(*s, requires_grad=grad)  # noqa: E731
    return make(2, 4, lq, 16), make(2, 2, lk, 16), make(2, 2, lk, 16)


OPTIONS = dict(window=(3, 0), causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]), softcap=20.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_op_runs_in_the_autocast_dtype(dtype):
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=dtype):
        out, lse = longreach.local_attention(q, k, v, return_lse=True, **OPTIONS)
        sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert out.dtype == sdpa.dtype == dtype and lse.dtype == torch.float32
    by_hand, by_hand_lse = longreach.local_attention(q.to(dtype), k.to(dtype), v.to(dtype), return_lse=True,
                                                     **OPTIONS)
    assert torch.equal(out, by_hand) and torch.equal(lse, by_hand_lse)

    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(longreach.local_attention(*leaves, **OPTIONS), leaves, upstream)
    for g, e in zip(grads, expected):
        assert g.dtype == torch.float32
        assert torch.equal(g, e.float())


def test_outside_autocast_and_float64_are_left_alone():
    q, k, v = _qkv(grad=False)
    assert longreach.local_attention(q, k, v, **OPTIONS).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert longreach.local_attention(q, k, v, **OPTIONS).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert longreach.local_attention(q.double(), k.double(), v.double(), **OPTIONS).dtype == torch.float64
        # a region of another device type does not touch CPU tensors
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert longreach.local_attention(q, k, v, **OPTIONS).dtype == torch.float32


def test_varlen_op_runs_in_the_autocast_dtype():
    q, k, v = torch.randn(10, 4, 16, requires_grad=True), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
    with torch.autocast("cpu"):  # CPU's default autocast dtype: bfloat16
        out = longreach.local_attention_varlen(q, k, v, cu_q, cu_k, 6, 5, **OPTIONS)
    assert out.dtype == torch.bfloat16
    by_hand = longreach.local_attention_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k, 6, 5,
                                               **OPTIONS)
    assert torch.equal(out, by_hand)
    (grad,) = torch.autograd.grad(out.float().sum(), q)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_flash_attn_interface_under_autocast():
    from longreach.flash_attn_interface import flash_attn_func

    q, k, v = (t.transpose(1, 2) for t in _qkv(grad=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attn_func(q, k, v, causal=True, window_size=(3, 0))
    assert out.dtype == torch.bfloat16


def test_compile_under_autocast():
    q, k, v = _qkv()

    def f(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return longreach.local_attention(q, k, v, **OPTIONS)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    eager = f(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, eager)
    (g_compiled,) = torch.autograd.grad(out.float().sum(), q)
    (g_eager,) = torch.autograd.grad(eager.float().sum(), q)
    assert g_compiled.dtype == torch.float32
    assert torch.equal(g_compiled, g_eager)
