"""longreach.hf.patch(model, chunk=..., chunk_shift="half"): LongLoRA's S2-Attn recipe on a tiny
Llama with YaRN. Train mode: logits and gradients equal transformers' own model running the
dense `longreach.reference.local_attention` with the same chunks (a registered attention
function); eval mode: transformers' eager attention with the same YaRN config; unpatch restores."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longreach.hf  # noqa: E402
from longreach import reference  # noqa: E402

VOCAB, CHUNK = 61, 6
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, initializer_range=0.3)
YARN = {"rope_type": "yarn", "factor": 4.0}
HALF = torch.tensor([0, 0, CHUNK // 2, CHUNK // 2])  # "half" for 4 heads, written out
REFERENCE = "chunk_reference"


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert attention_mask is None and dropout == 0.0
    out = reference.local_attention(query, key, value, causal=True, scale=scaling, chunk=CHUNK, chunk_shift=HALF)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(REFERENCE, reference_attention)
transformers.masking_utils.AttentionMaskInterface.register(REFERENCE, lambda *args, **kwargs: None)


def build(attn, yarn=True):
    options = dict(rope_parameters={"rope_theta": 10000.0, **YARN}) if yarn else {}
    config = transformers.LlamaConfig(**LLAMA, **options)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models():
    truth = build(REFERENCE)
    patched = build("sdpa", yarn=False)
    patched.load_state_dict(truth.state_dict())
    longreach.hf.patch(patched, chunk=CHUNK, chunk_shift="half", rope_scaling=YARN)
    return truth, patched


def forward_backward(model, ids):
    model.zero_grad()
    logits = model(ids, use_cache=False).logits
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_train_mode_is_the_chunked_reference_forward_and_backward(models):
    truth, patched = models
    ids = torch.randint(0, VOCAB, (2, 20))  # > max_position_embeddings: YaRN matters; 20 keys, chunks of 6
    expected, expected_grads = forward_backward(truth.train(), ids)
    actual, actual_grads = forward_backward(patched.train(), ids)
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, atol=2e-5, rtol=1e-4, msg=name)


def test_eval_mode_is_transformers_full_attention(models):
    _, patched = models
    eager = build("eager")
    eager.load_state_dict(patched.state_dict())
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        infer = patched.eval()(ids).logits
        torch.testing.assert_close(infer, eager.eval()(ids).logits, atol=2e-5, rtol=1e-5)
        train = patched.train()(ids, use_cache=False).logits
    assert (train - infer).abs().max() > 1e-3  # the chunks do change the training forward
    patched.eval()


def test_options_are_saved_and_unpatch_restores(tmp_path):
    model = build("sdpa", yarn=False).train()
    ids = torch.randint(0, VOCAB, (1, 14))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    longreach.hf.patch(model, chunk=CHUNK, chunk_shift=torch.tensor([0, 1, 2, 3]))
    assert model.config.longreach == {"chunk": CHUNK, "chunk_shift": [0, 1, 2, 3]}
    assert model.config._attn_implementation == "longreach"
    with torch.no_grad():
        assert (model(ids, use_cache=False).logits - before).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.longreach == {"chunk": CHUNK, "chunk_shift": [0, 1, 2, 3]}
    longreach.hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and not getattr(model.config, "longreach", None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, before, atol=0, rtol=0)


def test_cached_keys_in_train_mode_raise(models):
    _, patched = models
    with pytest.raises(NotImplementedError, match="applies chunks in training mode, to whole sequences"):
        patched.train().generate(torch.randint(0, VOCAB, (1, 5)), max_new_tokens=2, do_sample=False)
    patched.eval()


@pytest.mark.parametrize("kw, error, match", [
    (dict(chunk=-2), ValueError, "chunk must be an int >= 0, got -2"),
    (dict(chunk=4, chunk_shift="third"), ValueError, "chunk_shift must be 'half'"),
    (dict(chunk_shift="half"), ValueError, "chunk_shift='half' needs chunk > 0"),
    (dict(chunk=4, chunk_shift=[0, 1]), ValueError, "chunk_shift must be 4 ints"),
])
def test_bad_options(kw, error, match):
    model = build("sdpa", yarn=False)
    with pytest.raises(error, match=match):
        longreach.hf.patch(model, **kw)
    assert model.config._attn_implementation == "sdpa"
