"""The extrapolation study's seed-paper schemes, seeds and verdicts, and long-context use:
each scheme's construction equals its paper's formula (dynamic NTK, ALiBi and ALiBi-PI, SWAT's
balanced slopes and its released code's recipe, PoSE's position ids), the verdict logic with
made-up numbers over seeds, the new flags' errors, seed determinism, the context measure.
No test asserts a research outcome."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from longreach.extrapolate import cli, report
from longreach.extrapolate.model import ModelDims, build_model, configure_for_length, model_config
from longreach.extrapolate.schemes import SCHEMES, alibi_interpolation, models_to_train
from longreach.extrapolate.train import TrainResult, evaluate, train

from test_extrapolate import TINY, tiny_text, tiny_without  # noqa: F401  (the module-scoped corpus fixture)


def _slopes(model):
    return [block.attn.alibi().tolist() for block in model.blocks]


# ------------------------------------------------------- the papers' formulas --


def test_dynamic_ntk_is_the_ntk_aware_base_at_the_input_length():
    dims = ModelDims(d_model=32, layers=1, heads=2)  # head size d = 16
    d, base, train_len = 16, 10000.0, 64
    model = build_model(SCHEMES["rope-ntk"], dims, None, train_len, seed=0)
    configure_for_length(model, SCHEMES["rope-ntk"], train_len, 4 * train_len)
    cos, _ = model.rotary.tables(4 * train_len)  # what a forward of 4 x 64 tokens uses
    # bloc97 / emozilla; YaRN paper section 3.3: base' = base * (L'/L)^(d/(d-2)) at L' = 4L.
    new_base = base * 4.0 ** (d / (d - 2))
    inv = 1.0 / new_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(cos[7].double(), torch.cos(7 * inv), atol=1e-5, rtol=0)
    # At the training length the trained tables are used as they are.
    configure_for_length(model, SCHEMES["rope-ntk"], train_len, train_len)
    plain = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(model.rotary.tables(train_len)[0][7].double(), torch.cos(7 * plain), atol=1e-5, rtol=0)
    assert models_to_train(["rope-ntk", "rope"]) == ["rope"]  # rope's weights, no fine-tuning


def test_alibi_slopes_and_alibi_pi_divides_them_by_the_length_factor():
    dims = ModelDims(d_model=32, layers=2, heads=4)
    press = [2.0 ** (-8 * h / 4) for h in range(1, 5)]  # Press et al.: 2^(-8h/H)
    model = build_model(SCHEMES["alibi-pi"], dims, None, 64, seed=0)
    assert _slopes(model) == [pytest.approx(press)] * 2
    # Al-Khateeb et al. 2023: at L' > L the slopes are divided by L'/L.
    configure_for_length(model, SCHEMES["alibi-pi"], 64, 256, dims=dims)
    assert _slopes(model) == [pytest.approx([s / 4 for s in press])] * 2
    configure_for_length(model, SCHEMES["alibi-pi"], 64, 64, dims=dims)
    assert _slopes(model) == [pytest.approx(press)] * 2
    # Plain alibi keeps its slopes at every length.
    assert alibi_interpolation(SCHEMES["alibi"], 64, 256) == 1.0
    assert alibi_interpolation(SCHEMES["alibi-pi"], 64, 256) == 4.0
    assert models_to_train(["alibi-pi"]) == ["alibi"]
    with pytest.raises(ValueError, match="divides its ALiBi slopes; pass dims"):
        configure_for_length(model, SCHEMES["alibi-pi"], 64, 256)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_swat_as_its_paper_describes_it(scale):
    dims = ModelDims(d_model=64, layers=1, heads=4, balanced_slope_scale=scale)
    config = model_config(SCHEMES["swat"], dims, 16, 64)
    assert (config.window, config.score, config.positional, config.alibi) == (16, "sigmoid", "alibi+rope", "balanced")
    # Balanced ALiBi: +S/2^k for the first H/2 heads, -S/2^k for the rest, k = 1..H/2.
    model = build_model(SCHEMES["swat"], dims, 16, 64, seed=0)
    assert _slopes(model) == [pytest.approx([scale / 2, scale / 4, -scale / 2, -scale / 4])]


def test_swat_as_its_released_code_trains_it():
    dims = ModelDims(d_model=64, layers=1, heads=4, balanced_slope_scale=0.25)  # ignored: standard slopes
    config = model_config(SCHEMES["swat-code"], dims, 16, 64)
    assert (config.window, config.score, config.positional, config.alibi) == (16, "softmax", "alibi+rope", "standard")
    model = build_model(SCHEMES["swat-code"], dims, 16, 64, seed=0)
    assert _slopes(model) == [pytest.approx([2.0 ** (-8 * h / 4) for h in range(1, 5)])]


def test_pose_trains_with_skipped_ids_and_evaluates_plainly(tiny_text, tmp_path, monkeypatch):  # noqa: F811
    """Spy on the model's forward: rope-pose's training steps get PoSE ids covering the longest
    length (Zhu et al.: chunk 0 from 0, increasing, max < target); rope's and the evaluation none."""
    from longreach.nn import LocalTransformerLM

    seen = []
    real = LocalTransformerLM.forward

    def spy(self, input_ids, *args, position_ids=None, **kwargs):
        seen.append((torch.is_grad_enabled(), self.config.positional, input_ids.shape[1],
                     None if position_ids is None else position_ids.clone()))
        return real(self, input_ids, *args, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(LocalTransformerLM, "forward", spy)
    cli.main(["--data", str(tiny_text), "--out", str(tmp_path / "o"), "--schemes", "rope,rope-pose"] + TINY)
    training = [s for s in seen if s[0]]
    assert len(training) == 2 * 4  # rope's 4 steps, then rope-pose's 4
    assert all(s[3] is None for s in training[:4])
    for _, _, length, ids in training[4:]:
        assert ids.shape == (4, 32) and length == 32
        assert (ids[:, 0] == 0).all() and (ids.diff(dim=1) >= 1).all() and int(ids.max()) <= 127
    assert any(int(s[3].max()) > 31 for s in training[4:])  # the skips reach beyond the window
    assert all(s[3] is None for s in seen if not s[0])


def test_list_schemes_names_every_paper(capsys):
    assert cli.main(["--list-schemes"]) == 0
    out = capsys.readouterr().out
    for name, scheme in SCHEMES.items():
        assert name in out and scheme.reference and scheme.reference in out
    assert out.count("arXiv:") >= len(SCHEMES)


# ------------------------------------------------------ verdicts over seeds --


def _seed(rise_alibi: float, pi_minus_rope: float) -> dict:
    return {"alibi": {64: 2.0, 128: 2.0 + rise_alibi},
            "rope": {64: 2.0, 128: 3.0},
            "rope-pi": {64: 2.0, 128: 3.0 + pi_minus_rope}}


def test_yes_only_when_the_claim_holds_for_every_seed():
    # flat (tolerance 0.05): all seeds flat -> yes; one seed not -> mixed; none -> NO.
    all_flat = [_seed(0.01, -0.5), _seed(0.03, -0.4), _seed(0.0, -0.6)]
    v = report.check("alibi", all_flat, 64)
    assert (v.agrees, v.label, v.seeds_holding) == (True, "yes", (3, 3))
    # The mean rise 0.04 is flat, but one seed rises 0.1: within the spread, not a "yes".
    mixed = [_seed(0.01, -0.5), _seed(0.01, -0.4), _seed(0.10, -0.6)]
    v = report.check("alibi", mixed, 64)
    assert (v.agrees, v.label) == (None, "mixed 2/3") and v.observed.startswith("flat: +0.040 at 2x")
    none = [_seed(0.2, 0.1), _seed(0.3, 0.2), _seed(0.1, 0.3)]
    assert report.check("alibi", none, 64).label == "NO"
    # beats: compared seed by seed (same seed = same start and batches).
    assert report.check("rope-pi", all_flat, 64).label == "yes"
    paired = [_seed(0, -0.5), _seed(0, 0.2), _seed(0, -0.3)]
    assert report.check("rope-pi", paired, 64).label == "mixed 2/3"
    assert report.check("rope-pi", none, 64).label == "NO"
    # One seed: the old verdicts; a dict is the one-seed case.
    assert report.check("alibi", [mixed[2]], 64).label == "NO"
    assert report.check("alibi", mixed[0], 64).label == "yes"


def test_table_gives_mean_and_half_range():
    runs = [_seed(0.01, -0.5), _seed(0.03, -0.4), _seed(0.0, -0.6)]
    text = report.table(runs, 64)
    # alibi at 2x: 2.01, 2.03, 2.00 -> mean 2.013, half range 0.015.
    assert "2.013 ±0.015" in text and "2.000 ±0.000" in text
    assert "(3/3 seeds)" in text
    assert "±" not in report.table(runs[:1], 64)


# ---------------------------------------------------------------- arguments --


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--seeds", "0"], r"--seeds: expected a positive integer, got 0"),
        (["--profile", "huge"], r"--profile: unknown profile 'huge'; expected one of default, full, quick"),
        (["--quick", "--profile", "full"], r"--quick is the quick profile; it contradicts --profile full"),
        (["--train-len", "512", "--eval-lengths", "256"], r"--train-len 512 is longer than the longest "
                                                         r"--eval-lengths 256"),
        (["--swat-slope-scale", "0"], r"--swat-slope-scale: expected a positive number, got 0"),
        (["--schemes", "rope,swatt"], r"--schemes: unknown scheme 'swatt'"),
    ],
)
def test_bad_study_arguments_name_the_flag(argv, match):
    with pytest.raises(cli.UsageError, match=match):
        cli.parse_args(argv)


def test_profiles():
    assert cli.parse_args(["--quick"]).seeds == 1 and cli.parse_args(["--profile", "quick"]).profile == "quick"
    full = cli.parse_args(["--profile", "full"])
    assert full.seeds == 3 and full.steps == cli.PROFILES["full"].steps
    assert {"sliding-rope", "rope-pose", "rope-pi-longlora"} <= set(full.scheme_names)
    assert cli.parse_args(["--profile", "full", "--seeds", "2", "--schemes", "alibi"]).scheme_names == ["alibi"]
    # The fine-tunes get a few percent of the training steps.
    for prof in cli.PROFILES.values():
        assert 0.01 <= prof.finetune_steps / prof.steps <= 0.1


def test_zero_finetune_steps_is_an_empty_run():
    r = train(torch.nn.Linear(1, 1), sampler=None, steps=0, lr=1e-3, progress=False)
    assert r.losses == [] and math.isnan(r.final_bpb)
    assert cli.parse_args(["--finetune-steps", "0"]).finetune_steps == 0


# ------------------------------------------------------------ reproducibility --


def _read(path: Path):
    with open(path, newline="") as f:
        return [(r["scheme"], r["seed"], r["eval_len"], r["bits_per_byte"], r["second_half_alone_bpb"])
                for r in csv.DictReader(f)]


def test_each_seed_is_a_run_of_its_own(tiny_text, tmp_path):  # noqa: F811
    """--seeds 2 --seed 3 gives exactly the numbers of the runs --seed 3 and --seed 4 (one process,
    the same threads)."""
    base = ["--data", str(tiny_text), "--schemes", "rope-ntk,alibi-pi"] + tiny_without("--seeds")

    def run(name, *extra):
        cli.main(base + ["--out", str(tmp_path / name)] + list(extra))
        return _read(tmp_path / name / "results.csv")

    both = run("both", "--seeds", "2", "--seed", "3")
    three, four = run("three", "--seeds", "1", "--seed", "3"), run("four", "--seeds", "1", "--seed", "4")
    assert sorted(both) == sorted(three + four)
    assert {r[1] for r in both} == {"3", "4"} and three != [r[:1] + ("3",) + r[2:] for r in four]
    md = (tmp_path / "both" / "results.md").read_text()
    assert "Mean over 2 seeds" in md and "Run time:" in md and "torch threads" in md


# ----------------------------------------------------------- long-context use --


class _Uniform(torch.nn.Module):
    def forward(self, ids):
        return torch.zeros(*ids.shape, 256)


class _PrefixCounts(torch.nn.Module):
    """Predicts each byte in proportion to 1 + its count so far in the input: it uses context."""

    def forward(self, ids):
        counts = torch.nn.functional.one_hot(ids, 256).cumsum(dim=1).float()
        return torch.log1p(counts)


def test_context_use_measure():
    chunks = torch.randint(0, 4, (2, 65))  # 4 distinct bytes: counts help a lot
    ctx = {}
    evaluate(_Uniform(), chunks, [16, 64], configure=lambda L: None, progress=False, context=ctx)
    assert ctx == {16: (pytest.approx(8.0), pytest.approx(8.0)), 64: (pytest.approx(8.0), pytest.approx(8.0))}
    ctx = {}
    out = evaluate(_PrefixCounts(), chunks, [16, 64], configure=lambda L: None, progress=False, context=ctx)
    for L in (16, 64):
        given, alone = ctx[L]
        assert given < alone  # the first half's counts make the second half cheaper
    # "Alone" is the model on the second halves by themselves: inputs 32..63, targets 33..64.
    alone = evaluate(_PrefixCounts(), chunks[:, 32:], [32], configure=lambda L: None, progress=False)
    assert ctx[64][1] == pytest.approx(alone[32])
    # "Given" is the full segments' losses on the second halves' bytes only.
    logits = _PrefixCounts()(chunks[:, :64])[:, 32:]
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).double(), chunks[:, 33:].reshape(-1))
    assert ctx[64][0] == pytest.approx(nats.item() / math.log(2))
    assert out[64] < out[16]
    gain = report.context_gain([{"m": ctx}], "m", 64)
    assert gain == [pytest.approx(ctx[64][0] - ctx[64][1])] and gain[0] < 0
