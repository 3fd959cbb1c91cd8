"""longreach.nn.LocalSelfAttention, TransformerBlock and LocalTransformerLM.

The truth for the attention module is a hand-written composition: the module's own weights
applied with plain matmuls, RoPE written out here (rotate-half, angles position * base^(-2i/d)),
and the dense `longreach.reference.local_attention`. The LM's KV-cache paths are checked
against full recomputation, padded rows against the same rows unpadded.
"""

from __future__ import annotations

import math

import pytest
import torch

import longreach
from longreach import reference
from longreach.nn import (LocalSelfAttention, LocalTransformerConfig, LocalTransformerLM, SlidingKVCache,
                          TransformerBlock)

F64 = torch.float64


def rope_by_hand(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX / Hugging Face layout) of x (B, H, L, D) at positions (L,).

    The angles' cos/sin are float32, as in Hugging Face's rotary embeddings and longreach's
    tables; the rotation itself is in x's dtype.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = (torch.cat((t, t), -1).to(x.dtype) for t in (angles.cos(), angles.sin()))
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat((-second, first), -1) * sin


def attention_by_hand(module: LocalSelfAttention, x: torch.Tensor, *, window, causal, score="softmax",
                      rope=False, slopes=None, softcap=None, dilation=1, sigmoid_bias=None) -> torch.Tensor:
    batch, length, _ = x.shape
    heads, kv_heads, dim = module.num_heads, module.num_kv_heads, module.head_dim
    q = (x @ module.q_proj.weight.T).view(batch, length, heads, dim).transpose(1, 2)
    k = (x @ module.k_proj.weight.T).view(batch, length, kv_heads, dim).transpose(1, 2)
    v = (x @ module.v_proj.weight.T).view(batch, length, kv_heads, dim).transpose(1, 2)
    if rope:
        q, k = rope_by_hand(q, torch.arange(length)), rope_by_hand(k, torch.arange(length))
    out = reference.local_attention(q, k, v, window=window, causal=causal, dilation=dilation, alibi_slopes=slopes,
                                    score=score, softcap=softcap, sigmoid_bias=sigmoid_bias)
    return out.transpose(1, 2).reshape(batch, length, heads * dim) @ module.o_proj.weight.T


CASES = {
    # name: (module kwargs, by-hand kwargs)
    "rope_causal_window": (dict(window=4), dict(window=(3, 0), causal=True, rope=True)),
    "rope_full_gqa": (dict(num_kv_heads=2), dict(window=(None, 0), causal=True, rope=True)),
    "alibi_dilated": (dict(window=3, dilation=2, positional="alibi"),
                      dict(window=(2, 0), causal=True, dilation=2, slopes="standard")),
    "bidirectional_softcap": (dict(window=(2, 3), causal=False, positional=None, softcap=0.7),
                              dict(window=(2, 3), causal=False, softcap=0.7)),
    "swat": (dict(window=5, score="sigmoid", positional="alibi+rope", alibi="balanced"),
             dict(window=(4, 0), causal=True, score="sigmoid", rope=True, slopes="balanced",
                  sigmoid_bias=-math.log(5))),
    "sigmoid_explicit_bias_unbounded": (dict(score="sigmoid", sigmoid_bias=-1.5, positional=None),
                                        dict(window=(None, 0), causal=True, score="sigmoid", sigmoid_bias=-1.5)),
}


def module_with_big_weights(**kwargs) -> LocalSelfAttention:
    module = LocalSelfAttention(32, 4, **kwargs).to(F64)
    with torch.no_grad():
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
            proj.weight.normal_(0, 0.5)  # scores of a few units: windows, caps and biases matter
    return module


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_module_equals_hand_written_composition(case):
    module_kwargs, hand_kwargs = CASES[case]
    module = module_with_big_weights(**module_kwargs)
    hand_kwargs = dict(hand_kwargs)
    kind = hand_kwargs.pop("slopes", None)
    slopes = None if kind is None else longreach.alibi_slopes(4, kind)
    x = torch.randn(3, 11, 32, dtype=F64, requires_grad=True)
    got = module(x)
    expected = attention_by_hand(module, x, slopes=slopes, **hand_kwargs)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    weight = torch.randn_like(got)
    params = [x] + [p for p in module.parameters()]
    grads_got = torch.autograd.grad((got * weight).sum(), params)
    grads_expected = torch.autograd.grad((expected * weight).sum(), params)
    for g_got, g_expected in zip(grads_got, grads_expected):
        torch.testing.assert_close(g_got, g_expected, atol=1e-11, rtol=1e-11)


def test_swat_in_one_call():
    module = LocalSelfAttention.swat(32, 4, window=16)
    assert (module.window, module.score, module.positional, module.causal) == ((15, 0), "sigmoid", "alibi+rope", True)
    assert torch.equal(module.alibi(), longreach.alibi_slopes(4, "balanced"))
    assert module.sigmoid_bias == pytest.approx(-math.log(16))
    config = LocalTransformerConfig.swat(window=16, d_model=32)
    assert (config.score, config.positional, config.alibi, config.window) == ("sigmoid", "alibi+rope", "balanced", 16)


@pytest.mark.parametrize("positional", ["rope", "alibi", None])
def test_key_padding_mask_equals_the_unpadded_rows(positional):
    """PyTorch's convention (True = padding): each left/right-padded row equals its real tokens
    alone (RoPE positions counting real tokens); the deprecated padding_mask gives the same."""
    module = module_with_big_weights(window=4, num_kv_heads=2, positional=positional)
    x = torch.randn(3, 10, 32, dtype=F64)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, :3] = True  # left padding
    pad[2, 6:] = True  # right padding
    positions = ((~pad).long().cumsum(1) - 1).clamp(min=0)  # each row counts its real tokens from 0
    got = module(x, position_ids=positions, key_padding_mask=pad)
    for row in range(3):
        real = ~pad[row]
        alone = module(x[row : row + 1, real], position_ids=torch.arange(int(real.sum()))[None])
        torch.testing.assert_close(got[row, real], alone[0], atol=1e-12, rtol=1e-12)
    with pytest.warns(DeprecationWarning, match=r"padding_mask \(True = real token\) is deprecated"):
        old = module(x, ~pad, positions)  # the old positional argument, opposite convention
    torch.testing.assert_close(old, got, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        module(x, ~pad, key_padding_mask=pad)


def test_key_padding_mask_with_holes_matches_the_dense_reference():
    module = module_with_big_weights(window=(3, 2), causal=False, positional=None)
    x = torch.randn(2, 12, 32, dtype=F64)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, [2, 5, 6]] = True
    pad[1, 7:9] = True
    got = module(x, key_padding_mask=pad)
    q, k, v = (proj(x).view(2, 12, -1, module.head_dim).transpose(1, 2)
               for proj in (module.q_proj, module.k_proj, module.v_proj))
    ref = longreach.reference.local_attention(q, k, v, window=(3, 2), key_padding_mask=pad)
    torch.testing.assert_close(got, module.o_proj(ref.transpose(1, 2).reshape(2, 12, -1)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("positional", ["rope", "alibi+rope"])
def test_packed_input_equals_the_documents_one_by_one(positional):
    """cu_seqlens over the flattened tokens: each document its own sequence (RoPE restarting)."""
    module = module_with_big_weights(window=4, num_kv_heads=2, positional=positional)
    lengths = [5, 1, 9, 3]
    x = torch.randn(1, sum(lengths), 32, dtype=F64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    got = module(x, cu_seqlens=cu, max_seqlen=9)
    assert torch.equal(module(x, cu_seqlens=cu), got)  # max_seqlen read from cu_seqlens
    want = torch.cat([module(x[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens .* and key_padding_mask cannot be combined"):
        module(x, cu_seqlens=cu, key_padding_mask=torch.zeros(1, 18, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens .* and cache cannot be combined"):
        module(x, cu_seqlens=cu, cache=module.new_cache())


def test_lm_packed_pretraining_batch_equals_the_documents_one_by_one():
    lm = tiny_lm(window=5)
    docs = [torch.randint(0, 40, (n,)) for n in (7, 3, 12, 2)]
    ids = torch.cat(docs)[None].view(2, 12)  # two rows of 12 packed tokens, documents crossing rows
    # cu_seqlens over the 24 flattened tokens; a sequence boundary at each row start (12)
    cu = torch.tensor([0, 7, 10, 12, 22, 24], dtype=torch.int32)
    pieces = [ids.reshape(-1)[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    with torch.no_grad():
        got = lm(ids, cu_seqlens=cu).reshape(24, -1)
        want = torch.cat([lm(p[None])[0] for p in pieces])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def tiny_lm(**overrides) -> LocalTransformerLM:
    config = LocalTransformerConfig(**{"vocab_size": 40, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                       "init_std": 0.2, **overrides})
    return LocalTransformerLM(config).to(F64).eval()


LM_CONFIGS = {
    "rope_window": dict(window=5),
    "rope_full": dict(window=None),
    "alibi_dilated_gqa": dict(window=3, dilation=2, positional="alibi", n_kv_heads=2),
    "swat": dict(window=4, score="sigmoid", positional="alibi+rope", alibi="balanced"),
    "softcap_yarn": dict(window=6, softcap=1.0, rope_scaling={"rope_type": "yarn", "factor": 2.0},
                         max_position_embeddings=8),
}


@pytest.mark.parametrize("name", sorted(LM_CONFIGS))
def test_kv_cache_decoding_equals_full_recomputation(name):
    lm = tiny_lm(**LM_CONFIGS[name])
    ids = torch.randint(0, 40, (2, 17))
    with torch.no_grad():
        full = lm(ids)
        cache = lm.new_cache()
        pieces = [lm(ids[:, :6], cache=cache), lm(ids[:, 6:9], cache=cache)]
        pieces += [lm(ids[:, i : i + 1], cache=cache) for i in range(9, 17)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-12)
    keep = lm.blocks[0].attn.cache_size()
    for layer in cache.layers:
        assert layer.seen == 17
        assert len(layer) == (17 if keep is None else min(17, keep))  # only the window's keys stay


def test_attention_module_cache_continues_positions():
    """The module alone (no position_ids): cached chunks continue RoPE after the cache's tokens."""
    module = module_with_big_weights(window=4, num_kv_heads=2)
    x = torch.randn(2, 12, 32, dtype=F64)
    cache = module.new_cache()
    pieces = [module(x[:, :5], cache=cache)] + [module(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), module(x), atol=1e-12, rtol=1e-12)
    assert len(cache) == 3 and cache.seen == 12


@pytest.mark.parametrize("name", ["rope_window", "swat"])
def test_generate_equals_greedy_full_recomputation_and_padding_is_invisible(name):
    lm = tiny_lm(**LM_CONFIGS[name])
    prompts = [torch.randint(0, 40, (n,)) for n in (7, 4)]
    padded = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    for row, prompt in enumerate(prompts):  # left padding
        padded[row, 7 - len(prompt):] = prompt
        mask[row, 7 - len(prompt):] = True
    generated = lm.generate(padded, 9, key_padding_mask=~mask)
    with pytest.warns(DeprecationWarning):
        assert torch.equal(lm.generate(padded, 9, padding_mask=mask), generated)
    for row, prompt in enumerate(prompts):
        tokens = prompt[None]
        with torch.no_grad():
            for _ in range(9):
                tokens = torch.cat((tokens, lm(tokens)[:, -1].argmax(-1, keepdim=True)), dim=1)
        assert torch.equal(generated[row, 7 - len(prompt):], tokens[0])


def test_block_is_pre_norm_attention_then_mlp():
    config = LocalTransformerConfig(d_model=32, n_heads=4, window=3)
    block = TransformerBlock(config).to(F64)
    x = torch.randn(2, 9, 32, dtype=F64)
    after_attention = x + block.attn(block.attn_norm(x))
    expected = after_attention + block.mlp(block.mlp_norm(after_attention))
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)


def test_tied_embeddings_and_config_round_trip():
    lm = tiny_lm()
    assert lm.lm_head.weight is lm.embed.weight
    assert LocalTransformerConfig(**lm.config.to_dict()) == lm.config
    untied = tiny_lm(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


def test_set_rope_scaling_equals_a_model_built_with_it():
    trained = tiny_lm(window=6, max_position_embeddings=8)
    scaling = {"rope_type": "linear", "factor": 4.0}
    built = tiny_lm(window=6, max_position_embeddings=8, rope_scaling=scaling)
    built.load_state_dict(trained.state_dict())
    ids = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        before = trained(ids)
        trained.set_rope_scaling(scaling)
        torch.testing.assert_close(trained(ids), built(ids), atol=1e-12, rtol=1e-12)
        assert (trained(ids) - before).abs().max() > 1e-3
    assert trained.config.rope_scaling == scaling


def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    lm = LocalTransformerLM(LocalTransformerConfig.swat(window=8, vocab_size=40, d_model=32, n_heads=4))
    ids = torch.randint(0, 40, (4, 24))
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = lm(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_torch_compile_fullgraph_matches_eager():
    lm = tiny_lm(window=5).float()
    ids = torch.randint(0, 40, (2, 12))
    compiled = torch.compile(lm, fullgraph=True)
    torch.testing.assert_close(compiled(ids), lm(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window must be a positive int.*got 0"),
        (dict(window=4, causal=False), "int window .4. means 'the last W keys' and needs causal=True"),
        (dict(window=(2, -1), causal=False), "window right must be a non-negative int or None, got -1"),
        (dict(score="relu"), "score must be one of.*'relu'"),
        (dict(positional="learned"), "positional must be one of.*'learned'"),
        (dict(alibi="steep", positional="alibi"), "alibi must be one of.*'steep'"),
        (dict(num_kv_heads=3), "num_kv_heads must be a positive divisor of num_heads=4, got 3"),
        (dict(score="sigmoid"), "score='sigmoid' with an unbounded window needs an explicit sigmoid_bias"),
        (dict(positional="alibi", rope_scaling={"rope_type": "linear", "factor": 2.0}),
         "rope_scaling=.* needs positional='rope' or 'alibi\\+rope'"),
        (dict(dilation=0), "dilation must be an int >= 1, got 0"),
        (dict(softcap=-2.0), "softcap must be a positive number or None, got -2.0"),
        (dict(dropout=1.5), "dropout must be a number in \\[0, 1\\], got 1.5"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSelfAttention(32, 4, **kwargs)


def test_bad_forward_arguments_raise():
    with pytest.raises(ValueError, match="embed_dim=30 is not divisible by num_heads=4"):
        LocalSelfAttention(30, 4)
    module = LocalSelfAttention(32, 4, window=3)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, 32\), got \(2, 5, 16\)"):
        module(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(batch, length\) = \(2, 5\), got \(2, 4\)"):
        module(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor .* True = padding, got torch.int64"):
        module(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    bidirectional = LocalSelfAttention(32, 4, window=(2, 2), causal=False)
    with pytest.raises(ValueError, match="a KV cache needs causal=True"):
        bidirectional(torch.randn(1, 5, 32), cache=bidirectional.new_cache())
    with pytest.raises(ValueError, match="keep must be a non-negative int or None, got -1"):
        SlidingKVCache(-1)
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        LocalTransformerLM(LocalTransformerConfig(d_model=30, n_heads=4))
    with pytest.raises(ValueError, match="n_layers must be a positive int, got 0"):
        LocalTransformerLM(LocalTransformerConfig(n_layers=0))
    lm = tiny_lm()
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int, got -1"):
        lm.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="set_rope_scaling: this model has positional='alibi', no RoPE"):
        tiny_lm(positional="alibi").set_rope_scaling({"rope_type": "linear", "factor": 2.0})
