"""Attention dropout in patched Hugging Face decoders: transformers passes
``dropout=config.attention_dropout`` in training mode (0.0 in eval) to the attention
interface, and longreach runs it as the op's dropout_p.

Truths: the eager model in eval mode; in training mode the same eager model with its attention
function replaced by the dense longreach.reference.local_attention applying the op's mask,
computed independently (longreach.dropout.keep_mask from the seed each layer draws, in order).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longreach.hf  # noqa: E402
from longreach import reference  # noqa: E402
from longreach.dropout import draw_seed, keep_mask  # noqa: E402

VOCAB = 61
P = 0.1


def build(family="llama", attention_dropout=P):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.3,
                  attention_dropout=attention_dropout)
    if family == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:  # mistral: a sliding window of 5 keys
        config, cls = transformers.MistralConfig(**common, sliding_window=5), transformers.MistralForCausalLM
    config._attn_implementation = "eager"
    return cls(config)


def _ids(seed=0, batch=2, length=12):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _step(model, ids, seed):
    """Loss and gradients of one training step with the generator at `seed`."""
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_trains_with_attention_dropout():
    model = longreach.hf.patch(build()).train()
    ids = _ids()
    loss, grads = _step(model, ids, 1)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    again, grads_again = _step(model, ids, 1)
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    other, _ = _step(model, ids, 2)
    assert other != loss
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, model.eval()(ids).logits)  # dropout acts in train mode


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_eval_equals_eager(family):
    eager = build(family).eval()
    patched = longreach.hf.patch(copy.deepcopy(eager)).eval()
    ids = _ids(length=14)
    state = torch.get_rng_state()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, eager(ids).logits, rtol=1e-5, atol=2e-5)
    assert torch.equal(torch.get_rng_state(), state)  # eval: no dropout, no random number drawn


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                         **kwargs):
    """Dense attention with the op's mask: draws its seed as the op does, one per layer call. The
    inputs are unpadded: attention_mask (transformers' dense causal one) holds nothing more."""
    assert dropout == P
    batch, heads, length, _ = query.shape
    mask = keep_mask(draw_seed(), dropout, batch, heads, length, key.shape[2])
    left = None if sliding_window is None else sliding_window - 1
    out = reference.local_attention(query, key, value, causal=True, window=(left, 0), scale=scaling,
                                    dropout_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_train_mode_equals_reference_with_the_same_masks(family):
    transformers.AttentionInterface.register("longreach_test_dropout_reference", _reference_attention)
    model = build(family).double().train()
    patched = longreach.hf.patch(copy.deepcopy(model)).train()
    model.config._attn_implementation = "longreach_test_dropout_reference"
    ids = _ids(length=14)
    outputs = []
    for m in (patched, model):
        m.zero_grad()
        torch.manual_seed(7)
        logits = m(ids, use_cache=False).logits
        (logits * torch.linspace(-1, 1, VOCAB, dtype=logits.dtype)).sum().backward()
        outputs.append((logits.detach(), [p.grad for p in m.parameters()]))
    (got, got_grads), (expected, expected_grads) = outputs
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_longreach_cache_in_training_mode_raises():
    model = longreach.hf.patch(build()).train()
    with pytest.raises(NotImplementedError, match="decode op has no dropout.*model.eval"):
        model(_ids(), past_key_values=longreach.hf.LongreachCache())
