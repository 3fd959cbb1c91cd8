"""The extrapolation study's opt-in fine-tuning schemes, rope-pi-ft and rope-pi-longlora:
their flags and errors, the dependency on rope's trained weights, the PI factor they keep,
that LongLoRA's fine-tune really runs chunked attention (and evaluation does not), the
"near" check, and a tiny end-to-end run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from longreach.extrapolate import cli, data, finetune as finetune_mod, report
from longreach.extrapolate.schemes import DEFAULT_SCHEMES, SCHEMES, models_to_train, rope_scaling
import longreach.nn.local_attention as local_attention_module

from test_extrapolate import TINY, tiny_text  # noqa: F401  (the module-scoped corpus fixture)

FT = ["--finetune-steps", "3"]  # TINY fine-tunes at its longest length, 128 bytes: 4 x 32 / 128 = 1 sequence


def _read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------- arguments --


def test_defaults():
    # PI and YaRN as their papers apply them run by default; LongLoRA's fine-tune in the full profile.
    assert "rope-pi-ft" in DEFAULT_SCHEMES and "rope-yarn-ft" in DEFAULT_SCHEMES
    assert "rope-pi-longlora" not in DEFAULT_SCHEMES and "rope-pi-longlora" in cli.FULL_SCHEMES
    args = cli.parse_args(["--schemes", "rope-pi-ft,rope-pi-longlora"])
    assert args.finetune_len == 4096  # the longest evaluation length
    assert args.finetune_chunk == 256  # the training length
    assert args.finetune_batch_size == 1  # 16 x 256 bytes per step, as in training
    assert args.finetune_lr == pytest.approx(cli.PROFILES["default"].lr / 10)
    assert args.finetune_steps == cli.PROFILES["default"].finetune_steps
    quick = cli.parse_args(["--quick", "--finetune-len", "512", "--finetune-batch-size", "3"])
    assert (quick.finetune_len, quick.finetune_batch_size) == (512, 3)
    assert quick.finetune_steps == cli.PROFILES["quick"].finetune_steps


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--finetune-len", "256"], r"--finetune-len: expected a multiple of --train-len 256 above it, got 256"),
        (["--finetune-len", "600"], r"--finetune-len: expected a multiple of --train-len 256 above it, got 600"),
        (["--finetune-steps", "-1"], r"--finetune-steps: expected an integer >= 0, got -1"),
        (["--finetune-batch-size", "0"], r"--finetune-batch-size: expected a positive integer, got 0"),
        (["--finetune-lr", "-1"], r"--finetune-lr: expected a positive number, got -1"),
        (["--finetune-chunk", "1"], r"--finetune-chunk: expected 2 <= chunk < --finetune-len 4096 .*got 1"),
        (["--finetune-len", "512", "--finetune-chunk", "512"], r"--finetune-chunk: .*< --finetune-len 512.*got 512"),
        (["--schemes", "rope-pi-ft", "--eval-lengths", "256"],
         r"--finetune-len: the fine-tuning schemes fine-tune beyond the training length"),
    ],
)
def test_bad_finetune_arguments_name_the_flag(argv, match):
    with pytest.raises(cli.UsageError, match=match):
        cli.parse_args(argv)


def test_no_finetune_scheme_needs_no_longer_length():
    assert cli.parse_args(["--schemes", "rope", "--eval-lengths", "256"]).lengths == [256]


def test_command_line_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--finetune-chunk", "0"])
    assert e.value.code == 2
    assert "--finetune-chunk: expected 2 <= chunk" in capsys.readouterr().err


# ----------------------------------------------------------- weights, scaling --


def test_finetunes_bring_in_rope_first():
    assert models_to_train(["rope-pi-longlora"]) == ["rope", "rope-pi-longlora"]
    assert models_to_train(["rope-yarn-ft"]) == ["rope", "rope-yarn-ft"]
    assert models_to_train(["rope-pi-ft", "alibi", "rope-pi", "rope-pi-longlora"]) == [
        "rope", "rope-pi-ft", "alibi", "rope-pi-longlora"]
    assert all(SCHEMES[n].base == "rope" for n in ("rope-pi-ft", "rope-pi-longlora"))


def test_finetuned_schemes_keep_their_pi_factor():
    ft = SCHEMES["rope-pi-longlora"]
    # Fine-tuned at 4x: PI with factor 4 at every length up to 4x, the training length included.
    for L in (256, 512, 1024):
        assert rope_scaling(ft, 256, L, 1024) == {"rope_type": "linear", "factor": 4.0}
    assert rope_scaling(ft, 256, 2048, 1024) == {"rope_type": "linear", "factor": 8.0}
    with pytest.raises(ValueError, match="fine-tuned; pass finetune_len"):
        rope_scaling(ft, 256, 512)
    assert rope_scaling(SCHEMES["rope-pi"], 256, 256, 1024) is None  # unchanged for the others
    # rope-yarn-ft: YaRN (Peng et al.) at the fine-tuning factor, original length = training length.
    assert rope_scaling(SCHEMES["rope-yarn-ft"], 256, 512, 1024) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}


def test_near_check():
    bpb = {"rope-pi-ft": {64: 2.0, 128: 2.1, 256: 2.2}, "rope-pi-longlora": {64: 2.0, 128: 2.14, 256: 2.1}}
    v = report.check("rope-pi-longlora", bpb, 64)
    assert v.agrees is True and v.observed == "within 0.05 of rope-pi-ft or below it (-0.100 to +0.040)"
    bpb["rope-pi-longlora"][128] = 2.2
    assert report.check("rope-pi-longlora", bpb, 64).agrees is False
    assert report.check("rope-pi-longlora", {"rope-pi-longlora": bpb["rope-pi-longlora"]}, 64).agrees is None


def test_no_behind_note_for_finetuned_schemes():
    # A fine-tuned scheme runs PI at 1x too, so a worse 1x value is no sign of an undertrained model.
    bpb = {"rope": {64: 2.0, 128: 2.5}, "rope-pi-ft": {64: 2.4, 128: 2.3}}
    assert report.notes(bpb, 64) == []
    assert report.notes({"rope": bpb["rope"], "alibi": {64: 2.4, 128: 2.3}}, 64) != []


def test_short_training_text_names_both_lengths():
    stream = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(data.DataError, match=r"fewer than the sequence length \+ 2 = 130 \(--train-len, or "
                                             r"--finetune-len"):
        data.BatchSampler(stream, 128, 1, seed=0)


# ----------------------------------------------------------------- end to end --


def test_longlora_finetunes_chunked_and_evaluates_full(tiny_text, tmp_path, monkeypatch):  # noqa: F811
    """Spy on the op the attention layers call: training steps run under autograd, evaluation
    under no_grad, so each call says which phase it belongs to."""
    calls = []
    real = local_attention_module.local_attention

    def spy(q, k, v, **options):
        shift = options.get("chunk_shift")
        calls.append((torch.is_grad_enabled(), q.shape[2], options.get("chunk", 0),
                      None if shift is None else shift.tolist()))
        return real(q, k, v, **options)

    monkeypatch.setattr(local_attention_module, "local_attention", spy)
    out = tmp_path / "o"
    cli.main(["--data", str(tiny_text), "--out", str(out), "--schemes", "rope-pi-longlora"] + TINY + FT)
    training = [c for c in calls if c[0] and c[1] == 32]  # rope's training, at the training length
    tuning = [c for c in calls if c[0] and c[1] == 128]  # the fine-tune, at the longest length
    evaluation = [c for c in calls if not c[0]]
    assert training and tuning and evaluation
    assert len(tuning) == 3 * 1  # 3 steps x 1 layer
    assert {c[1] for c in calls if c[0]} == {32, 128}
    assert all(c[2] == 0 and c[3] is None for c in training)
    # S2-Attn: chunks of the training length, the second of the 2 heads shifted by half a chunk.
    assert all(c[2] == 32 and c[3] == [0, 16] for c in tuning)
    assert all(c[2] == 0 and c[3] is None for c in evaluation)
    # Every length, and its second halves alone for the long-context-use measure.
    assert {c[1] for c in evaluation} == {16, 32, 64, 128}


def test_both_finetunes_start_from_rope_with_one_budget(tiny_text, tmp_path, monkeypatch, capsys):  # noqa: F811
    seen = {}
    real_train = finetune_mod.train
    real_finetune = finetune_mod.finetune

    def spy_finetune(scheme, base_state, *args, **kwargs):
        seen[scheme.name] = {"base": {k: v.clone() for k, v in base_state.items()}}
        return real_finetune(scheme, base_state, *args, **kwargs)

    def spy_train(model, sampler, steps, lr, *args, desc="", **kwargs):
        name = desc.split()[-1]
        seen[name].update(generator=sampler.generator.get_state(), length=sampler.length,
                          batch=sampler.batch_size, steps=steps, lr=lr, muon_lr=kwargs.get("muon_lr"),
                          start={k: v.clone() for k, v in model.state_dict().items()})
        return real_train(model, sampler, steps, lr, *args, desc=desc, **kwargs)

    monkeypatch.setattr(cli, "finetune", spy_finetune)
    monkeypatch.setattr(finetune_mod, "train", spy_train)
    out = tmp_path / "o"
    names = "rope,rope-pi,rope-pi-ft,rope-pi-longlora"
    cli.main(["--data", str(tiny_text), "--out", str(out), "--schemes", names] + TINY + FT)

    ft, ll = seen["rope-pi-ft"], seen["rope-pi-longlora"]
    for key in ("base", "start"):  # the same rope weights given, and loaded before fine-tuning
        assert ft[key].keys() == ll[key].keys()
        assert all(torch.equal(ft[key][k], ll[key][k]) for k in ft[key])
        assert all(torch.equal(ft["base"][k], ft[key][k]) for k in ft[key])
    assert torch.equal(ft["generator"], ll["generator"])  # the same batches
    assert (ft["length"], ft["batch"], ft["steps"], ft["lr"]) == (ll["length"], ll["batch"], ll["steps"], ll["lr"])
    assert (ft["length"], ft["batch"], ft["steps"]) == (128, 1, 3)
    # Muon's peak falls by the same factor as AdamW's (default: a tenth).
    prof = cli.PROFILES["default"]
    assert ft["muon_lr"] == ll["muon_lr"] == pytest.approx(prof.muon_lr * ft["lr"] / prof.lr)
    assert ft["lr"] == pytest.approx(prof.lr / 10)

    rows = _read_csv(out / "results.csv")
    assert [r["scheme"] for r in rows[::3]] == names.split(",")
    assert {r["weights"] for r in rows if r["scheme"].startswith("rope-pi-")} == {"rope-pi-ft", "rope-pi-longlora"}
    at = {(r["scheme"], int(r["eval_len"])): float(r["bits_per_byte"]) for r in rows}
    # Three different models at the longest length (the fine-tunes moved the weights, differently).
    assert len({at[("rope-pi", 128)], at[("rope-pi-ft", 128)], at[("rope-pi-longlora", 128)]}) == 3
    assert all(0.0 < v < 16.0 for v in at.values())
    md = (out / "results.md").read_text()
    assert "Fine-tuning cost" in md and "rope-pi-longlora" in md and "bytes/s" in md
    assert "S2-Attn chunk 32" in md
    stdout = capsys.readouterr().out
    assert "fine-tuning cost (seed 0): rope-pi-ft" in stdout
