"""examples/finetune_hf_long_context.py: the offline --tiny run works end to end, and bad flags fail."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "finetune_hf_long_context.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_hf_long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_trains_saves_and_reloads(tmp_path, capsys):
    import transformers

    import longreach.hf

    data = tmp_path / "corpus.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "model"
    load_example().main(["--tiny", "--steps", "3", "--seq-len", "128", "--window", "32", "--data", str(data),
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert "held-out loss at 128 tokens before" in printed and "after" in printed
    model = longreach.hf.patch(transformers.AutoModelForCausalLM.from_pretrained(out))
    assert model.config.longreach == {"window": 32, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert model(torch.randint(0, 256, (1, 40))).logits.shape == (1, 40, 256)


def test_tiny_run_with_shifted_chunks(tmp_path, capsys):
    """LongLoRA's S2-Attn through the example: chunks in training, saved with the model."""
    import transformers

    import longreach.hf

    data = tmp_path / "corpus.txt"
    data.write_text("def g(y):\n    return y * 2\n" * 100)
    out = tmp_path / "model"
    load_example().main(["--tiny", "--steps", "2", "--seq-len", "96", "--window", "48", "--chunk", "16",
                         "--chunk-shift", "half", "--data", str(data), "--out", str(out)])
    assert "training in chunks of 16 (shift half)" in capsys.readouterr().out
    model = longreach.hf.patch(transformers.AutoModelForCausalLM.from_pretrained(out))
    assert model.config.longreach["chunk"] == 16 and model.config.longreach["chunk_shift"] == "half"


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--window", "0"], "--window must be a positive int, got 0"),
    (["--tiny", "--factor", "-1"], "--factor must be positive"),
    (["--tiny", "--rope", "stretchy"], "invalid choice: 'stretchy'"),
    (["--steps", "3"], "one of the arguments --model --tiny is required"),
    (["--tiny", "--chunk", "0"], "--chunk must be a positive int, got 0"),
    (["--tiny", "--chunk-shift", "half"], "--chunk-shift needs --chunk"),
    (["--tiny", "--chunk", "8", "--chunk-shift", "third"], "invalid choice: 'third'"),
])
def test_bad_flags_fail_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_example().parse_args(argv)
    assert message in capsys.readouterr().err
