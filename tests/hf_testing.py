"""Helpers shared by the Hugging Face generation tests (test_hf_decoders.py, test_hf_generate.py)."""

from __future__ import annotations

import torch


def left_padded(pads, length):
    """An attention mask whose row i starts with pads[i] padding tokens."""
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, count in enumerate(pads):
        mask[row, :count] = 0
    return mask


def assert_same_generation(got, expected, atol=2e-5):
    """Greedy generate() outputs (return_dict_in_generate, output_logits): the same tokens and,
    step by step, the same logits."""
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits)
    for step, (step_got, step_expected) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(step_got, step_expected, atol=atol, rtol=1e-5, msg=f"step {step}")
