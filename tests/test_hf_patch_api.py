"""longreach.hf.patch's signature and docstring, its private config copy, unpatch, and the
`longreach` attention implementation selected through transformers' own API."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longreach.hf  # noqa: E402
from longreach import _extras  # noqa: E402

VOCAB = 61
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
YARN = {"rope_type": "yarn", "factor": 4.0}


def llama_config(**overrides):
    config = transformers.LlamaConfig(**{**LLAMA, **overrides})
    config._attn_implementation = "sdpa"
    return config


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_patch_has_a_keyword_signature_documenting_every_option():
    parameters = inspect.signature(longreach.hf.patch).parameters
    options = [name for name in parameters if name != "model"]
    assert options and all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in options)
    for name in options:
        assert f"- {name}:" in longreach.hf.patch.__doc__, name
    with pytest.raises(TypeError, match="unexpected keyword argument 'windw'"):
        longreach.hf.patch(transformers.LlamaForCausalLM(llama_config()), windw=4)


def test_an_option_of_the_other_model_kind_raises():
    with pytest.raises(TypeError, match="option dilation=2 applies to Longformer models only, not to LlamaForCausalLM"):
        longreach.hf.patch(transformers.LlamaForCausalLM(llama_config()), dilation=2)
    longformer = transformers.LongformerModel(transformers.LongformerConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        attention_window=4, max_position_embeddings=64))
    with pytest.raises(TypeError, match="option window=8 applies to decoder models only"):
        longreach.hf.patch(longformer, window=8)


def test_patching_one_model_leaves_its_twin_and_the_shared_config_alone():
    config = llama_config()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    twin = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert twin.config is model.config is config  # transformers shares it
    ids = torch.randint(3, VOCAB, (2, 20))
    before = logits(twin, ids)
    saved = config.to_dict()
    longreach.hf.patch(model, window=4, rope_scaling=YARN)
    assert model.config._attn_implementation == "longreach" and model.config.sliding_window == 4
    assert config.to_dict() == saved and config._attn_implementation == "sdpa"
    assert twin.model.layers[0].self_attn.config is config
    torch.testing.assert_close(logits(twin, ids), before, atol=0, rtol=0)


def test_unpatch_restores_the_model():
    config = llama_config()
    model = transformers.LlamaForCausalLM(config).eval()
    rotary = model.model.rotary_emb
    ids = torch.randint(3, VOCAB, (2, 20))
    before = logits(model, ids)
    longreach.hf.patch(model, window=4, rope_scaling=YARN)
    longreach.hf.patch(model, softcap=3.0)  # patched twice: unpatch goes back to before the first
    assert (logits(model, ids) - before).abs().max() > 1e-3
    assert longreach.hf.unpatch(model) is model
    assert model.config is config and model.model.layers[1].self_attn.config is config
    assert model.model.rotary_emb is rotary and not hasattr(config, "longreach")
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="was not patched by longreach.hf.patch in this process"):
        longreach.hf.unpatch(model)


def test_a_failed_patch_leaves_the_model_as_it_was():
    model = transformers.LlamaForCausalLM(llama_config())
    config = model.config
    with pytest.raises(ValueError, match="window must be a positive int"):
        longreach.hf.patch(model, window=0)
    assert model.config is config
    with pytest.raises(ValueError, match="was not patched"):
        longreach.hf.unpatch(model)


def test_unpatch_restores_a_longformer():
    model = transformers.LongformerModel(transformers.LongformerConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        attention_window=4, max_position_embeddings=64, attention_probs_dropout_prob=0.0)).eval()
    originals = [layer.attention.self for layer in model.encoder.layer]
    longreach.hf.patch(model, dilation=2)
    assert all(type(layer.attention.self).__module__.startswith("longreach") for layer in model.encoder.layer)
    longreach.hf.unpatch(model)
    assert [layer.attention.self for layer in model.encoder.layer] == originals


def test_attn_implementation_longreach_reads_the_options_from_the_config():
    """`import longreach.hf` registers the attention: transformers' own API selects it, and the
    attention function takes the options from config.longreach."""
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(3, VOCAB, (2, 20))
    expected = logits(longreach.hf.patch(copy.deepcopy(reference), window=4), ids)

    config = llama_config(sliding_window=4)
    config.longreach = {"window": 4}
    chosen = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="longreach").eval()
    chosen.load_state_dict(reference.state_dict())
    assert chosen.config._attn_implementation == "longreach"
    torch.testing.assert_close(logits(chosen, ids), expected, atol=0, rtol=0)

    switched = copy.deepcopy(reference)
    switched.set_attn_implementation("longreach")
    torch.testing.assert_close(logits(switched, ids), logits(reference, ids), atol=2e-5, rtol=1e-5)


def test_patch_without_transformers_names_the_extra(monkeypatch):
    real = _extras.importlib.util.find_spec
    monkeypatch.setattr(_extras.importlib.util, "find_spec", lambda name: None if name == "transformers" else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'longreach\[hf\]'"):
        longreach.hf.patch(torch.nn.Linear(2, 2))


def test_a_windowed_mistral_keeps_its_window_in_plain_transformers(tmp_path):
    """The window is stored in config.sliding_window, which Mistral's own attention applies."""
    config = transformers.MistralConfig(**LLAMA, sliding_window=None)
    config._attn_implementation = "sdpa"
    patched = longreach.hf.patch(transformers.MistralForCausalLM(config).eval(), window=3)
    patched.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.randint(3, VOCAB, (2, 20))
    full = copy.deepcopy(plain)
    full.config.sliding_window = None  # the same model without the window: other logits
    torch.testing.assert_close(logits(plain, ids), logits(patched, ids), atol=2e-5, rtol=1e-5)
    assert (logits(full, ids) - logits(patched, ids)).abs().max() > 1e-3
