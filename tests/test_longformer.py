"""longreach's Longformer self-attention against Hugging Face's own code.

Tiny Longformer models are built from configs with random weights (no
download). The truth is the same model before `longreach.hf.patch`: hidden
states, attention probabilities, losses and every parameter's gradient must
agree. Hugging Face computes its softmax in float32 even for float64 models,
so float64 runs agree to float32 rounding (~1e-7 relative): tolerances of
1e-6 there, while a semantic difference (a key too many or too few) moves
outputs by ~1e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerForMultipleChoice,
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    LongformerForTokenClassification,
    LongformerModel,
)
from transformers.models.longformer import modeling_longformer as hf_longformer  # noqa: E402

import longreach.hf  # noqa: E402
from longreach import reference  # noqa: E402
from longreach.hf.longformer import patch_longformer  # noqa: E402
from longreach.nn import LongformerSelfAttention  # noqa: E402

VOCAB = 50


def tiny_config(attention_window=4, layers=2, **overrides) -> LongformerConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=48, attention_window=attention_window, max_position_embeddings=160,
                    attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, pad_token_id=1)
    settings.update(overrides)
    return LongformerConfig(**settings)


def original_and_patched(model_class, config, dtype=torch.float32):
    torch.manual_seed(0)
    original = model_class(config).to(dtype).eval()
    patched = longreach.hf.patch(copy.deepcopy(original))
    return original, patched


def make_batch(length, batch=2, padding="none", global_tokens="none", seed=0):
    """input_ids, attention_mask, global_attention_mask (or None) for a few padding/global layouts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding == "right":  # element 1 shorter: a padded tail, as a tokenizer pads a batch
        mask[1, length - length // 3:] = 0
    elif padding == "left":
        mask[0, : length // 4] = 0
    elif padding == "holes":  # padding in the middle too (not contiguous)
        mask[0, 3:5] = 0
        mask[1, length - 4:] = 0
        mask[1, length // 2] = 0
    ids = ids.masked_fill(mask == 0, 1)
    global_mask = None
    if global_tokens != "none":
        global_mask = torch.zeros(batch, length, dtype=torch.long)
        global_mask[:, 0] = 1  # <s>: the classification token
        if global_tokens == "several":  # inside and far outside other rows' windows, different counts per element
            global_mask[0, [2, length // 2, length - 1]] = 1
            global_mask[1, [5]] = 1
        if global_tokens == "on_padding":  # global marks on padded positions: HF's merge makes them padding
            global_mask[:, -2:] = 1
    return ids, mask, global_mask


def filler_slots(mask, global_mask):
    """(B, G) True at global-token slots past an element's own count (its padding marks no global token)."""
    counts = ((global_mask == 1) & (mask == 1)).sum(dim=1)
    return torch.arange(int(counts.max()))[None, :] >= counts[:, None]


def assert_float64_global_probs_close(got, want, filler):
    """In float64, HF's float32 softmax of finfo(float64).min rows gives NaN at the filler slots (uniform rows
    in float32, which is what longreach returns and the float32 test checks); elsewhere the values agree."""
    filler = filler.expand(want.shape)
    assert torch.equal(want.isnan(), filler)
    torch.testing.assert_close(got[~filler], want[~filler], atol=1e-6, rtol=1e-6)


def assert_outputs_close(got, want, atol, rtol, what):
    if want is None:
        assert got is None, what
        return
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_outputs_close(g, w, atol, rtol, f"{what}[{i}]")
        return
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------ structure --

@pytest.mark.parametrize("model_class", [LongformerModel, LongformerForMaskedLM, LongformerForSequenceClassification,
                                         LongformerForTokenClassification, LongformerForQuestionAnswering,
                                         LongformerForMultipleChoice])
def test_patch_swaps_every_self_attention_and_keeps_the_weights(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config(attention_window=[2, 6, 4], layers=3))
    before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    assert longreach.hf.patch(model) is model
    attention = [m for m in model.modules() if isinstance(m, hf_longformer.LongformerSelfAttention)]
    ours = [m for m in model.modules() if isinstance(m, LongformerSelfAttention)]
    assert attention == [] and len(ours) == 3
    assert [m.one_sided_attn_window_size for m in ours] == [1, 3, 2]  # per-layer windows
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)  # the same Parameter objects, not copies
    assert list(model.state_dict()) == keys_before


def test_patching_twice_is_harmless():
    original, patched = original_and_patched(LongformerModel, tiny_config())
    modules = [m for m in patched.modules() if isinstance(m, LongformerSelfAttention)]
    longreach.hf.patch(patched)
    assert [m for m in patched.modules() if isinstance(m, LongformerSelfAttention)] == modules


# ------------------------------------------------------- outputs vs Hugging Face --

FORWARD_CASES = [
    # attention_window, layers, length, padding, global tokens
    (4, 2, 16, "none", "none"),        # length a multiple of the window
    (4, 2, 21, "none", "none"),        # not a multiple: HF pads internally
    (4, 2, 21, "right", "none"),
    (4, 2, 24, "left", "cls"),
    (6, 2, 30, "holes", "several"),
    ([4, 8, 4], 3, 19, "right", "several"),  # a different window per layer
    ([12, 4], 2, 40, "none", "several"),
    (4, 2, 13, "right", "on_padding"),
    (4, 2, 9, "holes", "cls"),
]
# Hugging Face's chunked code fails for attention_window=2 (an empty slice at window_overlap=1) and when a
# layer's window does not divide the largest one (it pads to the largest only), so the cases avoid both;
# longreach's module has neither limit (see test_module_needs_no_padding_to_a_window_multiple).


@pytest.mark.parametrize("window,layers,length,padding,global_tokens", FORWARD_CASES)
def test_hidden_states_and_attentions_match_hugging_face(window, layers, length, padding, global_tokens):
    original, patched = original_and_patched(LongformerModel, tiny_config(window, layers), dtype=torch.float64)
    ids, mask, global_mask = make_batch(length, padding=padding, global_tokens=global_tokens)
    kwargs = dict(attention_mask=mask, global_attention_mask=global_mask, output_hidden_states=True,
                  output_attentions=True)
    want, got = original(ids, **kwargs), patched(ids, **kwargs)
    for field in ("last_hidden_state", "pooler_output", "hidden_states", "attentions"):
        assert_outputs_close(getattr(got, field), getattr(want, field), 1e-6, 1e-6, field)
    if want.global_attentions is not None:
        filler = filler_slots(mask, global_mask)[:, None, None, :]  # (B, 1, 1, G) for the (B, H, L, G) layout
        for g, w in zip(got.global_attentions, want.global_attentions):
            assert_float64_global_probs_close(g, w, filler)


@pytest.mark.parametrize("window,layers,length,padding,global_tokens", FORWARD_CASES[1::2])
def test_float32_hidden_states_match_hugging_face(window, layers, length, padding, global_tokens):
    original, patched = original_and_patched(LongformerModel, tiny_config(window, layers))
    ids, mask, global_mask = make_batch(length, padding=padding, global_tokens=global_tokens)
    kwargs = dict(attention_mask=mask, global_attention_mask=global_mask, output_attentions=True)
    want, got = original(ids, **kwargs), patched(ids, **kwargs)
    for field in ("last_hidden_state", "attentions", "global_attentions"):
        assert_outputs_close(getattr(got, field), getattr(want, field), 2e-5, 2e-5, field)


def parameter_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("window,length,padding,global_tokens", [
    (4, 20, "none", "none"),
    (4, 21, "right", "several"),
    ([4, 8], 26, "holes", "cls"),
    ([8, 4], 17, "left", "several"),
])
def test_masked_lm_loss_and_all_gradients_match(window, length, padding, global_tokens):
    original, patched = original_and_patched(LongformerForMaskedLM, tiny_config(window))
    for model in (original, patched):
        model.train()  # dropout probabilities are 0, so train mode is deterministic
    ids, mask, global_mask = make_batch(length, padding=padding, global_tokens=global_tokens)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.7, -100)
    losses, grads = [], []
    for model in (original, patched):
        loss = model(ids, attention_mask=mask, global_attention_mask=global_mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(parameter_grads(model))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[1].keys() == grads[0].keys()
    assert any("query_global" in name for name in grads[0]) == (global_tokens != "none")
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sequence_classification_loss_and_gradients_match():
    """The classification head puts global attention on <s> by itself when no global mask is given."""
    original, patched = original_and_patched(LongformerForSequenceClassification,
                                             tiny_config([4, 8], num_labels=3), dtype=torch.float64)
    ids, mask, _ = make_batch(23, padding="right")
    labels = torch.tensor([0, 2])
    losses = []
    for model in (original, patched):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    want, got = parameter_grads(original), parameter_grads(patched)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gradient_checkpointing_gives_the_same_gradients():
    original, patched = original_and_patched(LongformerForMaskedLM, tiny_config([4, 8]))
    ids, mask, global_mask = make_batch(21, padding="right", global_tokens="several")
    grads = []
    for model in (original, patched):
        model.train()
        model.gradient_checkpointing_enable()
        model(ids, attention_mask=mask, global_attention_mask=global_mask, labels=ids).loss.backward()
        grads.append(parameter_grads(model))
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_bfloat16_error_at_most_twice_hugging_faces():
    """Against the float32 model, the patched bfloat16 model errs no more than 2x unpatched bfloat16."""
    ids, mask, global_mask = make_batch(21, padding="right", global_tokens="several")
    run = lambda m: m(ids, attention_mask=mask, global_attention_mask=global_mask).last_hidden_state.float()
    truth = run(original_and_patched(LongformerModel, tiny_config([4, 8]))[0])
    original, patched = original_and_patched(LongformerModel, tiny_config([4, 8]), dtype=torch.bfloat16)
    hf_error = (run(original) - truth).abs().max()
    assert (run(patched) - truth).abs().max() <= 2 * hf_error


def test_save_pretrained_round_trip(tmp_path):
    original, patched = original_and_patched(LongformerForMaskedLM, tiny_config([4, 6]))
    ids, mask, global_mask = make_batch(22, padding="right", global_tokens="several")
    run = lambda m: m(ids, attention_mask=mask, global_attention_mask=global_mask).logits
    expected = run(patched)
    patched.save_pretrained(tmp_path)

    plain = LongformerForMaskedLM.from_pretrained(tmp_path).eval()  # the checkpoint is plain transformers
    assert not any(isinstance(m, LongformerSelfAttention) for m in plain.modules())
    assert plain.state_dict().keys() == original.state_dict().keys()
    torch.testing.assert_close(run(plain), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(run(original), expected, atol=2e-5, rtol=2e-5)

    repatched = longreach.hf.patch(LongformerForMaskedLM.from_pretrained(tmp_path).eval())
    torch.testing.assert_close(run(repatched), expected, atol=0, rtol=0)


# ----------------------------------------------------------- the module alone --

def hf_and_ours(config, layer_id=0, dtype=torch.float64):
    torch.manual_seed(0)
    if isinstance(config.attention_window, int):  # HF's module reads config.attention_window[layer_id]
        config.attention_window = [config.attention_window] * config.num_hidden_layers
    hf = hf_longformer.LongformerSelfAttention(config, layer_id).to(dtype).eval()
    ours = LongformerSelfAttention(config, layer_id).to(dtype).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def hf_mask(padded, global_tokens, big):
    """HF's encoder-level mask: -big padding, 0 local, +big global."""
    mask = torch.zeros(padded.shape, dtype=torch.float64)
    return mask.masked_fill(padded, -big).masked_fill(global_tokens, big)


@pytest.mark.parametrize("big", [10000.0, torch.finfo(torch.float64).max], ids=["pm10000", "finfo"])
def test_module_matches_hf_module_with_either_mask_convention(big):
    hf, ours = hf_and_ours(tiny_config(attention_window=6))
    length = 24
    hidden = torch.randn(2, length, 32, dtype=torch.float64)
    padded = torch.zeros(2, length, dtype=torch.bool)
    padded[1, 17:] = True
    global_tokens = torch.zeros(2, length, dtype=torch.bool)
    global_tokens[0, [0, 10]] = True
    global_tokens[1, 4] = True
    mask = hf_mask(padded, global_tokens, big)
    want = hf(hidden, attention_mask=mask, is_index_masked=padded, is_index_global_attn=global_tokens,
              is_global_attn=True, output_attentions=True)
    for got in (ours(hidden, attention_mask=mask, is_index_masked=padded, is_index_global_attn=global_tokens,
                     is_global_attn=True, output_attentions=True),
                ours(hidden, attention_mask=mask, output_attentions=True)):  # the bool masks derived from the mask
        assert len(got) == len(want) == 3
        assert_outputs_close(got[:2], want[:2], 1e-6, 1e-6, "outputs")
        filler = torch.tensor([[False, False], [False, True]])[:, None, :, None]  # (B, 1, G, 1): (B, H, G, L)
        assert_float64_global_probs_close(got[2], want[2], filler)


def test_module_needs_no_padding_to_a_window_multiple():
    """HF's chunked code needs L % attention_window == 0; the op does not. Padding the input and masking
    the pad must give the same rows as the unpadded input."""
    hf, ours = hf_and_ours(tiny_config(attention_window=8))
    length, padded_length = 19, 24
    hidden = torch.randn(1, padded_length, 32, dtype=torch.float64)
    padded = torch.zeros(1, padded_length, dtype=torch.bool)
    padded[:, length:] = True
    global_tokens = torch.zeros_like(padded)
    global_tokens[0, [1, 15]] = True
    mask = hf_mask(padded, global_tokens, 10000.0)
    want = hf(hidden, attention_mask=mask, is_index_masked=padded, is_index_global_attn=global_tokens,
              is_global_attn=True)[0][:, :length]
    got = ours(hidden[:, :length], attention_mask=mask[:, :length])[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_dilated_module_matches_the_dense_reference():
    """dilation != 1 has no HF counterpart: the truth is the dense oracle plus a dense global-row softmax."""
    config = tiny_config(attention_window=4)
    torch.manual_seed(0)
    module = LongformerSelfAttention(config, 0, dilation=3).double().eval()
    hidden = torch.randn(2, 30, 32, dtype=torch.float64)
    global_tokens = torch.zeros(2, 30, dtype=torch.bool)
    global_tokens[0, [0, 20]] = True
    global_tokens[1, 7] = True
    got = module(hidden, attention_mask=hf_mask(torch.zeros_like(global_tokens), global_tokens, 10000.0))[0]

    heads = lambda x: x.view(2, 30, 4, 8).transpose(1, 2)
    q, k, v = heads(module.query(hidden)), heads(module.key(hidden)), heads(module.value(hidden))
    local = reference.local_attention(q, k, v, window=(2, 2), dilation=3, global_mask=global_tokens)
    qg, kg, vg = heads(module.query_global(hidden)), heads(module.key_global(hidden)), heads(module.value_global(hidden))
    full = torch.softmax(qg @ kg.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ vg
    want = torch.where(global_tokens[:, None, :, None], full, local).transpose(1, 2).reshape(2, 30, 32)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    # and dilation really changes the result (the test could fail)
    module.dilation = 1
    assert not torch.allclose(module(hidden, attention_mask=hf_mask(torch.zeros_like(global_tokens),
                                                                    global_tokens, 10000.0))[0], want)


def test_patched_model_trains_with_attention_dropout():
    """HF's default attention_probs_dropout_prob=0.1 in train mode: the op's dropout, Trainer-like
    steps (AdamW, zero_grad, backward, step) with global tokens and padding."""
    _, patched = original_and_patched(LongformerForMaskedLM, tiny_config(attention_probs_dropout_prob=0.1))
    ids, mask, global_mask = make_batch(16, padding="right", global_tokens="first")
    patched.eval()
    eval_loss = patched(ids, attention_mask=mask, global_attention_mask=global_mask, labels=ids).loss
    patched.train()
    torch.manual_seed(3)
    first = patched(ids, attention_mask=mask, global_attention_mask=global_mask, labels=ids).loss
    torch.manual_seed(3)
    again = patched(ids, attention_mask=mask, global_attention_mask=global_mask, labels=ids).loss
    assert first == again  # the same generator state gives the same masks
    assert first != eval_loss  # dropout is applied in training
    optimizer = torch.optim.AdamW(patched.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in patched.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        loss = patched(ids, attention_mask=mask, global_attention_mask=global_mask, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, patched.parameters()))
    # attention_dropout=0.0 turns it off: train mode is then deterministic and equals eval mode
    longreach.hf.patch(patched, attention_dropout=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids, attention_mask=mask).logits, patched.eval()(ids, attention_mask=mask).logits)


# ----------------------------------------------------------------- bad input --

@pytest.mark.parametrize("window", [3, 0, -2, [4, 5]], ids=["odd", "zero", "negative", "odd_in_list"])
def test_bad_attention_window_raises(window):
    config = tiny_config(attention_window=4)
    config.attention_window = window  # HF asserts in LongformerModel; the module must check on its own
    layer = 1 if isinstance(window, list) else 0
    with pytest.raises(ValueError, match=rf"attention_window for layer {layer} must be a positive even int.*got "):
        LongformerSelfAttention(config, layer)


def test_bad_dilation_raises():
    _, patched = original_and_patched(LongformerModel, tiny_config())
    with pytest.raises(ValueError, match=r"dilation for layer 0 must be an int >= 1, got 0"):
        longreach.hf.patch(patched, dilation=0)
    with pytest.raises(ValueError, match=r"dilation for layer 0 must be an int >= 1, got 0"):
        LongformerSelfAttention(tiny_config(), 0, dilation=0)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 16, dtype=torch.long), r"is_index_global_attn must be a bool tensor of shape \(batch, seq_len\) "
                                           r"= \(2, 16\), got torch.int64 tensor of shape \(2, 16\)"),
    (torch.zeros(2, 15, dtype=torch.bool), r"is_index_global_attn must be a bool tensor .* got torch.bool tensor "
                                           r"of shape \(2, 15\)"),
    (torch.zeros(16, dtype=torch.bool), r"is_index_global_attn must be a bool tensor .* shape \(16,\)"),
], ids=["long", "short", "1d"])
def test_bad_global_mask_raises(bad, match):
    _, ours = hf_and_ours(tiny_config())
    hidden = torch.randn(2, 16, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        ours(hidden, is_index_global_attn=bad)


def test_bad_attention_mask_shape_raises():
    _, ours = hf_and_ours(tiny_config())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seq_len\) = \(2, 16\), got \(2, 1, 1, 16\)"):
        ours(torch.randn(2, 16, 32, dtype=torch.float64), attention_mask=torch.zeros(2, 1, 1, 16))


def test_padded_and_global_at_once_raises():
    _, ours = hf_and_ours(tiny_config())
    both = torch.zeros(1, 16, dtype=torch.bool)
    both[0, 3] = True
    with pytest.raises(ValueError, match="marked both padded"):
        ours(torch.randn(1, 16, 32, dtype=torch.float64), is_index_masked=both, is_index_global_attn=both)


def test_not_a_longformer_raises():
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=48))
    with pytest.raises(TypeError, match=r"expected a transformers Longformer model .* got BertModel"):
        patch_longformer(bert)
    with pytest.raises(TypeError, match=r"expected a transformers Longformer model .* got Linear"):
        patch_longformer(torch.nn.Linear(2, 2))
