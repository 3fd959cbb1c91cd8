"""Chunked attention in the nn modules (LocalSelfAttention, LocalTransformerLM): the module's
weights applied by hand through the dense `longreach.reference.local_attention` with the same
chunks; the "half" expansion; the KV-cache path against full recomputation; bad input."""

from __future__ import annotations

import pytest
import torch

from longreach import reference
from longreach._checks import chunk_shifts
from longreach.nn import LocalSelfAttention, LocalTransformerConfig, LocalTransformerLM

F64 = torch.float64


def by_hand(module: LocalSelfAttention, x, window, chunk, shift):
    """The module without positional scheme, written out: projections, the dense oracle, o_proj."""
    batch, length, _ = x.shape
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
    q = (x @ module.q_proj.weight.T).view(batch, length, heads, dim).transpose(1, 2)
    k = (x @ module.k_proj.weight.T).view(batch, length, kv_heads, dim).transpose(1, 2)
    v = (x @ module.v_proj.weight.T).view(batch, length, kv_heads, dim).transpose(1, 2)
    out = reference.local_attention(q, k, v, window=window, causal=True, chunk=chunk, chunk_shift=shift)
    return out.transpose(1, 2).reshape(batch, length, heads * dim) @ module.o_proj.weight.T


def test_half_is_lora_pattern_and_the_other_forms_pass_through():
    assert chunk_shifts("t", 7, "half", 5)[1].tolist() == [0, 0, 3, 3, 3]
    assert chunk_shifts("t", 8, "half", 4)[1].tolist() == [0, 0, 4, 4]
    assert chunk_shifts("t", 8, [1, 2], 2)[1].tolist() == [1, 2]
    shift = chunk_shifts("t", 8, torch.tensor([5, 6], dtype=torch.int32), 2)[1]
    assert shift.dtype == torch.long and shift.tolist() == [5, 6]
    assert chunk_shifts("t", 8, None, 2) == (8, None)
    assert chunk_shifts("t", 0, None, 2) == (0, None)


@pytest.mark.parametrize("window, chunk, shift, kv_heads", [
    (None, 4, "half", 2),       # LongLoRA's pattern, GQA
    (5, 3, [0, 1, 2, 0], 4),    # window and chunk intersect, arbitrary shifts
    (None, 40, None, 1),        # a chunk longer than the sequence: plain causal
])
def test_module_forward_backward_vs_reference(window, chunk, shift, kv_heads):
    torch.manual_seed(0)
    module = LocalSelfAttention(16, 4, kv_heads, window=window, positional=None, chunk=chunk, chunk_shift=shift,
                                dtype=F64)
    x = torch.randn(2, 11, 16, dtype=F64, requires_grad=True)
    left = None if window is None else window - 1
    expected_shift = chunk_shifts("t", chunk, shift, 4)[1]
    expected = by_hand(module, x, (left, 0), chunk, expected_shift)
    actual = module(x)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(actual, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
    if chunk < 11:  # the chunks change the result (the test can fail)
        unchunked = by_hand(module, x, (left, 0), 0, None)
        assert not torch.allclose(actual, unchunked)


def test_packed_sequences_chunk_each_from_its_start():
    torch.manual_seed(1)
    module = LocalSelfAttention(16, 4, 2, positional=None, chunk=3, chunk_shift="half", dtype=F64)
    x = torch.randn(1, 12, 16, dtype=F64)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    packed = module(x, cu_seqlens=cu)
    separate = torch.cat([module(x[:, 0:5]), module(x[:, 5:12])], dim=1)
    torch.testing.assert_close(packed, separate)


def test_shift_buffer_follows_the_module_and_stays_out_of_the_state_dict():
    module = LocalSelfAttention(16, 4, chunk=4, chunk_shift="half")
    assert module.chunk_shift.tolist() == [0, 0, 2, 2]
    assert "chunk_shift" not in module.state_dict()
    assert module.double().chunk_shift.dtype == torch.long  # integer buffers are not cast
    assert "chunk=4" in repr(module)


def test_cache_keeps_one_chunk_and_decoding_equals_recomputation():
    torch.manual_seed(2)
    config = LocalTransformerConfig(vocab_size=31, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, chunk=5,
                                    chunk_shift="half")
    lm = LocalTransformerLM(config).double().eval()
    assert lm.blocks[0].attn.cache_size() == 4
    ids = torch.randint(0, 31, (2, 17))
    full = lm(ids)
    cache = lm.new_cache()
    steps = [lm(ids[:, :7], cache=cache)] + [lm(ids[:, i:i + 1], cache=cache) for i in range(7, 17)]
    assert len(cache) == 4  # the cache keeps chunk - 1 keys, and their chunk grid moves with its start
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    unchunked = LocalTransformerLM(LocalTransformerConfig(vocab_size=31, d_model=32, n_layers=2, n_heads=4,
                                                          n_kv_heads=2)).double().eval()
    unchunked.load_state_dict(lm.state_dict())
    assert not torch.allclose(unchunked(ids), full)


@pytest.mark.parametrize("kw, error, match", [
    (dict(chunk=-1), ValueError, "chunk must be an int >= 0, got -1"),
    (dict(chunk=2.0), TypeError, "chunk must be an int >= 0"),
    (dict(chunk=4, chunk_shift="quarter"), ValueError, "chunk_shift must be 'half'"),
    (dict(chunk=0, chunk_shift="half"), ValueError, "chunk_shift='half' needs chunk > 0"),
    (dict(chunk=0, chunk_shift=[0, 0, 1, 1]), ValueError, "chunk_shift needs chunk > 0"),
    (dict(chunk=4, chunk_shift=[0, 1]), ValueError, "chunk_shift must be 4 ints"),
    (dict(chunk=4, chunk_shift=[0, 1, 2, 0.5]), TypeError, "chunk_shift must be 4 ints"),
    (dict(chunk=4, chunk_shift=torch.zeros(4)), TypeError, "chunk_shift must be an int32 or int64 tensor"),
    (dict(chunk=4, chunk_shift=torch.zeros(3, dtype=torch.long)), ValueError, r"shape \(Hq,\) = \(4,\)"),
    (dict(chunk=4, chunk_shift=2), TypeError, "chunk_shift must be 'half'"),
])
def test_bad_input(kw, error, match):
    with pytest.raises(error, match=match):
        LocalSelfAttention(16, 4, **kw)
    with pytest.raises(error, match=match):
        LocalTransformerLM(LocalTransformerConfig(d_model=16, n_heads=4, **kw))


def test_compile_fullgraph_forward_backward():
    torch.manual_seed(3)
    module = LocalSelfAttention(16, 4, 2, window=6, chunk=4, chunk_shift="half")
    x = torch.randn(2, 13, 16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    expected = module(x)
    actual = compiled(x)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(actual, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
