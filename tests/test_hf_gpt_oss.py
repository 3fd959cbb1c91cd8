"""A tiny GptOss (learnable sinks as s_aux, alternating sliding/full layers) patched with longreach
gives eager's logits and gradients, the sinks' included. Built from its config, random init."""

from __future__ import annotations

import copy

import pytest
import torch

import longreach
import longreach.hf

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
