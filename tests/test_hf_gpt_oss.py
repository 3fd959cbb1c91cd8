"""A tiny GptOss (learnable sinks as s_aux, alternating sliding/full layers) patched with longreach
gives eager's logits and gradients, the sinks' included. Built from its config, random init."""

from __future__ import annotations

import copy

import pytest
import torch

import longreach
import longreach.hf
from hf_testing import assert_same_generation

transformers = pytest.importorskip("transformers")
GptOssConfig = getattr(transformers, "GptOssConfig", None)
pytestmark = pytest.mark.skipif(GptOssConfig is None, reason="transformers without GptOss")


def _tiny():
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                       num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64,
                       attention_dropout=0.0, layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_()  # zero-initialised otherwise: make them matter
    return model


def _run(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patched_gpt_oss_matches_eager():
    eager = _tiny()
    patched = longreach.hf.patch(copy.deepcopy(eager))
    assert patched.config._attn_implementation == "longreach"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _run(eager, ids)
    logits, grads = _run(patched, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert any("sinks" in n for n in ref_grads) and ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cache", ["longreach", "dynamic"])
def test_patched_gpt_oss_greedy_generation_matches_eager(cache):
    """Sinks and alternating sliding (window 4) / full layers through generate(): the longreach cache (decode op,
    a rolling layer and a contiguous one) and HF's DynamicCache give eager's tokens and step logits; a row with
    3 pads of left padding included."""
    eager = _tiny()
    patched = longreach.hf.patch(copy.deepcopy(eager))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = eager.generate(ids, **kwargs)
        past = None if cache == "longreach" else transformers.DynamicCache(config=patched.config)
        got = patched.generate(ids, past_key_values=past, **kwargs)
    assert isinstance(got.past_key_values, longreach.hf.LongreachCache) == (cache == "longreach")
    assert_same_generation(got, expected, atol=1e-5)
