"""The benchmark command line (`python -m longreach bench`): structure of its table, CSV and
plot on tiny sizes, its counting helpers against the dense reference, and its argument errors.

No timing is asserted (the machine is shared). Memory is checked only against lower bounds
that any working measurement must reach (the outputs and gradients a call returns), and only
where the measurement can resolve them: the peak is the growth of the process's resident-set
high-water mark (VmHWM), which Linux keeps in per-CPU counters folded in batches, so it can be
off by up to `rss_noise_bytes()` (768 KiB on 2 CPUs, 6 MiB on 16, 48 MiB on 64), whatever the
load. The tiny sizes of the full run are below that; a separate run at L=2048 checks the bound
where the CPU count allows, and the in-process check uses 128 MiB.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from longreach import benchmark, reference
from longreach.__main__ import main as cli_main

from testenv import extended_tests_enabled

B, H, D = 1, 8, 64
MiB = 2**20


def rss_noise_bytes() -> int:
    """How far the kernel's RSS high-water mark can be from the true peak, independent of load.

    Since Linux 6.2 the RSS counters are per-CPU counters, and the high-water mark is sampled
    from their approximate sum (percpu_counter_read), which can be off by the batch size
    max(32, 2 * CPUs) pages on every CPU; before 6.2 each thread cached up to 64 page events.
    Both bounds together, for the CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    online = os.cpu_count() or cpus
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    return page * (online * max(32, 2 * online) + 64 * max(cpus, torch.get_num_threads()))


def returned_bytes(row) -> int:
    """What a call returns and so must hold at its peak: the output (forward), or the output
    (kept for the backward) and three gradients (forward+backward), float32."""
    return (1 if row["pass_name"] == "forward" else 4) * B * H * int(row["length"]) * D * 4


def check_memory_columns(row) -> None:
    """The memory columns of one measured row: present and finite; the peak includes the state;
    the peak holds the returned tensors where the RSS measurement can resolve them; and, when the
    CSV has the allocator-counted column, it holds them exactly (it counts bytes, not pages)."""
    peak, state = float(row["peak_mib"]), float(row["state_mib"])
    assert math.isfinite(peak) and math.isfinite(state), row
    assert peak >= state - 1e-9, row  # peak_bytes = state_bytes + max(0, growth during the call)
    returned, noise = returned_bytes(row), rss_noise_bytes()
    if returned >= 2 * noise:  # then the bound below is at least 0.4 of what is returned
        assert peak >= (0.9 * returned - noise) / MiB, (row, f"RSS noise bound {noise / MiB:.2f} MiB")
    if row.get("alloc_peak_mib") not in (None, ""):
        assert float(row["alloc_peak_mib"]) >= returned / MiB * (1 - 1e-6), row


def run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "longreach", "bench", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Both passes, two lengths, two baselines, memory on, CSV and plot."""
    out = tmp_path_factory.mktemp("bench")
    csv_path, png_path = str(out / "bench.csv"), str(out / "sub" / "bench.png")
    stdout = run_cli("--lengths", "128,256", "--repeats", "1", "--baselines", "sdpa_mask,reference",
                     "--gemm-size", "256", "--csv", csv_path, "--plot", png_path)
    return stdout, csv_path, png_path


def test_table_has_both_passes_every_method_and_the_roof(full_run):
    stdout, _, _ = full_run
    assert "GEMM roof float32 256x256x256 (before):" in stdout and "GEMM roof float32 256x256x256 (after):" in stdout
    for section in ("== forward ==", "== forward+backward =="):
        assert stdout.count(section) == 1
    header = [line for line in stdout.splitlines() if line.startswith("method ")]
    assert len(header) == 2
    for column in ("L", "keys/row", "median ms", "us/token", "GFLOP/s", "%roof", "peak MiB"):
        assert column in header[0]
    rows = [line.split() for line in stdout.splitlines() if not line.startswith(" ")]
    rows = [r for r in rows if len(r) > 1 and r[0] in ("longreach", "sdpa_mask", "reference") and r[1].isdigit()]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (m, L) for m in ("longreach", "sdpa_mask", "reference") for L in ("128", "256") for _ in range(2))
    # time ~ L^p is fitted per method and pass once there are two lengths
    fits = [line for line in stdout.splitlines() if " p = " in line]
    assert len(fits) == 6


def test_csv_rows_are_complete_and_consistent(full_run):
    _, csv_path, _ = full_run
    header, rows = read_csv(csv_path)
    assert header == benchmark.CSV_FIELDS
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row["status"] == "ok", row
        length, keys = int(row["length"]), float(row["keys_per_row"])
        assert keys == pytest.approx(reference.allowed_keys(length, length, (511, 0), True).sum().item() / length)
        forward_gflop = 4 * B * H * length * keys * D / 1e9
        factor = 1.0 if row["pass_name"] == "forward" else benchmark.FWD_BWD_FLOP_FACTOR
        assert float(row["useful_gflop"]) == pytest.approx(factor * forward_gflop)
        median_s = float(row["median_ms"]) / 1e3
        assert float(row["gflops"]) == pytest.approx(float(row["useful_gflop"]) / median_s)
        assert float(row["min_ms"]) <= float(row["median_ms"])
        assert float(row["roof_fraction"]) == pytest.approx(float(row["gflops"]) / float(row["roof_gflops"]))
        assert int(row["repeats"]) == 1
        assert float(row["us_per_token"]) == pytest.approx(1e6 * median_s / length)
        # The call returns its output (and, with backward, three gradients): the peak holds them,
        # as far as the RSS measurement resolves such small sizes (see the module docstring).
        check_memory_columns(row)


def test_peak_memory_holds_the_returned_tensors_at_a_resolvable_size(tmp_path):
    """At L=2048 a forward returns 4 MiB and a forward+backward 16 MiB, well above the RSS
    noise on a few CPUs, so there the lower bound is asserted for real."""
    csv_path = str(tmp_path / "mem.csv")
    run_cli("--lengths", "2048", "--repeats", "1", "--baselines", "none", "--gemm-size", "256", "--max-seconds", "1",
            "--csv", csv_path)
    _, rows = read_csv(csv_path)
    assert {r["pass_name"] for r in rows} == {"forward", "forward+backward"}
    noise = rss_noise_bytes()
    if max(returned_bytes(r) for r in rows) < 2 * noise:
        pytest.skip(f"{os.cpu_count()} CPUs: RSS noise up to {noise / MiB:.1f} MiB hides a 16 MiB peak")
    for row in rows:
        assert row["status"] == "ok", row
        check_memory_columns(row)


def test_plot_is_a_png(full_run):
    _, _, png_path = full_run
    with open(png_path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png_path) > 10_000


def test_forward_only_non_causal_window_and_skips(tmp_path):
    csv_path = str(tmp_path / "b.csv")
    stdout = run_cli("--lengths", "256", "--repeats", "1", "--no-backward", "--no-memory", "--window", "64,64",
                     "--baselines", "sdpa_mask,sdpa_causal", "--memory-cap-gib", "0.0001", "--gemm-size", "256",
                     "--csv", csv_path)
    assert "== forward ==" in stdout and "== forward+backward ==" not in stdout
    assert "peak memory not measured" in stdout
    _, rows = read_csv(csv_path)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"longreach", "sdpa_mask", "sdpa_causal"}
    assert by_method["longreach"]["status"] == "ok" and by_method["longreach"]["peak_mib"] == ""
    assert float(by_method["longreach"]["keys_per_row"]) == pytest.approx(
        reference.allowed_keys(256, 256, (64, 64)).sum().item() / 256)
    assert by_method["sdpa_mask"]["status"] == "skipped" and "cap" in by_method["sdpa_mask"]["note"]
    assert by_method["sdpa_causal"]["status"] == "skipped" and "not causal" in by_method["sdpa_causal"]["note"]
    assert "skipped: needs about" in stdout


@pytest.mark.parametrize("args, match", [
    (["--lengths", "0"], "argument --lengths: expected a positive integer, got 0"),
    (["--lengths", "abc"], "argument --lengths: expected a positive integer, got 'abc'"),
    (["--lengths", ","], "argument --lengths: expected lengths like"),
    (["--window", "5"], "argument --window: expected LEFT,RIGHT"),
    (["--window=-1,0"], "argument --window: window sides must be >= 0, got '-1,0'"),
    (["--window", "a,0"], "argument --window: expected LEFT,RIGHT as integers"),
    (["--baselines", "sdpa_mask,bogus"], "argument --baselines: unknown baseline\\(s\\) 'bogus'"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    (["--memory-cap-gib", "-1"], "argument --memory-cap-gib: expected a positive number, got '-1'"),
    (["--max-seconds", "nan"], "argument --max-seconds: expected a positive number, got 'nan'"),
    (["--heads", "2.5"], "argument --heads: expected a positive integer, got '2.5'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_name_the_flag(args, match, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", *args])
    assert info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    cfg = benchmark.config_from_args(parser.parse_args(
        ["--lengths", "4096,1024 2048,1024", "--window", "none,0", "--heads", "4", "--head-dim", "128",
         "--dtype", "bfloat16", "--baselines", "flex,sdpa_causal", "--no-backward", "--repeats", "2"]))
    assert cfg.lengths == (1024, 2048, 4096)
    assert cfg.window == (None, 0) and cfg.causal
    assert (cfg.heads, cfg.head_dim, cfg.dtype, cfg.repeats) == (4, 128, "bfloat16", 2)
    assert cfg.baselines == ("sdpa_causal", "flex")
    assert cfg.passes() == ("forward",)
    defaults = benchmark.config_from_args(parser.parse_args([]))
    assert defaults == benchmark.BenchConfig()
    assert defaults.lengths == (2048, 4096, 8192, 16384, 32768) and defaults.window == (511, 0)
    assert benchmark.config_from_dict(dataclasses.asdict(cfg)) == cfg


def test_demo_uses_its_own_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: longreach demo" in text and "default 1024,2048,4096" in text


@pytest.mark.parametrize("q_len, k_len", [(1, 1), (7, 7), (100, 100), (5, 40), (64, 300)])
@pytest.mark.parametrize("window", [(None, None), (None, 0), (0, 0), (3, 0), (16, 16), (511, 0), (2, 9)])
def test_keys_per_row_counts_the_reference_mask(q_len, k_len, window):
    expected = reference.allowed_keys(q_len, k_len, window).sum().item() / q_len
    assert benchmark.keys_per_row(q_len, k_len, window) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("length", [1, 9, 130])
@pytest.mark.parametrize("window", [(None, None), (None, 0), (0, 0), (5, 0), (4, 7)])
def test_window_mask_equals_the_reference_mask(length, window):
    assert torch.equal(benchmark.window_mask(length, window), reference.allowed_keys(length, length, window)[0])


def _result(method, length, ms):
    r = benchmark.Result(method, "forward", length, B, H, D, "float32", 511, 0, 1.0)
    r.median_ms = ms
    return r


def test_scaling_fit_recovers_the_power():
    results = [_result("linear", L, 3.0 * L) for L in (1024, 2048, 4096)]
    results += [_result("quadratic", L, 1e-3 * L * L) for L in (1024, 4096)]
    results += [_result("single", 1024, 5.0)]
    fits = benchmark.scaling_fits(results)
    assert fits[("linear", "forward")] == (pytest.approx(1.0), 1024, 4096)
    assert fits[("quadratic", "forward")][0] == pytest.approx(2.0)
    assert ("single", "forward") not in fits


def test_peak_rss_sees_torch_allocations():
    rss = benchmark._PeakRSS()
    if not rss.available:
        pytest.skip("needs Linux /proc/self/clear_refs")
    rss.exact_mode()
    size = 64 * MiB

    def allocate_and_free_temporaries():
        a = torch.ones(size // 4)  # 64 MiB live, then freed, then another 64 MiB
        b = a + 1
        del a
        return float(b.sum())

    noise = rss_noise_bytes()
    if noise > size // 2:
        pytest.skip(f"RSS noise up to {noise / MiB:.0f} MiB on {os.cpu_count()} CPUs")
    file_before = _rss_file_bytes()
    peak = rss.peak_growth(allocate_and_free_temporaries)
    # File-backed pages (library code) the kernel reclaims meanwhile lower the RSS under memory
    # pressure: the lower bound gives them back, so the check does not depend on the machine.
    evicted = max(0, file_before - _rss_file_bytes())
    assert math.isfinite(peak)
    assert 2 * size * 0.95 - noise - evicted <= peak <= 2 * size * 1.2 + noise, (peak, noise, evicted)


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not extended_tests_enabled(), reason="compiles FlexAttention (slow): LONGREACH_EXTENDED_TESTS=1")
def test_flex_forward_runs_and_its_missing_cpu_backward_is_reported(tmp_path):
    csv_path = str(tmp_path / "flex.csv")
    run_cli("--lengths", "256", "--repeats", "1", "--baselines", "flex", "--gemm-size", "256", "--csv", csv_path)
    _, rows = read_csv(csv_path)
    flex = {r["pass_name"]: r for r in rows if r["method"] == "flex"}
    assert flex["forward"]["status"] == "ok"
    assert flex["forward+backward"]["status"] in ("ok", "unsupported")
