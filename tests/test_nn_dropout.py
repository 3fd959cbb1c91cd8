"""Attention dropout in the nn modules: LocalSelfAttention(dropout=p) and LocalTransformerConfig's
attention_dropout, applied in the fused op in training mode only.

Truths: the dense longreach.reference.local_attention with the op's own keep mask computed
independently (longreach.dropout.keep_mask from the (seed, offset) the module draws), the
module in eval mode / with dropout=0, and plain statistics (keep rate, mean over many seeds).
"""

from __future__ import annotations

import pytest
import torch

import longreach
from longreach import reference
from longreach.dropout import draw_seed, keep_mask
from longreach.nn import LocalSelfAttention, LocalTransformerConfig, LocalTransformerLM

F64 = torch.float64
WINDOW = (4, 0)  # the module's window=5, causal


def _module(p, **kwargs):
    torch.manual_seed(0)
    return LocalSelfAttention(16, 4, 2, window=5, positional=None, dropout=p, dtype=F64, **kwargs)


def _x(batch=2, length=23, seed=1):
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _heads(module, x):
    """q, k, v (B, H, L, D) of the module's projections (positional=None: no RoPE)."""
    b, n, _ = x.shape
    return [proj(x).view(b, n, h, module.head_dim).transpose(1, 2)
            for proj, h in ((module.q_proj, module.num_heads), (module.k_proj, module.num_kv_heads),
                            (module.v_proj, module.num_kv_heads))]


def _by_reference(module, x, mask, p):
    q, k, v = _heads(module, x)
    out = reference.local_attention(q, k, v, window=WINDOW, causal=True, dropout_mask=mask, dropout_p=p)
    return module.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _next_seed():
    """The (seed, offset) the next dropout call will draw, without moving the generator."""
    state = torch.get_rng_state()
    seed = draw_seed()
    torch.set_rng_state(state)
    return seed


def test_eval_never_drops():
    x = _x()
    dropping, plain = _module(0.5).eval(), _module(0.0).eval()
    state = torch.get_rng_state()
    out = dropping(x)
    assert torch.equal(torch.get_rng_state(), state)  # eval draws no random number
    assert torch.equal(out, plain(x))
    assert torch.equal(_module(0.0).train()(x), out)  # p = 0 in training mode: the same function


def test_train_equals_reference_with_the_same_mask():
    module, x, p = _module(0.3).train(), _x(), 0.3
    torch.manual_seed(42)
    mask = keep_mask(_next_seed(), p, 2, 4, 23, 23)
    out = module(x)
    torch.testing.assert_close(out, _by_reference(module, x, mask, p), rtol=1e-10, atol=1e-12)
    torch.manual_seed(42)  # the same generator state: the same mask, bit for bit
    assert torch.equal(module(x), out)
    assert not torch.allclose(module(x), out)  # the generator moved on: another mask
    assert not torch.allclose(out, module.eval()(x))


def test_packed_sequences_drop_as_the_op():
    module, p = _module(0.4).train(), 0.4
    x = _x(batch=1, length=30)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    torch.manual_seed(3)
    out = module(x, cu_seqlens=cu)
    q, k, v = (t.transpose(1, 2).reshape(30, t.shape[1], -1) for t in _heads(module, x))
    torch.manual_seed(3)
    expected = longreach.local_attention_varlen(q, k, v, cu, cu, 19, 19, causal=True, window=WINDOW, dropout_p=p)
    torch.testing.assert_close(out, module.o_proj(expected.reshape(1, 30, -1)), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, module.eval()(x, cu_seqlens=cu))


def test_keep_rate_and_mean_over_seeds():
    p = 0.25
    module, x = _module(p).train(), _x(batch=1, length=40)
    torch.manual_seed(0)
    allowed = torch.ones(40, 40).tril().triu(-WINDOW[0]).bool()  # the causal window of 5 keys
    masks = []
    total = 0
    n = 300
    for _ in range(n):
        masks.append(keep_mask(_next_seed(), p, 1, 4, 40, 40)[:, :, allowed])
        total = total + module(x)
    dropped = 1 - torch.stack(masks).double().mean().item()  # 300 * 4 heads * 190 pairs = 228000 draws
    assert abs(dropped - p) < 0.006  # about 6.6 standard deviations
    # Unbiased: the mean over masks is the module without dropout (per-element spread of one draw
    # is O(|out|), over n = 300 draws O(|out| / 17)).
    plain = module.eval()(x)
    assert ((total / n - plain).abs().mean() / plain.abs().mean()) < 0.05


def test_gradcheck_with_a_fixed_seed():
    """With the generator reset before every call the module is a fixed function of x and its
    weights: the backward regenerates the forward's mask (float64 gradcheck)."""
    torch.manual_seed(0)
    module = LocalSelfAttention(8, 2, 1, window=5, positional=None, dropout=0.4, bias=True, dtype=F64).train()
    x = torch.randn(1, 7, 8, dtype=F64, requires_grad=True)
    params = dict(module.named_parameters())

    def f(x, *weights):
        torch.manual_seed(1234)
        return torch.func.functional_call(module, dict(zip(params, weights)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()))


def test_gradients_equal_reference_with_the_same_mask():
    module, x, p = _module(0.5).train(), _x(length=30).requires_grad_(), 0.5
    torch.manual_seed(9)
    mask = keep_mask(_next_seed(), p, 2, 4, 30, 30)
    out = module(x)
    expected = _by_reference(module, x, mask, p)
    go = torch.randn_like(out)
    inputs = (x, *module.parameters())
    for a, b in zip(torch.autograd.grad((out * go).sum(), inputs), torch.autograd.grad((expected * go).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_torch_compile_fullgraph_train_mode():
    module, x = _module(0.3).train(), _x().requires_grad_()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(x)
    torch.manual_seed(5)
    torch.testing.assert_close(out, module(x), rtol=1e-12, atol=1e-12)  # the seed draw is in the graph
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_transformer_attention_dropout():
    def lm(attention_dropout):
        torch.manual_seed(0)
        return LocalTransformerLM(LocalTransformerConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2,
                                                         window=6, attention_dropout=attention_dropout))
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    model, plain = lm(0.3), lm(0.0)
    assert all(block.attn.dropout == 0.3 for block in model.blocks)
    assert torch.equal(model.eval()(ids), plain.eval()(ids))
    model.train()
    torch.manual_seed(1)
    a = model(ids)
    torch.manual_seed(1)
    assert torch.equal(model(ids), a)
    assert not torch.allclose(model(ids), a)
    assert not torch.allclose(a, plain.train()(ids))


def test_context_parallel_refuses_dropout_in_training():
    class Attend:  # stands in for longreach.distributed's attend
        def attend(self, q, k, v, **options):
            return longreach.local_attention(q, k, v, **options)

    module = _module(0.2)
    module.context_parallel = Attend()
    x = _x()
    module.eval()(x)  # eval: no dropout, runs
    with pytest.raises(ValueError, match="context parallelism does not take attention dropout"):
        module.train()(x)


@pytest.mark.parametrize("bad, error", [(1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                        ("0.1", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_dropout(bad, error):
    with pytest.raises(error, match="LocalSelfAttention: dropout must be a number in \\[0, 1\\]"):
        LocalSelfAttention(16, 4, dropout=bad)
