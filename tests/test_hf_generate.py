"""generate() on patched Hugging Face decoders through longreach's decode op (LongreachCache).

Truths: eager transformers on the same weights (greedy tokens and every step's logits), and for
StreamingLLM (sink_tokens, no eager equivalent) a recomputation of the whole history by
longreach.reference's dense attention with the same sink/window rule.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longreach  # noqa: E402
import longreach.hf  # noqa: E402
from longreach import reference  # noqa: E402
from longreach.hf import LongreachCache, decoder  # noqa: E402
from longreach.hf.cache import LongreachLayer  # noqa: E402
from hf_testing import assert_same_generation, left_padded  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.3)
WINDOW = 5
GENERATE = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, output_logits=True,
                return_dict_in_generate=True)


def build(family):
    """(eager reference, patched copy): Mistral (all sliding), Qwen2 (full + sliding), Llama patched with a window
    (its reference: eager Mistral with that window on the same weights)."""
    if family == "qwen2":
        config = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.MistralConfig(**COMMON, sliding_window=WINDOW)
        cls = transformers.MistralForCausalLM
    config._attn_implementation = "eager"
    reference_model = cls(config).eval()
    if family == "llama":
        llama = transformers.LlamaConfig(**COMMON)
        llama._attn_implementation = "eager"
        patched = transformers.LlamaForCausalLM(llama).eval()
        patched.load_state_dict(reference_model.state_dict())
        return reference_model, longreach.hf.patch(patched, window=WINDOW)
    return reference_model, longreach.hf.patch(copy.deepcopy(reference_model))


def count_decode_calls(monkeypatch):
    calls = []
    op = longreach.hf.cache.local_attention_with_kvcache

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return op(q, *args, **kwargs)

    monkeypatch.setattr(longreach.hf.cache, "local_attention_with_kvcache", counting)
    return calls


@pytest.mark.parametrize("cache", ["longreach", "default", "dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_generation_matches_eager_with_left_padding(family, cache, monkeypatch):
    """Rows with 0, 3 and 7 pads (7 reach into the first steps' window of 5 over a prompt of 9)."""
    torch.manual_seed(0)
    reference_model, patched = build(family)
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = left_padded((0, 3, 7), 9)
    expected = reference_model.generate(ids, attention_mask=mask, **GENERATE)
    calls = count_decode_calls(monkeypatch)
    extra = {"longreach": dict(past_key_values=LongreachCache()), "default": {},
             "dynamic": dict(past_key_values=transformers.DynamicCache(config=patched.config)),
             "static": dict(cache_implementation="static")}[cache]
    got = patched.generate(ids, attention_mask=mask, **extra, **GENERATE)
    assert_same_generation(got, expected)
    layers = patched.config.num_hidden_layers
    if cache in ("longreach", "default"):  # every step after the prompt went through the decode op
        assert calls == [1] * layers * (GENERATE["max_new_tokens"] - 1)
        assert isinstance(got.past_key_values, LongreachCache)
        lengths = [layer.lengths.tolist() for layer in got.past_key_values.layers]
        assert lengths == [[9 + 11, 6 + 11, 2 + 11]] * layers  # real tokens only: padding is not stored
    else:
        assert calls == []


def test_sliding_layer_memory_is_flat_full_layer_grows():
    """Qwen2: layer 0 full (contiguous, grows), layer 1 sliding (ring of window - 1 + chunk slots, flat)."""
    torch.manual_seed(0)
    _, patched = build("qwen2")
    ids = torch.randint(3, VOCAB, (1, 4))
    sizes = []
    for new in (10, 80):
        cache = LongreachCache(chunk=1)
        patched.generate(ids, past_key_values=cache, max_new_tokens=new, do_sample=False, eos_token_id=None)
        sizes.append(cache.nbytes())
        assert [layer.is_sliding for layer in cache.layers] == [False, True]
        assert cache.layers[1].keys.shape[2] == (WINDOW - 1) + 1
    assert sizes[0][1] == sizes[1][1]
    assert sizes[1][0] > sizes[0][0]


def test_chunked_prefill_through_the_decode_op_matches_one_forward():
    """A prompt fed in chunks of 3 (decode op with Lq = 3 after the first) gives the logits of one forward."""
    torch.manual_seed(0)
    reference_model, patched = build("qwen2")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        expected = reference_model(ids).logits
        cache = LongreachCache(chunk=3)
        pieces = [patched(ids[:, i:i + 3], past_key_values=cache, use_cache=True).logits for i in range(0, 12, 3)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=2e-5, rtol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="chunk=3"):  # more new tokens than the ring was sized for
        patched(ids[:, :4], past_key_values=cache, use_cache=True)


def test_streaming_llm_generation_past_the_training_length_equals_the_reference(monkeypatch):
    """Llama with max_position_embeddings=32 patched with window=8, sink_tokens=4, generating 100 tokens: every
    step's logits are finite, bounded and equal a full-history recomputation by the dense reference with the same
    sink/window rule (so a cache that dropped the sinks, or kept too few keys, fails)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 32})
    config._attn_implementation = "eager"
    model = longreach.hf.patch(transformers.LlamaForCausalLM(config).eval(), window=8, sink_tokens=4)
    ids = torch.randint(3, VOCAB, (2, 6))
    got = model.generate(ids, max_new_tokens=100, do_sample=False, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    assert isinstance(got.past_key_values, LongreachCache)
    assert got.past_key_values.layers[0].keys.shape[2] == 4 + 7 + 16  # sinks + window - 1 + chunk, not 106
    logits = torch.stack(got.logits, dim=1)  # (B, 100, V)
    assert torch.isfinite(logits).all() and logits.abs().max() < 1e3
    monkeypatch.setattr(decoder, "local_attention", reference.local_attention)  # the dense oracle, no cache
    with torch.no_grad():
        recomputed = model(got.sequences[:, :-1], use_cache=False).logits[:, 5:]
    torch.testing.assert_close(logits, recomputed, atol=2e-5, rtol=1e-5)
    without_sinks = longreach.hf.patch(copy.deepcopy(model), window=8)  # sink_tokens dropped: must differ
    with torch.no_grad():
        other = without_sinks(got.sequences[:, :-1], use_cache=False).logits[:, 5:]
    assert (other - logits).abs().max() > 1e-2


def test_longreach_cache_arguments_and_unpatch():
    with pytest.raises(ValueError, match="chunk"):
        LongreachCache(chunk=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        longreach.hf.patch(build("mistral")[0], sink_tokens=-1)
    _, patched = build("mistral")
    assert "_prepare_cache_for_generation" in patched.__dict__
    longreach.hf.unpatch(patched)
    assert "_prepare_cache_for_generation" not in patched.__dict__
    with pytest.raises(NotImplementedError, match="beam search"):
        LongreachLayer().reorder_cache(torch.zeros(1, dtype=torch.long))


def test_the_default_cache_follows_where_the_decode_op_runs(monkeypatch):
    """LongreachCache is generate()'s default wherever the decode op has a kernel: CPU always, CUDA in a
    CUDA build (the decode op's CUDA kernel), nowhere else; without one, transformers' DynamicCache."""
    from longreach.hf.cache import decode_op_available

    assert decode_op_available(torch.device("cpu"))
    assert decode_op_available(torch.device("cuda")) == torch._C._dispatch_has_kernel_for_dispatch_key(
        "longreach::local_attention_kvcache_fwd", "CUDA")
    assert not decode_op_available(torch.device("meta"))
    # A build without a decode kernel for the model's device: the default stays transformers' cache.
    torch.manual_seed(0)
    _, patched = build("mistral")
    monkeypatch.setattr(longreach.hf.cache, "decode_op_available", lambda device: False)
    calls = count_decode_calls(monkeypatch)
    got = patched.generate(torch.randint(3, VOCAB, (1, 6)), **GENERATE)
    assert not isinstance(got.past_key_values, LongreachCache) and calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_cuda_generation_uses_the_decode_op_by_default_and_matches_eager(family, monkeypatch):
    """On a GPU (float32): the default cache is a LongreachCache, every step after the prompt runs the
    CUDA decode kernel, and tokens and logits equal eager transformers' on the same GPU."""
    torch.manual_seed(0)
    reference_model, patched = build(family)
    reference_model, patched = reference_model.cuda(), patched.cuda()
    ids = torch.randint(3, VOCAB, (3, 9)).cuda()
    mask = left_padded((0, 3, 7), 9).cuda()
    expected = reference_model.generate(ids, attention_mask=mask, **GENERATE)
    calls = count_decode_calls(monkeypatch)
    got = patched.generate(ids, attention_mask=mask, **GENERATE)
    assert isinstance(got.past_key_values, LongreachCache)
    assert calls == [1] * patched.config.num_hidden_layers * (GENERATE["max_new_tokens"] - 1)
    assert got.past_key_values.layers[0].keys.device.type == "cuda"
    assert_same_generation(got, expected, atol=1e-4)
