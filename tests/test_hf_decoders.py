"""longreach.hf.patch on Hugging Face decoders: tiny models from configs, random weights.

The truth is transformers' own attention on the same weights: `eager` (the only one with
soft-capping, used for Gemma2) and `sdpa`. Logits are compared at real (non-padding) tokens
only: what a model computes at padding positions is unspecified (eager even gives NaN there
in float64, and NaN can leak from them into later layers, which is why float64 comparisons
use sdpa).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longreach.hf  # noqa: E402
from longreach.hf import decoder  # noqa: E402
from hf_testing import assert_same_generation, left_padded  # noqa: E402

VOCAB = 61
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    initializer_range=0.3,  # scores of a few units, so that soft-capping and windows change the logits
)
SLIDING = 5  # shorter than the test sequences, so the sliding windows matter


def build(family: str, attn: str = "eager", dtype=torch.float32, **overrides):
    """A tiny model of a family with random weights (seeded by the test) in eval mode."""
    if family == "llama":
        config = transformers.LlamaConfig(**{**COMMON, **overrides})
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(**{**COMMON, "sliding_window": SLIDING, **overrides})
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":  # layer 0 full attention, layer 1 sliding
        config = transformers.Qwen2Config(
            **{**COMMON, "use_sliding_window": True, "sliding_window": SLIDING, "max_window_layers": 1, **overrides}
        )
        cls = transformers.Qwen2ForCausalLM
    elif family == "gemma2":  # soft-capping, query_pre_attn_scalar != head_dim, sliding/full layers
        config = transformers.Gemma2Config(
            **{**COMMON, "head_dim": 8, "sliding_window": SLIDING, "query_pre_attn_scalar": 13,
               "attn_logit_softcapping": 2.0, "final_logit_softcapping": None, **overrides}
        )
        cls = transformers.Gemma2ForCausalLM
    elif family == "gemma3":  # per-layer-type rope parameters, 5:1-style sliding/full layers
        config = transformers.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3, "head_dim": 8, "sliding_window": SLIDING, "query_pre_attn_scalar": 13,
               "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], **overrides}
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise AssertionError(family)
    config._attn_implementation = attn
    return cls(config).to(dtype).eval()


def patched_copy(model, **options):
    return longreach.hf.patch(copy.deepcopy(model), **options)


FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3"]


def reference_attn(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"  # sdpa has no soft-capping


def padding_mask(kind: str, batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    if kind == "left":
        for row in range(1, batch):
            mask[row, : 3 * row] = 0
    elif kind == "right":
        for row in range(1, batch):
            mask[row, length - 3 * row :] = 0
    elif kind == "holes":  # any pattern transformers' 2-D masks express: padding inside a row too
        for row in range(1, batch):
            mask[row, 1 + row : 3 + 2 * row] = 0
            mask[row, length - row - 2] = 0
    elif kind == "both":
        for row in range(1, batch):
            mask[row, :row] = 0
            mask[row, length - 2 * row :] = 0
    return mask


def test_qwen2_config_really_mixes_full_and_sliding_layers():
    model = build("qwen2")
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, SLIDING]


@pytest.mark.parametrize("padding", ["none", "left", "right", "holes", "both"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, padding):
    ids = torch.randint(3, VOCAB, (3, 14))
    mask = padding_mask(padding, 3, 14)
    real = mask.bool()
    for attn in sorted({"eager", reference_attn(family)}):
        reference = build(family, attn)
        patched = patched_copy(reference)
        assert patched.config._attn_implementation == "longreach"
        with torch.no_grad():
            expected = reference(ids, attention_mask=mask).logits
            got = patched(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-5, msg=f"vs {attn}")


def test_float64_logits_match_sdpa_tightly():
    reference = build("mistral", "sdpa", torch.float64)
    patched = patched_copy(reference)
    ids = torch.randint(3, VOCAB, (3, 14))
    mask = padding_mask("left", 3, 14)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = patched(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cache", ["default", "dynamic"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_cache_matches(family, cache):
    """Left-padded batch, prompt longer than the sliding window, continuation past it; the patched model's
    default cache (a LongreachCache on CPU: decode steps through the decode op) and HF's DynamicCache."""
    reference = build(family, reference_attn(family))
    patched = patched_copy(reference)
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = padding_mask("left", 3, 9)
    kwargs = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, eos_token_id=None)
    expected = reference.generate(ids, **kwargs)
    past = transformers.DynamicCache(config=patched.config) if cache == "dynamic" else None
    got = patched.generate(ids, past_key_values=past, **kwargs)
    assert isinstance(got.past_key_values, longreach.hf.LongreachCache) == (cache == "default")
    assert_same_generation(got, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generation_with_static_cache_matches(family):
    """Static caches hand the kernel the whole preallocated key array (unused tail included)
    for full layers, and a rolling window for sliding ones. Row 1's 6 pads lie inside the
    first steps' sliding window (5 keys, prompt of 8), so the window's padding is tested."""
    reference = build(family, reference_attn(family))
    patched = patched_copy(reference)
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = left_padded((0, 6), 8)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    expected = reference.generate(ids, **kwargs)
    got = patched.generate(ids, cache_implementation="static", **kwargs)
    assert_same_generation(got, expected)


WINDOW = 8
PROMPT = 10  # the last prompt token's window (8 keys) starts at key 2: 7 pads reach into it, 2 do not
PADS = {"inside": (0, 7), "outside": (0, 2)}
CACHES = {"none": dict(use_cache=False), "dynamic": {}, "static": dict(cache_implementation="static")}


@pytest.mark.parametrize("pads", sorted(PADS))
@pytest.mark.parametrize("cache", sorted(CACHES))
@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_generation_with_left_padding_near_the_window_matches_eager(family, cache, pads):
    """Every step's logits and the greedy tokens equal eager Mistral (sliding_window=8) on the
    same weights, for Mistral itself and for a Llama patched with window=8.

    Regression (issue 12): with a static cache, generate() builds the masks once through the
    mask function and hands its output back as attention_mask; models with one mask type
    (Mistral, Llama) pass it through the mask function a second time. That second pass cut
    the keys at the layer's offset again, dropping the current token as soon as the sliding
    cache was full (logits off by up to 9); padding inside the window shows it from the first
    generated token.
    """
    reference = build("mistral", "eager", sliding_window=WINDOW)
    if family == "mistral":
        patched = patched_copy(reference)
    else:
        patched = build("llama", "eager")
        patched.load_state_dict(reference.state_dict())
        longreach.hf.patch(patched, window=WINDOW)
    ids = torch.randint(3, VOCAB, (2, PROMPT))
    kwargs = dict(attention_mask=left_padded(PADS[pads], PROMPT), max_new_tokens=10, do_sample=False,
                  eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    expected = reference.generate(ids, **kwargs)
    got = patched.generate(ids, **CACHES[cache], **kwargs)
    assert_same_generation(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match(family):
    """float64; eager (Gemma2) takes its softmax in float32, hence the looser tolerance there."""
    attn = reference_attn(family)
    reference = build(family, attn, torch.float64)
    patched = patched_copy(reference)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = padding_mask("right", 2, 12)
    weights = torch.randn(2, 12, VOCAB, dtype=torch.float64) * mask[..., None]  # loss on real tokens only
    for model in (reference, patched):
        (model(ids, attention_mask=mask).logits * weights).sum().backward()
    tolerance = 1e-5 if attn == "eager" else 1e-10
    for (name, p_ref), (_, p_got) in zip(reference.named_parameters(), patched.named_parameters()):
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p_got.grad, p_ref.grad, atol=tolerance * scale, rtol=0, msg=name)


def test_window_option_turns_llama_into_a_sliding_window_model():
    """patch(llama, window=W) == Mistral with sliding_window=W on the same weights, cache included."""
    llama = build("llama", "sdpa")
    mistral = build("mistral", "sdpa", sliding_window=4)
    mistral.load_state_dict(llama.state_dict())
    patched = patched_copy(llama, window=4)
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = padding_mask("left", 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            patched(ids, attention_mask=mask).logits[mask.bool()],
            mistral(ids, attention_mask=mask).logits[mask.bool()], atol=2e-5, rtol=1e-5,
        )
        unwindowed = llama(ids, attention_mask=mask).logits[mask.bool()]
        assert (patched(ids, attention_mask=mask).logits[mask.bool()] - unwindowed).abs().max() > 1e-3
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(patched.generate(ids, **kwargs), mistral.generate(ids, **kwargs))
    # the generation cache keeps only the window
    cache = transformers.DynamicCache(config=patched.config)
    assert all(type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in cache.layers)


def test_window_option_overrides_sliding_layers():
    """Gemma2 patched with window=3 == Gemma2 whose config says sliding_window=3 on every layer type."""
    reference = build("gemma2", "eager", layer_types=["sliding_attention", "sliding_attention"], sliding_window=3)
    patched = patched_copy(build("gemma2", "eager"), window=3)
    patched.load_state_dict(reference.state_dict())
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, atol=2e-5, rtol=1e-5)


def test_softcap_option_overrides_the_model():
    reference = build("gemma2", "eager", attn_logit_softcapping=1.5)
    patched = patched_copy(build("gemma2", "eager"), softcap=1.5)
    patched.load_state_dict(reference.state_dict())
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options, reference_kwargs",
    [
        (dict(score="sigmoid", window=4), dict(score="sigmoid", window=(3, 0))),
        (dict(alibi="standard"), dict(alibi="standard")),
        (dict(alibi="balanced", score="sigmoid", window=6), dict(alibi="balanced", score="sigmoid", window=(5, 0))),
    ],
)
def test_score_and_alibi_options_reach_the_kernel(options, reference_kwargs):
    """The patched Llama equals the same Llama whose attention is the dense reference op with
    those options. (The slopes themselves are tested with longreach.alibi_slopes.)"""
    from longreach import alibi_slopes
    from longreach import reference as ref_ops

    model = build("llama", "eager")
    patched = patched_copy(model, **options)
    kwargs = dict(reference_kwargs)
    kind = kwargs.pop("alibi", None)
    slopes = None if kind is None else alibi_slopes(COMMON["num_attention_heads"], kind)

    def oracle_attention(module, q, k, v, mask, scaling=None, **ignored):
        out = ref_ops.local_attention(q, k, v, causal=True, scale=scaling, alibi_slopes=slopes, **kwargs)
        return out.transpose(1, 2), None

    transformers.AttentionInterface.register("longreach_test_oracle", oracle_attention)
    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation("longreach_test_oracle")
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, oracle(ids).logits, atol=2e-5, rtol=1e-5)
        assert (patched(ids).logits - model(ids).logits).abs().max() > 1e-3


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0, 1.1, 1.3, 2.0],
                 "long_factor": [1.0, 2.0, 3.0, 4.0]},
}


@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(rope, tmp_path):
    """patch(rope_scaling=...) == the same weights in a model configured with that scaling by
    transformers itself; sequences run past the pretraining length (16) so dynamic and
    longrope switch frequencies. The scaling survives save_pretrained in plain transformers."""
    scaling = ROPE_SCALINGS[rope]
    plain = build("llama", "sdpa", max_position_embeddings=16)
    scaled = build("llama", "sdpa", max_position_embeddings=16,
                   rope_parameters={"rope_theta": 10000.0, **scaling})
    scaled.load_state_dict(plain.state_dict())
    patched = patched_copy(plain, rope_scaling=scaling)
    assert type(patched.model.rotary_emb).__name__ == "ScaledRotaryEmbedding"
    for length in (12, 40, 12):  # dynamic: grow past the original length, then back
        ids = torch.randint(3, VOCAB, (2, length))
        with torch.no_grad():
            expected = scaled(ids).logits
            torch.testing.assert_close(patched(ids).logits, expected, atol=2e-5, rtol=1e-5, msg=f"length {length}")
    if rope != "dynamic":  # dynamic equals plain RoPE within the pretraining length
        with torch.no_grad():
            assert (plain(ids).logits - expected).abs().max() > 1e-3
    patched.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(3, VOCAB, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, scaled(ids).logits, atol=2e-5, rtol=1e-5)


def test_rope_scaling_per_layer_type_gemma3():
    """Gemma3 keeps RoPE parameters per layer type; a scaling keyed by type changes only those layers."""
    plain = build("gemma3", "sdpa")
    parameters = {key: dict(value) for key, value in plain.config.rope_parameters.items()}
    parameters["full_attention"].update({"rope_type": "linear", "factor": 8.0})
    scaled = build("gemma3", "sdpa", rope_parameters=parameters)
    scaled.load_state_dict(plain.state_dict())
    patched = patched_copy(plain, rope_scaling={"full_attention": {"rope_type": "linear", "factor": 8.0}})
    assert patched.config.rope_parameters["sliding_attention"] == plain.config.rope_parameters["sliding_attention"]
    ids = torch.randint(3, VOCAB, (2, 14))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, scaled(ids).logits, atol=2e-5, rtol=1e-5)
        assert (patched(ids).logits - plain(ids).logits).abs().max() > 1e-3


def test_rope_scaling_with_window_generates_like_transformers():
    """The long-context recipe (window + YaRN) through generate() with a cache."""
    scaling = ROPE_SCALINGS["yarn"]
    reference = build("mistral", "sdpa", max_position_embeddings=16, sliding_window=6,
                      rope_parameters={"rope_theta": 10000.0, **scaling})
    patched = patched_copy(build("llama", "sdpa", max_position_embeddings=16), window=6, rope_scaling=scaling)
    patched.load_state_dict(reference.state_dict())
    ids = torch.randint(3, VOCAB, (2, 20))
    mask = padding_mask("left", 2, 20)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(patched.generate(ids, **kwargs), reference.generate(ids, **kwargs))


PACKED_LENGTHS = (7, 1, 9, 3)  # longer than the sliding window (5), and a document of length 1
FA_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_batch(documents, **collator_options):
    """The documents flattened into one row by transformers' own DataCollatorWithFlattening."""
    collator = transformers.DataCollatorWithFlattening(**collator_options)
    return collator([{"input_ids": doc.tolist()} for doc in documents])


def packed_inputs(documents, form):
    """Model kwargs for a packed batch: `position_ids` restarting per document (transformers builds
    a packed mask pattern then), or the flash_attention_2 kwargs as the collator returns them
    (cu_seq_lens_q/k, max_length_q/k, with the position_ids)."""
    batch = packed_batch(documents, return_flash_attn_kwargs=(form == "cu_seq_lens"))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if form == "cu_seq_lens":
        assert batch["cu_seq_lens_q"].tolist() == [0, 7, 8, 17, 20] and batch["max_length_q"] == 9
        inputs.update({name: batch[name] for name in FA_KWARGS})
    return inputs


@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_packed_batch_matches_documents_one_by_one(family, form):
    """A DataCollatorWithFlattening row of 4 documents gives, in float64, the logits and parameter
    gradients of the same documents run one by one (both through longreach). Without a cache
    transformers hands the mask function a packed pattern; with one (use_cache=True) it does not,
    and the attention function finds the documents in position_ids itself."""
    model = patched_copy(build(family, reference_attn(family), torch.float64))
    documents = [torch.randint(3, VOCAB, (length,)) for length in PACKED_LENGTHS]
    inputs = packed_inputs(documents, form)
    weights = [torch.randn(length, VOCAB, dtype=torch.float64) for length in PACKED_LENGTHS]

    expected_logits = []
    for doc, weight in zip(documents, weights):
        logits = model(doc[None], use_cache=False).logits[0]
        (logits * weight).sum().backward()
        expected_logits.append(logits.detach())
    expected_logits = torch.cat(expected_logits)
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    logits = model(**inputs, use_cache=False).logits[0]
    (logits * torch.cat(weights)).sum().backward()
    torch.testing.assert_close(logits.detach(), expected_logits, atol=1e-12, rtol=1e-12)
    tolerance = 1e-6 if family == "gemma2" else 1e-11  # Gemma2's RMSNorm computes in float32
    for name, p in model.named_parameters():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(p.grad, expected_grads[name], atol=tolerance * scale, rtol=0,
                                   msg=lambda message, name=name: f"{name}: {message}")

    with torch.no_grad():  # a first forward with a cache: no packed mask pattern from transformers
        torch.testing.assert_close(model(**inputs).logits[0], expected_logits, atol=1e-12, rtol=1e-12)
    # the documents really interact within themselves: the plain causal row differs
    with torch.no_grad():
        unpacked = model(inputs["input_ids"], use_cache=False).logits[0]
    assert (unpacked - expected_logits).abs().max() > 1e-3


def test_cu_seq_lens_alone_separate_the_documents():
    """The cu_seq_lens kwargs without position_ids (positions then run 0..19 over the row, so RoPE
    sees shifted positions: equal up to transformers' float32 rotary tables) still keep every
    document to itself; the same with the kwargs as 0-d tensors and without max_length_q/k, as
    prepare_fa_kwargs_from_position_ids returns them."""
    model = patched_copy(build("mistral", "sdpa", torch.float64))
    documents = [torch.randint(3, VOCAB, (length,)) for length in PACKED_LENGTHS]
    batch = packed_batch(documents, return_flash_attn_kwargs=True, return_position_ids=False)
    assert "position_ids" not in batch
    with torch.no_grad():
        expected = torch.cat([model(doc[None], use_cache=False).logits[0] for doc in documents])
        kwargs = {name: batch[name] for name in FA_KWARGS}
        tensors = dict(kwargs, max_length_q=torch.tensor(9), max_length_k=torch.tensor(9))
        bare = {"cu_seq_lens_q": batch["cu_seq_lens_q"].long(), "cu_seq_lens_k": batch["cu_seq_lens_k"].long()}
        for variant in (kwargs, tensors, bare):
            got = model(batch["input_ids"], use_cache=False, **variant).logits[0]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packed_rows_with_window_and_alibi_options():
    """Two packed rows (flattened together, as flash_attention_2 does), a Llama patched with
    window=3, sigmoid scores and ALiBi: the options apply per document."""
    model = patched_copy(build("llama", "sdpa", torch.float64), window=3, score="sigmoid", alibi="standard")
    rows = [[torch.randint(3, VOCAB, (n,)) for n in (5, 1, 4)], [torch.randint(3, VOCAB, (n,)) for n in (2, 8)]]
    batches = [packed_batch(docs) for docs in rows]
    ids = torch.cat([b["input_ids"] for b in batches])
    positions = torch.cat([b["position_ids"] for b in batches])
    with torch.no_grad():
        expected = [torch.cat([model(doc[None], use_cache=False).logits[0] for doc in docs]) for docs in rows]
        got = model(ids, position_ids=positions, use_cache=False).logits
    for row in range(2):
        torch.testing.assert_close(got[row], expected[row], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_mask_function_does_not_build_a_mask_across_documents(family):
    """transformers' mask builders (causal and sliding) on a packed row: longreach's mask function
    returns each token's document index, nothing that would let a token see another document;
    plain positions give no mask at all."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    model = patched_copy(build(family))
    config = model.config
    documents = [torch.randint(3, VOCAB, (length,)) for length in PACKED_LENGTHS]
    batch = packed_batch(documents)
    embeds = torch.zeros(1, sum(PACKED_LENGTHS), COMMON["hidden_size"])
    expected = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), torch.tensor(PACKED_LENGTHS))[None]
    for builder in (create_causal_mask, create_sliding_window_causal_mask):
        mask = builder(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                       position_ids=batch["position_ids"])
        assert mask.dtype == torch.int32 and torch.equal(mask, expected), builder.__name__
        plain = builder(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                        position_ids=torch.arange(embeds.shape[1])[None])
        assert plain is None, builder.__name__
    # the attention function turns the document indices into one problem per document
    calls = []
    kernel = decoder.local_attention_varlen
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(decoder, "local_attention_varlen", lambda *a, **k: calls.append(a[3].tolist()) or kernel(*a, **k))
        with torch.no_grad():
            model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    assert calls == [[0, 7, 8, 17, 20]] * config.num_hidden_layers


def test_packed_sequences_with_padding_or_a_cache_raise():
    patched = patched_copy(build("llama"))
    ids = torch.randint(3, VOCAB, (1, 10))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    padded = torch.ones(1, 10, dtype=torch.long)
    padded[0, -1] = 0
    with pytest.raises(ValueError, match="packing and padding together are not supported"):
        patched(ids, position_ids=packed, attention_mask=padded)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="packing and padding together are not supported"):
        patched(ids, attention_mask=padded, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    with pytest.raises(ValueError, match="only one of cu_seq_lens_q and cu_seq_lens_k"):
        patched(ids, cu_seq_lens_q=cu)
    past = patched(ids[:, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="supported without a cache only"):
        patched(ids, position_ids=packed + 4, past_key_values=past)
    # an all-ones attention_mask is no padding; plain positions with an offset are fine
    with torch.no_grad():
        torch.testing.assert_close(patched(ids, position_ids=packed, attention_mask=torch.ones(1, 10)).logits,
                                   patched(ids, position_ids=packed, use_cache=False).logits)
        patched(ids, position_ids=torch.arange(5, 15)[None])


def test_prepared_4d_mask_raises():
    patched = patched_copy(build("llama"))
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="2-D padding mask"):
        patched(ids, attention_mask=torch.zeros(1, 1, 6, 6))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(window=0), "window must be a positive int.*got 0"),
        (dict(window=-3), "window must be a positive int.*got -3"),
        (dict(window=2.5), "window must be a positive int.*got 2.5"),
        (dict(score="relu"), "score must be one of.*'relu'"),
        (dict(alibi="steep"), "alibi must be one of.*'steep'"),
        (dict(softcap=-1.0), "softcap must be a positive number.*-1.0"),
        (dict(rope_scaling="yarn"), "rope_scaling must be a dict"),
        (dict(rope_scaling={"rope_type": "stretchy", "factor": 2.0}), "rope_scaling.*rope_type.*'stretchy'"),
        (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "factor"),
        (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "'ntk' is longreach's static NTK scaling"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        longreach.hf.patch(build("llama"), **options)


def test_model_without_attention_interface_raises():
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)
    with pytest.raises(TypeError, match="BloomForCausalLM does not route its attention through"):
        longreach.hf.patch(transformers.BloomForCausalLM(config))
    with pytest.raises(TypeError, match="does not route its attention"):
        longreach.hf.patch(torch.nn.Linear(2, 2))


def test_torch_compile_fullgraph_matches_eager():
    patched = patched_copy(build("mistral"))
    compiled = torch.compile(patched, fullgraph=True)
    ids = torch.randint(3, VOCAB, (2, 12))
    expected = patched(ids).logits
    got = compiled(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()  # the fused op's backward inside the compiled graph
    assert patched.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_torch_compile_fullgraph_with_padding_matches_eager_without_recompiling():
    """A padding mask goes to the op as its key_padding_mask: fullgraph=True compiles it, and a
    new padding pattern of the same shape reuses the graph (forward and backward)."""
    torch._dynamo.reset()
    patched = patched_copy(build("llama"), window=4)
    compiled = torch.compile(patched, fullgraph=True)
    ids = torch.randint(3, VOCAB, (3, 12))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kind in ("left", "holes", "both"):
            mask = padding_mask(kind, 3, 12)
            expected = patched(ids, attention_mask=mask, use_cache=False).logits
            got = compiled(ids, attention_mask=mask, use_cache=False).logits
            real = mask.bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5, msg=kind)
            (want,) = torch.autograd.grad(expected[real].square().sum(), patched.model.embed_tokens.weight)
            (grad,) = torch.autograd.grad(got[real].square().sum(), patched.model.embed_tokens.weight)
            scale = want.abs().max()
            torch.testing.assert_close(grad / scale, want / scale, atol=1e-5, rtol=1e-5, msg=kind)


def test_save_pretrained_round_trip(tmp_path):
    patched = patched_copy(build("qwen2"), window=4)
    patched.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.longreach == {"window": 4}
    longreach.hf.patch(loaded)  # no options: the saved ones
    assert loaded.config._attn_implementation == "longreach"
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, patched(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "options, attn",
    [
        (dict(window=4), "longreach"),
        (dict(alibi="standard", softcap=1.5), "longreach"),
        (dict(score="sigmoid", window=6, rope_scaling=ROPE_SCALINGS["yarn"]), "longreach"),
        (dict(rope_scaling=ROPE_SCALINGS["yarn"]), "sdpa"),  # transformers computes the same RoPE itself
        ({}, "sdpa"),
    ],
)
def test_plain_from_pretrained_keeps_the_saved_options(tmp_path, options, attn):
    """Regression (issue 12): a plain from_pretrained of a patched checkpoint used to run
    transformers' attention without window / ALiBi / softcap / sigmoid, silently. Now
    config.json names attn_implementation="longreach" when an option changes the attention,
    and the loaded model reads the options from config.longreach; also after saving it again."""
    patched = patched_copy(build("llama", "sdpa"), **options)
    patched.save_pretrained(tmp_path / "first")
    ids = torch.randint(3, VOCAB, (2, 12))
    mask = padding_mask("left", 2, 12)
    with torch.no_grad():
        expected = patched(ids, attention_mask=mask).logits[mask.bool()]
    repatched = longreach.hf.patch(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "first").eval())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "first").eval()
    assert plain.config._attn_implementation == attn
    with torch.no_grad():
        torch.testing.assert_close(repatched(ids, attention_mask=mask).logits[mask.bool()], expected, atol=0, rtol=0)
        torch.testing.assert_close(plain(ids, attention_mask=mask).logits[mask.bool()], expected, atol=2e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path / "again")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").config._attn_implementation == attn
    if attn == "longreach":  # the options matter: transformers' own attention gives other logits
        forced = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "first", attn_implementation="sdpa")
        with torch.no_grad():
            assert (forced.eval()(ids, attention_mask=mask).logits[mask.bool()] - expected).abs().max() > 1e-3


def test_fresh_process_loads_a_patched_checkpoint_once_longreach_hf_is_imported(tmp_path):
    """Without longreach, transformers refuses the checkpoint (it names an unknown attention);
    `import longreach.hf` alone registers it, no patch() call needed."""
    patched_copy(build("llama"), window=4).save_pretrained(tmp_path)
    script = f"""
import transformers
try:
    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
except ValueError as error:
    assert 'attn_implementation="longreach"' in str(error), error
else:
    raise AssertionError("loaded without longreach")
import longreach.hf
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
assert model.config._attn_implementation == "longreach", model.config._attn_implementation
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)


def test_attention_mask_shorter_than_the_tokens_raises():
    patched = patched_copy(build("llama"))
    ids = torch.randint(3, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="attention_mask has 5 columns but the cache and the input hold 8"):
        patched(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_lora_finetuning_with_gradient_checkpointing_lowers_the_loss(monkeypatch):
    peft = pytest.importorskip("peft")
    model = patched_copy(build("llama"), window=6)
    model.activation_checkpointing_enable()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    calls = []
    kernel = decoder.local_attention
    monkeypatch.setattr(decoder, "local_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids = torch.randint(3, VOCAB, (4, 16))
    mask = padding_mask("left", 4, 16)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # checkpointing recomputed each layer's attention in the backward: 2 layers x (forward + recompute)
    assert len(calls) == 6 * 2 * 2
    assert model.base_model.model.config._attn_implementation == "longreach"


def test_torch_compile_fullgraph_with_cu_seq_lens_matches_documents():
    """Under torch.compile packing is given by the cu_seq_lens kwargs (restarting position_ids are
    not read there): fullgraph=True compiles, and each document sees only itself."""
    model = patched_copy(build("mistral"))
    compiled = torch.compile(model, fullgraph=True)
    for lengths in (PACKED_LENGTHS, (3, 9, 4, 4)):
        documents = [torch.randint(3, VOCAB, (length,)) for length in lengths]
        batch = packed_batch(documents, return_flash_attn_kwargs=True)
        del batch["labels"]
        with torch.no_grad():
            expected = torch.cat([model(doc[None], use_cache=False).logits[0] for doc in documents])
            got = compiled(**batch, use_cache=False).logits[0]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
