"""`python -m longreach extrapolate`: arguments and errors, data split, eval-time RoPE
scaling, the paper checks, bits per byte, and small end-to-end runs (CSV, PNG, determinism)."""

from __future__ import annotations

import csv
import math
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from longreach.__main__ import main as longreach_main
from longreach.extrapolate import cli, data, report
from longreach.extrapolate.model import ModelDims, build_model, configure_for_length, model_config
from longreach.nn import LocalTransformerConfig
from longreach.extrapolate.schemes import DEFAULT_SCHEMES, SCHEMES, models_to_train, parse_scheme_list, rope_scaling
from longreach.extrapolate.train import evaluate

# A run small enough for a test: 64-byte windows, tiny model, a few steps, in this process (the
# tests that spy on the model need that; test_extrapolate_workers.py runs worker processes).
TINY = ["--train-len", "32", "--eval-lengths", "32,64,128", "--window", "8", "--steps", "4",
        "--batch-size", "4", "--d-model", "16", "--heads", "2", "--layers", "1", "--eval-chunks", "2",
        "--no-progress", "--seeds", "1", "--workers", "1"]


def tiny_without(*flags: str) -> list:
    """TINY without the given flags and their values (for a test that sets them itself)."""
    out, skip = [], False
    for i, arg in enumerate(TINY):
        if skip:
            skip = False
        elif arg in flags:
            skip = i + 1 < len(TINY) and not TINY[i + 1].startswith("--")
        else:
            out.append(arg)
    return out


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """About 40 kB of real text: a few standard-library modules in one file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_bytes() for name in ("textwrap.py", "string.py", "bisect.py")]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_bytes(b"\n".join(parts)[:40000])
    return path


# ----------------------------------------------------------------- arguments --


def test_defaults():
    args = cli.parse_args([])
    assert args.scheme_names == DEFAULT_SCHEMES == ["rope", "rope-pi", "rope-yarn", "rope-ntk", "rope-pi-ft",
                                                    "rope-yarn-ft", "alibi", "alibi-pi", "swat", "swat-code"]
    assert args.seeds == 3 and args.profile == "default"
    assert args.train_len == 256
    assert args.lengths == [256, 512, 1024, 2048, 4096]
    assert args.window == 128
    assert args.steps == cli.PROFILES["default"].steps


def test_quick_profile_and_explicit_flags_win():
    args = cli.parse_args(["--quick", "--steps", "7"])
    assert args.steps == 7
    assert args.d_model == cli.PROFILES["quick"].d_model
    assert args.eval_chunks == cli.PROFILES["quick"].eval_chunks


def test_scheme_selection_keeps_order_and_shares_weights():
    assert parse_scheme_list("swat, rope-yarn") == ["swat", "rope-yarn"]
    # PI and YaRN are evaluations of plain RoPE's trained weights.
    assert models_to_train(["rope-pi", "rope-yarn", "alibi"]) == ["rope", "alibi"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--schemes", "rope,nope"], r"--schemes: unknown scheme 'nope'; expected some of rope, rope-pi"),
        (["--schemes", "rope,rope"], r"--schemes: 'rope' is listed twice"),
        (["--schemes", ","], r"--schemes: expected a comma-separated list"),
        (["--eval-lengths", "256,300"], r"--eval-lengths: 300 is not a multiple of --train-len 256"),
        (["--eval-lengths", "512,1024"], r"--eval-lengths: must include the training length 256"),
        (["--eval-lengths", "256,768,1024"], r"the longest length 1024 must be a multiple of every length.*768"),
        (["--eval-lengths", "256,x"], r"--eval-lengths: expected comma-separated positive integers, got '256,x'"),
        (["--eval-lengths", "0,256"], r"--eval-lengths: expected comma-separated positive integers"),
        (["--window", "256"], r"--window: expected 1 <= window < --train-len 256.*got 256"),
        (["--window", "0"], r"--window: .*got 0"),
        (["--train-len", "1"], r"--train-len: expected at least 2 bytes, got 1"),
        (["--steps", "0"], r"--steps: expected a positive integer, got 0"),
        (["--eval-chunks", "-1"], r"--eval-chunks: expected a positive integer, got -1"),
        (["--lr", "0"], r"--lr: expected a positive number, got 0"),
        (["--muon-lr", "-0.1"], r"--muon-lr: expected a positive number, got -0.1"),
        (["--d-model", "30", "--heads", "4"], r"--d-model 30 is not divisible by --heads 4"),
        (["--d-model", "12", "--heads", "4"], r"RoPE needs an even head size"),
        (["--heads", "3", "--d-model", "96"], r"--heads: SWAT's balanced ALiBi .* even number, got 3"),
        (["--data", "/no/such/corpus"], r"--data: '/no/such/corpus' does not exist"),
    ],
)
def test_bad_arguments_name_the_flag(argv, match):
    with pytest.raises(cli.UsageError, match=match):
        cli.parse_args(argv)


def test_odd_heads_fine_without_swat():
    args = cli.parse_args(["--heads", "3", "--d-model", "96", "--schemes", "alibi,rope"])
    assert args.heads == 3


def test_unreadable_data_path(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who can read any file (root)")
        with pytest.raises(cli.UsageError, match=r"--data: '.*secret.txt' is not readable"):
            cli.parse_args(["--data", str(path)])
    finally:
        path.chmod(0o600)


def test_out_must_be_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(cli.UsageError, match=r"--out: '.*file' exists and is not a folder"):
        cli.parse_args(["--out", str(f)])


def test_command_line_errors_exit_2_with_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        longreach_main(["extrapolate", "--schemes", "bogus"])
    assert e.value.code == 2
    assert "--schemes: unknown scheme 'bogus'" in capsys.readouterr().err
    # Data problems found while loading (not at parse time) exit the same way.
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        longreach_main(["extrapolate", "--data", str(empty), "--out", str(tmp_path / "o")] + TINY)
    assert e.value.code == 2
    assert f"--data: file {str(empty)!r} is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        longreach_main(["extrapolate", "--steps", "many"])
    assert e.value.code == 2
    assert "--steps: invalid int value: 'many'" in capsys.readouterr().err


def test_list_schemes(capsys):
    assert longreach_main(["extrapolate", "--list-schemes"]) == 0
    out = capsys.readouterr().out
    for name in SCHEMES:
        assert name in out


# ---------------------------------------------------------------------- data --


def test_split_is_by_name_and_deterministic():
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    held = [n for n in names if data.is_held_out(n)]
    assert held == [n for n in names if data.is_held_out(n)]
    assert 0.07 < len(held) / len(names) < 0.13  # about 1 in HELD_OUT_EVERY


def test_stdlib_corpus_has_long_held_out_documents():
    corpus = data.load_corpus(None)
    assert corpus.train and corpus.held_out
    assert not {d.name for d in corpus.train} & {d.name for d in corpus.held_out}
    assert all(data.is_held_out(d.name) for d in corpus.held_out)
    assert not any("site-packages" in d.name for d in corpus.train + corpus.held_out)
    # The default evaluation (8 chunks of 16 x 256 bytes) fits with room to spare.
    assert sum(len(d.data) > 4097 for d in corpus.held_out) >= 16


def test_single_file_holds_out_its_end(tiny_text):
    corpus = data.load_corpus(str(tiny_text))
    raw = tiny_text.read_bytes()
    assert corpus.train[0].data + corpus.held_out[0].data == raw
    assert len(corpus.held_out[0].data) == len(raw) // data.HELD_OUT_EVERY


def test_folder_corpus_and_its_errors(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    with pytest.raises(data.DataError, match=r"--data: folder .* holds no readable text files"):
        data.load_corpus(str(folder))
    (folder / "one.txt").write_text("hello")
    (folder / "image.bin").write_bytes(b"\x89PNG\x00\x00")
    with pytest.raises(data.DataError, match=r"1 text files, too few to split"):
        data.load_corpus(str(folder))
    for i in range(40):
        (folder / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    corpus = data.load_corpus(str(folder))
    names = {d.name for d in corpus.train + corpus.held_out}
    assert "image.bin" not in names and len(names) == 41
    assert corpus.held_out and corpus.train


def test_binary_file_rejected(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc\x00def")
    with pytest.raises(data.DataError, match=r"does not look like text"):
        data.load_corpus(str(path))


def test_every_length_scores_the_same_bytes(tiny_text):
    corpus = data.load_corpus(str(tiny_text))
    chunks = data.evaluation_chunks(corpus, 128, 3)
    assert chunks.shape == (3, 129)
    for length in (32, 64, 128):
        inputs, targets = data.segments(chunks, length)
        assert inputs.shape == (3 * 128 // length, length)
        # Targets are the chunks' bytes 1..128 in order, inputs the bytes 0..127.
        assert torch.equal(targets.reshape(3, 128), chunks[:, 1:])
        assert torch.equal(inputs.reshape(3, 128), chunks[:, :-1])


def test_too_little_held_out_text(tiny_text):
    corpus = data.load_corpus(str(tiny_text))
    with pytest.raises(data.DataError, match=r"held-out text gives only \d+ chunk\(s\) of 4097 bytes"):
        data.evaluation_chunks(corpus, 4096, 8)


def test_batches_follow_the_seed():
    stream = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    a = data.BatchSampler(stream, 16, 4, seed=3).next()
    b = data.BatchSampler(stream, 16, 4, seed=3).next()
    c = data.BatchSampler(stream, 16, 4, seed=4).next()
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are the inputs shifted by one


# ------------------------------------------------------------ eval-time RoPE --


def test_rope_scaling_per_length():
    assert rope_scaling(SCHEMES["rope"], 256, 1024) is None
    assert rope_scaling(SCHEMES["rope-pi"], 256, 256) is None  # trained model as is at 1x
    assert rope_scaling(SCHEMES["rope-pi"], 256, 1024) == {"rope_type": "linear", "factor": 4.0}
    assert rope_scaling(SCHEMES["rope-yarn"], 256, 2048) == {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256}
    assert rope_scaling(SCHEMES["alibi"], 256, 2048) is None


def test_configured_rotary_tables():
    dims = ModelDims(d_model=32, layers=1, heads=2)
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    model = build_model(SCHEMES["rope-pi"], dims, None, 64, seed=0)
    configure_for_length(model, SCHEMES["rope-pi"], 64, 256)
    # PI at 4x: positions divided by 4, i.e. every frequency divided by 4.
    torch.testing.assert_close(model.rotary.cos[5].double(), torch.cos(5 * plain / 4), atol=1e-6, rtol=0)
    configure_for_length(model, SCHEMES["rope-yarn"], 64, 256)
    # YaRN's attention temperature: cos and sin scaled by 0.1 ln(s) + 1 (Peng et al., eq. 22).
    assert model.rotary.cos[0, 0].item() == pytest.approx(0.1 * math.log(4) + 1)
    # The highest frequency (many rotations within 64 positions) is kept, the lowest interpolated.
    af = 0.1 * math.log(4) + 1
    assert model.rotary.cos[5, 0].item() == pytest.approx(af * math.cos(5 * plain[0].item()), abs=1e-6)
    assert model.rotary.cos[5, -1].item() == pytest.approx(af * math.cos(5 * plain[-1].item() / 4), abs=1e-6)


def test_scheme_configurations():
    dims = ModelDims(d_model=64, layers=2, heads=4)
    common = dict(d_model=64, n_layers=2, n_heads=4, max_position_embeddings=256, init_std=dims.init_std)
    # SWAT is exactly the module's own SWAT preset.
    assert model_config(SCHEMES["swat"], dims, 128, 256) == LocalTransformerConfig.swat(128, **common)
    assert model_config(SCHEMES["sliding-rope"], dims, 128, 256) == LocalTransformerConfig(window=128, **common)
    assert model_config(SCHEMES["rope"], dims, 128, 256) == LocalTransformerConfig(window=None, **common)
    alibi = model_config(SCHEMES["alibi"], dims, 128, 256)
    assert (alibi.positional, alibi.alibi, alibi.window, alibi.score) == ("alibi", "standard", None, "softmax")
    # The same seed gives schemes with the same parameter shapes the same initial weights.
    a = build_model(SCHEMES["rope"], dims, 128, 256, seed=5)
    b = build_model(SCHEMES["swat"], dims, 128, 256, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------- paper checks --


def test_paper_checks_on_known_curves():
    bpb = {
        "rope": {64: 2.0, 128: 2.5, 256: 4.0},
        "rope-pi": {64: 2.0, 128: 2.2, 256: 2.6},
        "rope-yarn": {64: 2.0, 128: 2.21, 256: 2.5},
        "alibi": {64: 2.0, 128: 1.96, 256: 1.9},
        "sliding-rope": {64: 2.0, 128: 2.04, 256: 2.03},
        "swat": {64: 2.0, 128: 2.3, 256: 2.02},
    }
    v = {name: report.check(name, bpb, 64) for name in bpb}
    assert v["rope"].agrees is True and v["rope"].observed == "worse: +2.000 at 4x"
    assert v["rope-pi"].agrees is True
    assert v["rope-yarn"].agrees is False  # at 2x it is 0.01 above PI: not clearly better
    assert v["alibi"].agrees is True and v["alibi"].observed.startswith("improves")
    assert v["sliding-rope"].agrees is True and v["sliding-rope"].observed.startswith("flat")
    assert v["swat"].agrees is False and v["swat"].observed == "worse: +0.300 at 2x"
    # A comparison whose partner was not run is not judged.
    assert report.check("rope-yarn", {"rope-yarn": bpb["rope-yarn"]}, 64).agrees is None
    table = report.table(bpb, 64)
    assert "NO" in table and "rope-yarn" in table
    # Every scheme ties at the training length: no scheme is "behind".
    assert report.notes(bpb, 64) == []
    behind = dict(bpb, swat={64: 2.3, 128: 2.3, 256: 2.3})
    (note,) = report.notes(behind, 64)
    assert note.startswith("swat is 0.30 bits per byte behind rope already at the training length")
    # Schemes sharing weights get one note.
    behind = {"alibi": {64: 2.0, 128: 2.0}, "rope": {64: 2.5, 128: 2.6}, "rope-pi": {64: 2.5, 128: 2.55}}
    (note,) = report.notes(behind, 64)
    assert note.startswith("rope (and rope-pi, same weights) is 0.50 bits per byte behind alibi")


class _Uniform(torch.nn.Module):
    """Predicts every byte with probability 1/256: exactly 8 bits per byte."""

    def forward(self, ids):
        return torch.zeros(*ids.shape, 256)


def test_bits_per_byte_of_a_uniform_model():
    chunks = torch.randint(0, 256, (2, 65))
    out = evaluate(_Uniform(), chunks, [16, 32, 64], configure=lambda L: None, progress=False)
    assert out == {16: pytest.approx(8.0), 32: pytest.approx(8.0), 64: pytest.approx(8.0)}


# ---------------------------------------------------------------- end to end --


def _read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_table_csv_and_plot(tiny_text, tmp_path, capsys):
    out = tmp_path / "results"
    assert longreach_main(["extrapolate", "--quick", "--data", str(tiny_text), "--out", str(out)] + TINY) == 0
    rows = _read_csv(out / "results.csv")
    assert [(r["scheme"], int(r["eval_len"])) for r in rows] == [
        (s, L) for s in DEFAULT_SCHEMES for L in (32, 64, 128)]
    assert all(0.0 < float(r["bits_per_byte"]) < 16.0 for r in rows)
    assert {int(r["bytes_scored"]) for r in rows} == {2 * 128}
    # PI and YaRN evaluate rope's weights and leave them untouched at the training length.
    at_1x = {r["scheme"]: r["bits_per_byte"] for r in rows if r["eval_len"] == "32"}
    assert at_1x["rope"] == at_1x["rope-pi"] == at_1x["rope-yarn"] == at_1x["rope-ntk"]
    assert at_1x["alibi"] == at_1x["alibi-pi"]
    at_4x = {r["scheme"]: r["bits_per_byte"] for r in rows if r["eval_len"] == "128"}
    assert len({at_4x["rope"], at_4x["rope-pi"], at_4x["rope-yarn"], at_4x["rope-ntk"]}) == 4
    assert at_4x["alibi"] != at_4x["alibi-pi"]
    for png in ("bpb_vs_length.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = _read_csv(out / "training.csv")
    assert {r["model"] for r in steps} == {"rope", "rope-pi-ft", "rope-yarn-ft", "alibi", "swat", "swat-code"}
    assert len([r for r in steps if r["model"] == "rope"]) == 4  # TINY's 4 steps
    assert all(r["second_half_given_first_bpb"] and r["second_half_alone_bpb"] for r in rows)
    md = (out / "results.md").read_text()
    assert "| scheme |" in md and "--data" in md
    stdout = capsys.readouterr().out
    assert "as paper says?" in stdout and "swat" in stdout and "Long-context use" in stdout
    assert "torch threads" in md and "torch " + torch.__version__ in md


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_text, tmp_path):
    def run(seed, name):
        out = tmp_path / name
        argv = ["--data", str(tiny_text), "--out", str(out), "--schemes", "rope-pi,swat", "--seed", str(seed)]
        cli.main(argv + TINY)
        return [(r["scheme"], r["eval_len"], r["bits_per_byte"]) for r in _read_csv(out / "results.csv")]

    first = run(1, "a")
    assert run(1, "b") == first
    assert run(2, "c") != first
