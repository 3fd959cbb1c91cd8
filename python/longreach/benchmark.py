"""Benchmark of the local-attention op against PyTorch's attention paths.

`python -m longreach bench` (and benchmarks/bench_attention.py) time
`longreach.local_attention` forward and forward+backward on a sliding window
and compare it, in the same run, with:

- ``sdpa_mask``: F.scaled_dot_product_attention with a dense (L, L) bool mask
  of the same window (skipped when its estimated memory exceeds a cap);
- ``sdpa_causal``: F.scaled_dot_product_attention(is_causal=True), PyTorch's
  CPU flash kernel, which computes *full* causal attention (more work);
- ``reference``: longreach.reference.local_attention, the dense oracle
  (small lengths only);
- ``flex``: FlexAttention compiled for CPU with a sliding-window block mask
  (forward; PyTorch has no CPU backward for it, and the run says so);
- a large GEMM of the benchmark dtype (and float32), the practical roof,
  measured before and after the attention runs (the faster one counts).

How things are counted (docs/benchmarking.md says the same):

- Times are medians over ``repeats`` calls after one warm-up call, fewer when
  a case would exceed ``max_seconds``; the table shows how many (``n``).
- Useful FLOPs count only the (query, key) pairs a method's own mask allows:
  forward ``4 * B * H * Lq * keys_per_row * D`` (QK^T and PV, 2 FLOPs per
  multiply-add); forward+backward ``3.5x`` that (FlashAttention's convention:
  the backward is 2.5x the forward, five matmuls including the recomputed
  QK^T). sdpa_causal is credited with its own causal pairs, so every
  method's GFLOP/s is "per useful FLOP of what it computes".
- Peak memory beyond inputs is the growth of the process's resident set (RSS)
  while the method runs, plus the state it builds once per length (e.g. the
  dense mask). Each method and pass runs in its own subprocess; after its timings, glibc
  is told to serve every allocation >= 128 KiB with mmap and to return freed
  memory (mallopt + malloc_trim), the kernel's peak-RSS mark is reset
  (/proc/self/clear_refs), and the peak is read back from VmHWM. This sees
  every allocation (torch's, oneDNN's, the kernels' own buffers), unlike
  tracemalloc; it runs after the timings, so it does not change them.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

FWD_BWD_FLOP_FACTOR = 3.5  # forward + backward = forward * (1 + 2.5), FlashAttention's convention
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINES = ("sdpa_mask", "sdpa_causal", "reference", "flex")
PASSES = ("forward", "forward+backward")
RESULT_MARK = "@@longreach-bench@@ "

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
DEFAULT_WINDOW = (511, 0)


# ----------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """Everything one benchmark run depends on (the CLI flags, one to one)."""

    lengths: Tuple[int, ...] = DEFAULT_LENGTHS
    window: Tuple[Optional[int], int] = DEFAULT_WINDOW
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    repeats: int = 5
    backward: bool = True
    baselines: Tuple[str, ...] = BASELINES
    memory: bool = True
    memory_cap_gib: float = 4.0
    reference_max_length: int = 4096
    max_seconds: float = 20.0
    gemm_size: int = 4096
    csv: Optional[str] = None
    plot: Optional[str] = None

    @property
    def causal(self) -> bool:
        return self.window[1] == 0

    def passes(self) -> Tuple[str, ...]:
        return PASSES if self.backward else PASSES[:1]


def demo_config() -> BenchConfig:
    """A short run (well under a minute on 2 busy cores) at a default size."""
    return BenchConfig(lengths=(1024, 2048, 4096), heads=4, window=(255, 0), baselines=("sdpa_mask", "sdpa_causal"),
                       repeats=3, max_seconds=1.0, gemm_size=2048)


# ----------------------------------------------------------------------------- counting


def keys_per_row(q_len: int, k_len: int, window: Tuple[Optional[int], Optional[int]]) -> float:
    """Average number of keys a query row may see (bottom-right aligned window, no dilation).

    Row i sits at key position p = i + Lk - Lq and sees keys [p - left, p + right]
    clipped to [0, Lk); None is unbounded. O(Lq), no (Lq, Lk) matrix.
    """
    left, right = window
    pos = torch.arange(q_len, dtype=torch.int64) + (k_len - q_len)
    lo = torch.zeros_like(pos) if left is None else (pos - left).clamp(min=0)
    hi = torch.full_like(pos, k_len - 1) if right is None else (pos + right).clamp(max=k_len - 1)
    return float((hi - lo + 1).clamp(min=0).sum()) / q_len


def useful_flops(cfg: BenchConfig, length: int, keys: float, pass_name: str) -> float:
    forward = 4.0 * cfg.batch * cfg.heads * length * keys * cfg.head_dim
    return forward if pass_name == "forward" else FWD_BWD_FLOP_FACTOR * forward


def window_mask(length: int, window: Tuple[Optional[int], Optional[int]]) -> torch.Tensor:
    """Dense (L, L) bool mask of the window, True = may attend; L^2 bytes, no temporaries."""
    left, right = window
    mask = torch.ones(length, length, dtype=torch.bool)
    if left is not None:
        mask.triu_(-left)  # keeps j - i >= -left
    if right is not None:
        mask.tril_(right)  # keeps j - i <= right
    return mask


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One attention implementation: how to build it for a length, what it computes."""

    name: str
    description: str
    build: Callable[[BenchConfig, int], Callable]  # -> fn(q, k, v) -> out
    window: Callable[[BenchConfig], Tuple[Optional[int], Optional[int]]]  # the mask it computes
    skip: Callable[[BenchConfig, int, str], Optional[str]] = lambda cfg, length, pass_name: None


def _build_longreach(cfg, length):
    from .ops import local_attention

    window, causal = cfg.window, cfg.causal
    return lambda q, k, v: local_attention(q, k, v, window=window, causal=causal)


def _build_sdpa_mask(cfg, length):
    import torch.nn.functional as F

    mask = window_mask(length, cfg.window)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _build_sdpa_causal(cfg, length):
    import torch.nn.functional as F

    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _build_reference(cfg, length):
    from .reference import local_attention

    window, causal = cfg.window, cfg.causal
    return lambda q, k, v: local_attention(q, k, v, window=window, causal=causal)


def _build_flex(cfg, length):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    left, right = cfg.window

    def sliding_window(b, h, q_idx, kv_idx):
        offset = kv_idx - q_idx
        allowed = offset <= right
        return allowed if left is None else allowed & (offset >= -left)

    block_mask = create_block_mask(sliding_window, None, None, length, length, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _sdpa_mask_bytes(cfg, length):
    # The bool mask (L^2 bytes) plus the float additive mask SDPA's CPU kernel converts it to
    # (4 L^2 bytes), measured: 73 MiB at L=4096 forward, 38 MiB at L=2048 forward+backward.
    return 5 * length * length


def _reference_bytes(cfg, length):
    # Scores, probabilities and their gradients in float32 (about 4 live (B, H, L, L) copies,
    # measured 400 MiB at L=2048 forward+backward) plus the int64 index matrices of the mask.
    return 16 * cfg.batch * cfg.heads * length * length + 24 * length * length


def _cap_skip(estimate):
    def skip(cfg, length, pass_name):
        need = estimate(cfg, length)
        if need > cfg.memory_cap_gib * 2**30:
            return f"needs about {need / 2**30:.1f} GiB of dense mask/scores > cap {cfg.memory_cap_gib:g} GiB"
        return None

    return skip


def _reference_skip(cfg, length, pass_name):
    if length > cfg.reference_max_length:
        return f"dense oracle only up to L={cfg.reference_max_length}"
    return _cap_skip(_reference_bytes)(cfg, length, pass_name)


def _sdpa_causal_skip(cfg, length, pass_name):
    return None if cfg.causal else "window is not causal; is_causal=True would compute another problem"


METHODS: Dict[str, Method] = {
    m.name: m
    for m in (
        Method("longreach", "longreach.local_attention (fused, O(L * window))",
               _build_longreach, lambda cfg: cfg.window),
        Method("sdpa_mask", "F.scaled_dot_product_attention with a dense (L, L) bool window mask",
               _build_sdpa_mask, lambda cfg: cfg.window, _cap_skip(_sdpa_mask_bytes)),
        Method("sdpa_causal", "F.scaled_dot_product_attention(is_causal=True): full causal, CPU flash kernel",
               _build_sdpa_causal, lambda cfg: (None, 0), _sdpa_causal_skip),
        Method("reference", "longreach.reference.local_attention (dense oracle)",
               _build_reference, lambda cfg: cfg.window, _reference_skip),
        Method("flex", "FlexAttention + sliding-window block mask, torch.compile for CPU",
               _build_flex, lambda cfg: cfg.window),
    )
}


# ----------------------------------------------------------------------------- results


@dataclass
class Result:
    """One row of the table and of the CSV."""

    method: str
    pass_name: str
    length: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    window_left: Optional[int]
    window_right: Optional[int]
    keys_per_row: float
    status: str = "ok"  # ok | skipped | unsupported | failed
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    repeats: int = 0
    us_per_token: Optional[float] = None
    useful_gflop: Optional[float] = None
    gflops: Optional[float] = None
    roof_fraction: Optional[float] = None
    roof_gflops: Optional[float] = None
    peak_mib: Optional[float] = None
    state_mib: Optional[float] = None
    note: str = ""


CSV_FIELDS = [f.name for f in fields(Result)]


@dataclass
class Roof:
    dtype: str
    size: int
    median_ms: float
    gflops: float
    when: str  # "before" or "after" the attention measurements


# ----------------------------------------------------------------------------- memory


class _PeakRSS:
    """Peak resident-set growth of this process around a call (Linux; see module docstring)."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        self.available = sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")
        self._libc = None
        if self.available:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    def exact_mode(self) -> None:
        """From now on large allocations are mmapped and freed memory goes back to the OS."""
        if self._libc is not None:
            self._libc.mallopt(self.M_MMAP_THRESHOLD, 128 * 1024)
            self._libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)

    def _status(self) -> Dict[str, int]:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
        return out

    def settled_rss(self) -> int:
        if self._libc is not None:
            self._libc.malloc_trim(0)
        return self._status()["VmRSS"]

    def peak_growth(self, fn: Callable[[], object]) -> int:
        """Bytes the peak RSS rose above the RSS before `fn` while it ran (its result included)."""
        base = self.settled_rss()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak mark (VmHWM) to the current RSS
        result = fn()
        peak = self._status()["VmHWM"]
        del result
        return max(0, peak - base)


# ----------------------------------------------------------------------------- one method, in a worker


def _time_calls(fn: Callable[[], object], repeats: int, max_seconds: float) -> Tuple[List[float], float]:
    """One warm-up call (it may compile), then timed calls: at least one, at most `repeats`,
    and no further call once the timed ones plus the next would pass `max_seconds`."""
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    times: List[float] = []
    while len(times) < repeats and (not times or sum(times) + _median(times) <= max_seconds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times, warm


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _make_call(cfg: BenchConfig, attention: Callable, length: int, pass_name: str) -> Callable[[], object]:
    """The timed call of one pass on fresh inputs (seeded by the length)."""
    shape = (cfg.batch, cfg.heads, length, cfg.head_dim)
    gen = torch.Generator().manual_seed(length)
    q, k, v, grad_out = (torch.randn(shape, generator=gen).to(DTYPES[cfg.dtype]) for _ in range(4))
    if pass_name == "forward":
        return lambda: attention(q, k, v)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    return lambda: torch.autograd.grad(attention(*leaves), leaves, grad_out)


def measure_method(cfg: BenchConfig, name: str, pass_name: str, lengths: Sequence[int],
                   emit: Callable[[dict], None]) -> None:
    """Time one pass of one method at each length, then measure its peak memory there.

    Emits one timing dict per length as soon as it is known, then one memory dict per length.
    All timings come first because the memory measurement switches malloc to a slower,
    exact mode for the rest of the process. One process per pass, because a failed attempt
    (FlexAttention's missing CPU backward) leaves torch.compile running later calls eagerly.
    """
    method = METHODS[name]
    timed = []
    for length in lengths:
        row = {"method": name, "pass_name": pass_name, "length": length}
        try:
            call = _make_call(cfg, method.build(cfg, length), length, pass_name)
            times, warm = _time_calls(call, cfg.repeats, cfg.max_seconds)
            row.update(status="ok", times=times, warmup_s=warm)
            timed.append(length)
        except NotImplementedError as err:  # e.g. a backward PyTorch does not have on CPU
            row.update(status="unsupported", note=_one_line(err))
        except Exception as err:  # noqa: BLE001  (report it and go on with the other lengths)
            row.update(status="failed", note=f"{type(err).__name__}: {_one_line(err)}")
        call = None
        emit(row)
    rss = _PeakRSS()
    if not (cfg.memory and rss.available):
        return
    rss.exact_mode()
    for length in timed:
        # Built twice: the first build pays one-time costs (imports of torch.compile and friends)
        # that are no state of this length; the second one's RSS growth is the state (a mask).
        method.build(cfg, length)  # dropped at once
        before = rss.settled_rss()
        attention = method.build(cfg, length)
        state = max(0, rss.settled_rss() - before)  # RSS can shrink (pages returned): never a negative state
        call = _make_call(cfg, attention, length, pass_name)  # warm already: same shapes were timed
        peak = rss.peak_growth(call)
        emit({"memory": True, "method": name, "pass_name": pass_name, "length": length,
              "peak_bytes": state + peak, "state_bytes": state})
        attention = call = None


def measure_gemm(size: int, dtype: str, repeats: int, max_seconds: float) -> dict:
    """Median time and GFLOP/s of a (size x size) @ (size x size) matmul into a preallocated output."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(DTYPES[dtype]) for _ in range(2))
    out = torch.empty(size, size, dtype=DTYPES[dtype])
    times, _ = _time_calls(lambda: torch.mm(a, b, out=out), max(repeats, 10), max_seconds)
    median = _median(times)
    return {"gemm": True, "dtype": dtype, "size": size, "median_ms": 1e3 * median,
            "gflops": 2.0 * size**3 / median / 1e9}


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def worker_main() -> None:
    """Subprocess entry: read a job (JSON) on stdin, print results as marked JSON lines."""
    job = json.loads(sys.stdin.read())
    cfg = config_from_dict(job["config"])

    def emit(row):
        print(RESULT_MARK + json.dumps(row), flush=True)

    if job["kind"] == "gemm":
        for dtype in job["dtypes"]:
            emit(measure_gemm(cfg.gemm_size, dtype, cfg.repeats, cfg.max_seconds))
        return
    measure_method(cfg, job["method"], job["pass_name"], job["lengths"], emit)


def config_from_dict(data: dict) -> BenchConfig:
    data = dict(data)
    for key in ("lengths", "window", "baselines"):
        data[key] = tuple(data[key])
    return BenchConfig(**data)


def _run_worker(job: dict, on_row: Callable[[dict], None] = lambda row: None) -> Tuple[List[dict], Optional[str]]:
    """Run one job in a fresh interpreter; return its rows and an error text if it died.

    Rows are handed to `on_row` as they arrive (progress on long runs); stderr goes to a
    temporary file, so a chatty worker cannot block on a full pipe.
    """
    code = "from longreach.benchmark import worker_main; worker_main()"
    rows = []
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith(RESULT_MARK):
                rows.append(json.loads(line[len(RESULT_MARK):]))
                on_row(rows[-1])
        returncode = proc.wait()
        stderr.seek(0)
        tail = " | ".join(stderr.read().strip().splitlines()[-3:])
    error = f"worker exited with code {returncode}: {tail}" if returncode != 0 else None
    return rows, error


def _progress(out) -> Callable[[dict], None]:
    def show(row):
        if row.get("memory"):
            print(f"  L={row['length']}: peak {row['peak_bytes'] / 2**20:.1f} MiB", file=out, flush=True)
        elif row["status"] == "ok":
            print(f"  L={row['length']}: median {1e3 * _median(row['times']):.1f} ms of {len(row['times'])}",
                  file=out, flush=True)
        else:
            print(f"  L={row['length']}: {row['status']}", file=out, flush=True)

    return show


# ----------------------------------------------------------------------------- the run


def run_benchmark(cfg: BenchConfig, out=None) -> Tuple[List[Result], List[Roof]]:
    """Measure everything `cfg` asks for, print the table to `out`, write CSV/plot if asked."""
    out = sys.stdout if out is None else out
    _print_header(cfg, out)
    roofs = _measure_roofs(cfg, "before", out)

    results: List[Result] = []
    for name in ("longreach",) + tuple(cfg.baselines):
        method = METHODS[name]
        for pass_name in cfg.passes():
            planned, todo = {}, []
            for length in cfg.lengths:
                result = _blank_result(cfg, name, pass_name, length, keys_per_row(length, length, method.window(cfg)))
                planned[length] = result
                reason = method.skip(cfg, length, pass_name)
                if reason:
                    result.status, result.note = "skipped", reason
                else:
                    todo.append(length)
            results.extend(planned.values())
            if not todo:
                continue
            print(f"measuring {name} {pass_name} at L = {', '.join(map(str, todo))} ...", file=out, flush=True)
            rows, error = _run_worker({"kind": "method", "method": name, "pass_name": pass_name,
                                       "lengths": todo, "config": asdict(cfg)}, _progress(out))
            for row in rows:
                _fill_result(planned[row["length"]], row, cfg)
            for length in todo:
                result = planned[length]
                if result.status == "ok" and result.median_ms is None:
                    result.status, result.note = "failed", error or "no result from the worker"
                elif result.status == "ok" and cfg.memory and result.peak_mib is None and error:
                    result.note = f"memory not measured: {error}"

    roofs += _measure_roofs(cfg, "after", out)
    roof = best_roof(roofs, cfg.dtype)
    for result in results:
        result.roof_gflops = roof.gflops
        if result.gflops is not None:
            result.roof_fraction = result.gflops / roof.gflops
    print(file=out)
    print(format_table(cfg, results, roofs), file=out)
    if cfg.csv:
        write_csv(cfg.csv, results)
        print(f"\nCSV written to {cfg.csv}", file=out)
    if cfg.plot:
        plot_results(cfg.plot, cfg, results)
        print(f"plot written to {cfg.plot}", file=out)
    return results, roofs


def _measure_roofs(cfg: BenchConfig, when: str, out) -> List[Roof]:
    """The GEMM roof in the benchmark dtype (and float32), measured in its own worker."""
    dtypes = [cfg.dtype] + (["float32"] if cfg.dtype != "float32" else [])
    print(f"measuring the GEMM roof ({cfg.gemm_size}^3, {', '.join(dtypes)}) {when} the attention runs ...",
          file=out, flush=True)
    rows, error = _run_worker({"kind": "gemm", "dtypes": dtypes, "config": asdict(cfg)})
    if error or not rows:
        raise RuntimeError(f"the GEMM roof could not be measured: {error or 'no result'}")
    return [Roof(r["dtype"], r["size"], r["median_ms"], r["gflops"], when) for r in rows]


def best_roof(roofs: Sequence[Roof], dtype: str) -> Roof:
    """The roof is what the machine reached: the faster of the GEMMs before and after (noise only slows)."""
    return max((r for r in roofs if r.dtype == dtype), key=lambda r: r.gflops)


def _blank_result(cfg, name, pass_name, length, keys) -> Result:
    left, right = METHODS[name].window(cfg)
    return Result(method=name, pass_name=pass_name, length=length, batch=cfg.batch, heads=cfg.heads,
                  head_dim=cfg.head_dim, dtype=cfg.dtype, window_left=left, window_right=right,
                  keys_per_row=round(keys, 3), useful_gflop=useful_flops(cfg, length, keys, pass_name) / 1e9)


def _fill_result(result: Result, row: dict, cfg: BenchConfig) -> None:
    if row.get("memory"):
        result.peak_mib = row["peak_bytes"] / 2**20
        result.state_mib = row["state_bytes"] / 2**20
        return
    result.status = row["status"]
    result.note = row.get("note", result.note)
    if row["status"] != "ok":
        return
    median = _median(row["times"])
    result.median_ms = 1e3 * median
    result.min_ms = 1e3 * min(row["times"])
    result.repeats = len(row["times"])
    result.us_per_token = 1e6 * median / (cfg.batch * result.length)
    result.gflops = result.useful_gflop / median


# ----------------------------------------------------------------------------- output


def _print_header(cfg: BenchConfig, out) -> None:
    left, right = cfg.window
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"longreach attention benchmark: B={cfg.batch} H={cfg.heads} D={cfg.head_dim} {cfg.dtype} "
          f"window=({left}, {right}){' causal' if cfg.causal else ''}", file=out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
          f"load average {load}", file=out, flush=True)


def _fmt(value, spec: str, width: int) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def format_table(cfg: BenchConfig, results: Sequence[Result], roofs: Sequence[Roof]) -> str:
    """The human-readable report: roof, one table per pass, scaling fits, notes."""
    lines = []
    for roof in roofs:
        lines.append(f"GEMM roof {roof.dtype} {roof.size}x{roof.size}x{roof.size} ({roof.when}): "
                     f"{roof.median_ms:.1f} ms, {roof.gflops:.1f} GFLOP/s")
    lines.append(f"useful FLOPs: forward 4*B*H*L*keys_per_row*D, forward+backward {FWD_BWD_FLOP_FACTOR}x forward; "
                 f"%roof = GFLOP/s / {best_roof(roofs, cfg.dtype).gflops:.1f} ({cfg.dtype} GEMM, best of before/after)")
    header = (f"{'method':<12} {'L':>6} {'keys/row':>8} {'median ms':>10} {'n':>2} {'us/token':>9} "
              f"{'GFLOP/s':>8} {'%roof':>6} {'peak MiB':>9}  note")
    seen_notes = set()
    for pass_name in cfg.passes():
        lines += ["", f"== {pass_name} ==", header, "-" * len(header)]
        for length in cfg.lengths:
            for r in results:
                if r.pass_name != pass_name or r.length != length:
                    continue
                note = r.note if r.status != "ok" else ""
                if note and (r.method, note) in seen_notes:
                    note = "as above"
                seen_notes.add((r.method, r.note))
                if r.status == "ok" and r.state_mib and r.state_mib >= 0.05:
                    note = f"incl. {r.state_mib:.1f} MiB state built once (mask)"
                lines.append(
                    f"{r.method:<12} {r.length:>6} {r.keys_per_row:>8.1f} {_fmt(r.median_ms, '.1f', 10)} "
                    f"{r.repeats if r.status == 'ok' else '-':>2} {_fmt(r.us_per_token, '.2f', 9)} "
                    f"{_fmt(r.gflops, '.2f', 8)} {_fmt(r.roof_fraction, '.1%', 6)} "
                    f"{_fmt(r.peak_mib, '.1f', 9)}  {(r.status + ': ' if r.status != 'ok' else '') + note}".rstrip())
    fits = scaling_fits(results)
    if fits:
        lines += ["", "time ~ L^p at a fixed window (least squares on log time vs log L; 1 = linear, 2 = quadratic):"]
        for (method, pass_name), (power, lo, hi) in fits.items():
            lines.append(f"  {method:<12} {pass_name:<17} p = {power:.2f}  (L = {lo}..{hi})")
    lines += ["", "notes:"]
    lines += [f"  {name}: {METHODS[name].description}" for name in ("longreach",) + tuple(cfg.baselines)]
    if "sdpa_causal" in cfg.baselines:
        lines.append("  sdpa_causal does more work (every earlier key); its GFLOP/s counts its own causal pairs.")
    for r in results:
        if r.method == "flex" and r.status == "unsupported":
            lines.append(f"  flex {r.pass_name}: not available on CPU in this PyTorch (only its forward is measured).")
            break
    if cfg.memory:
        lines.append("  peak MiB: resident-set growth beyond the inputs q, k, v (and grad_out), including outputs,")
        lines.append("  gradients and state built once per length; measured after the timings, one subprocess per method and pass.")
    else:
        lines.append("  peak memory not measured (--no-memory).")
    return "\n".join(lines)


def scaling_fits(results: Sequence[Result]) -> Dict[Tuple[str, str], Tuple[float, int, int]]:
    """Exponent p of time ~ L^p per (method, pass), over its measured lengths (>= 2 needed)."""
    fits = {}
    keys = []
    for r in results:
        if (r.method, r.pass_name) not in keys:
            keys.append((r.method, r.pass_name))
    for key in keys:
        points = [(r.length, r.median_ms) for r in results
                  if (r.method, r.pass_name) == key and r.status == "ok" and r.median_ms]
        if len({length for length, _ in points}) < 2:
            continue
        xs = [math.log(length) for length, _ in points]
        ys = [math.log(ms) for _, ms in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        power = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fits[key] = (power, min(p[0] for p in points), max(p[0] for p in points))
    return fits


def write_csv(path: str, results: Sequence[Result]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def plot_results(path: str, cfg: BenchConfig, results: Sequence[Result]) -> None:
    """PNG: median time and peak memory against L, one line per method and pass (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"forward": "-", "forward+backward": "--"}
    colors = {}
    for method in ("longreach",) + tuple(cfg.baselines):
        for pass_name in cfg.passes():
            rows = [r for r in results if r.method == method and r.pass_name == pass_name and r.status == "ok"]
            if not rows:
                continue
            color = colors.setdefault(method, f"C{len(colors)}")
            label = f"{method} {pass_name}"
            ax_time.plot([r.length for r in rows], [r.median_ms / 1e3 for r in rows], styles[pass_name],
                         color=color, marker="o", label=label)
            mem = [r for r in rows if r.peak_mib is not None]
            if mem:
                ax_mem.plot([r.length for r in mem], [max(r.peak_mib, 1e-2) for r in mem], styles[pass_name],
                            color=color, marker="o", label=label)
    left, right = cfg.window
    title = (f"B={cfg.batch} H={cfg.heads} D={cfg.head_dim} {cfg.dtype} window=({left}, {right})"
             f"{' causal' if cfg.causal else ''}")
    for ax, ylabel in ((ax_time, "median time (s)"), (ax_mem, "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.lengths), [str(length) for length in cfg.lengths])
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=9)
    handles, labels = ax_time.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.04 * math.ceil(len(labels) / 4), 1, 1))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _lengths(text: str) -> Tuple[int, ...]:
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected lengths like 2048,4096, got {text!r}")
    try:
        return tuple(sorted({_positive_int(p) for p in parts}))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} in {text!r}") from None


def _window(text: str) -> Tuple[Optional[int], int]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT (e.g. 511,0; LEFT may be 'none'), got {text!r}")
    left_text, right_text = (p.strip().lower() for p in parts)
    try:
        left = None if left_text == "none" else int(left_text)
        right = int(right_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT as integers (LEFT may be 'none'), got {text!r}") from None
    if (left is not None and left < 0) or right < 0:
        raise argparse.ArgumentTypeError(f"window sides must be >= 0, got {text!r}")
    return left, right


def _baselines(text: str) -> Tuple[str, ...]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown baseline(s) {', '.join(map(repr, unknown))}; choose from {', '.join(BASELINES)} or 'none'")
    return tuple(n for n in BASELINES if n in names)  # fixed order, no duplicates


def add_arguments(parser: argparse.ArgumentParser, defaults: Optional[BenchConfig] = None) -> None:
    """The benchmark flags (shared by `python -m longreach bench` and benchmarks/bench_attention.py)."""
    d = defaults or BenchConfig()
    parser.add_argument("--lengths", type=_lengths, default=d.lengths, metavar="L,L,...",
                        help=f"sequence lengths (default {','.join(map(str, d.lengths))})")
    parser.add_argument("--window", type=_window, default=d.window, metavar="LEFT,RIGHT",
                        help=f"keys on each side, inclusive; RIGHT=0 is causal (default {d.window[0]},{d.window[1]})")
    parser.add_argument("--batch", type=_positive_int, default=d.batch, help=f"batch size (default {d.batch})")
    parser.add_argument("--heads", type=_positive_int, default=d.heads, help=f"attention heads (default {d.heads})")
    parser.add_argument("--head-dim", type=_positive_int, default=d.head_dim,
                        help=f"head dimension (default {d.head_dim})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype, help=f"(default {d.dtype})")
    parser.add_argument("--repeats", type=_positive_int, default=d.repeats,
                        help=f"timed calls per case after one warm-up; median reported (default {d.repeats})")
    parser.add_argument("--max-seconds", type=_positive_float, default=d.max_seconds,
                        help=f"time budget per case; fewer repeats (>= 1) when exceeded (default {d.max_seconds:g})")
    parser.add_argument("--no-backward", dest="backward", action="store_false", default=d.backward,
                        help="measure the forward only")
    parser.add_argument("--baselines", type=_baselines, default=d.baselines, metavar="NAME,...",
                        help=f"comparisons to run: {','.join(BASELINES)} or none (default {','.join(d.baselines)})")
    parser.add_argument("--memory-cap-gib", type=_positive_float, default=d.memory_cap_gib,
                        help=f"skip dense methods whose estimated memory exceeds this (default {d.memory_cap_gib:g})")
    parser.add_argument("--reference-max-length", type=_positive_int, default=d.reference_max_length,
                        help=f"run the dense reference only up to this L (default {d.reference_max_length})")
    parser.add_argument("--gemm-size", type=_positive_int, default=d.gemm_size,
                        help=f"N of the N x N x N GEMM roof (default {d.gemm_size})")
    parser.add_argument("--no-memory", dest="memory", action="store_false", default=d.memory,
                        help="do not measure peak memory")
    parser.add_argument("--csv", metavar="PATH", default=d.csv, help="also write every row to this CSV file")
    parser.add_argument("--plot", metavar="PATH", default=d.plot,
                        help="draw time and peak memory against L per method to this PNG")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})


def main(argv=None, defaults: Optional[BenchConfig] = None, prog: str = "longreach bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Benchmark longreach.local_attention against "
                                     "PyTorch's attention paths and a GEMM roof (see docs/benchmarking.md).")
    add_arguments(parser, defaults)
    cfg = config_from_args(parser.parse_args(argv))
    run_benchmark(cfg)
    return 0
