"""Builds and runs the threaded host emulation of the CUDA kernels
(tests/emulation/threaded/) under a sanitizer.

The harness is a standalone C++ program: it needs torch's headers (c10::Half,
c10::BFloat16) but links no torch library, so ThreadSanitizer and
AddressSanitizer see every access it makes. Binaries are cached in
build/threaded_emulation/<sanitizer>/ and rebuilt when a source or the
command changes (about 10-30 s each).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "emulation" / "threaded"

SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
}

# Every race / error is reported (not only the first), and a race makes the exit status 66.
ENVIRONMENT = {
    "thread": {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66 report_signal_unsafe=0"},
    "address": {"ASAN_OPTIONS": "detect_leaks=0 abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
}


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def sanitizer_unavailable(sanitizer: str) -> str | None:
    """Why this compiler cannot build and run a threaded program with the sanitizer, or None."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (set CXX)"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
        build = subprocess.run([cxx, "-std=c++17", *SANITIZERS[sanitizer], str(src), "-o", str(exe), "-pthread"],
                               capture_output=True, text=True)
        if build.returncode != 0:
            return f"{cxx} cannot build with -fsanitize={sanitizer}: {build.stderr.strip()[-300:]}"
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        if run.returncode != 0:  # e.g. ThreadSanitizer on a kernel with an unsupported memory layout
            return f"a -fsanitize={sanitizer} program does not run here: {run.stderr.strip()[-300:]}"
    return None


def _sources() -> list[Path]:
    files = sorted(HARNESS.glob("*")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    return files + sorted((ROOT / "csrc" / "common").glob("*.h"))


def build(sanitizer: str) -> Path:
    import torch

    out_dir = ROOT / "build" / "threaded_emulation" / sanitizer
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "threaded_emulation"
    torch_include = Path(torch.__file__).resolve().parent / "include"
    # C++20: torch 2.14's headers need it (the CPU build against 2.13 also compiles with it).
    command = [compiler(), "-std=c++20", "-O1", "-g", *SANITIZERS[sanitizer], "-DLONGREACH_THREADED_EMULATION",
               f"-I{ROOT / 'csrc'}", f"-I{HARNESS}", f"-I{torch_include}", str(HARNESS / "threaded_emulation.cpp"),
               "-o", str(exe), "-pthread"]
    digest = hashlib.sha256(" ".join(command).encode())
    for f in _sources():
        digest.update(f.read_bytes())
    stamp = out_dir / "sources.sha256"
    if exe.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return exe
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the threaded emulation failed:\n{' '.join(command)}\n{result.stderr[-5000:]}")
    stamp.write_text(digest.hexdigest())
    return exe


def run(sanitizer: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the harness (built for `sanitizer`) with `args`; stdout and stderr together in .stdout."""
    exe = build(sanitizer)
    env = {**os.environ, **ENVIRONMENT[sanitizer]}
    return subprocess.run([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=timeout)
