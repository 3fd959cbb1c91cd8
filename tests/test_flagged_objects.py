"""The object files compiled with their own -m flags (csrc/cpu/isa/*.cpp) define no weak
function the rest of the library could end up calling.

A weak symbol (an inline function or a template member such as std::vector::resize) emitted
by an AVX-512-flagged file is one the linker may keep for every caller, so a CPU without
AVX-512 could run AVX-512 code through an unrelated call (csrc/cpu/flagged_helpers.h). A weak
symbol is allowed only inside a namespace that names the file's own instruction set (ATen's
at::vec::AVX512::..., called only from code of that capability).

Reads the editable build's objects under build/ (where `make build` puts them); skipped where
there is no such build or no `nm`.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# file -> the namespaces its weak symbols may be in
FLAGGED = {
    "tile_ops_avx2": ("::AVX2::",),
    "tile_ops_avx512": ("::AVX512::",),
    "tile_ops_avx512_bf16": (),
    "tile_ops_amx_bf16": (),
    "tile_ops_amx_emulated": (),
}
# Not a function: the exception-handling personality routine's data reference.
HARMLESS = {"DW.ref.__gxx_personality_v0"}


def _objects():
    found = {}
    for obj in ROOT.glob("build/*/CMakeFiles/longreach.dir/csrc/cpu/isa/*.cpp.o"):
        found.setdefault(obj.name[: -len(".cpp.o")], obj)
    return found


def weak_symbols(obj: pathlib.Path) -> list[str]:
    out = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    weak = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in ("W", "V", "w", "v", "u"):
            weak.append(parts[2])
    return weak


@pytest.mark.parametrize("name", sorted(FLAGGED))
def test_flagged_object_has_no_foreign_weak_symbols(name):
    if shutil.which("nm") is None:
        pytest.skip("no nm on this machine")
    objects = _objects()
    if not objects:
        pytest.skip("no editable build under build/ (make build makes one)")
    if name not in objects:
        pytest.skip(f"{name}.cpp is not compiled in this build (its compiler flags are missing)")
    allowed = FLAGGED[name]
    foreign = [s for s in weak_symbols(objects[name])
               if s not in HARMLESS and not any(ns in s for ns in allowed)]
    assert not foreign, f"{name}.cpp.o defines weak symbols compiled with its -m flags: {foreign[:10]}"


def test_the_check_finds_a_weak_std_symbol(tmp_path):
    """The rule above, on an object that breaks it: std::vector in an AVX-512-flagged file."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or shutil.which("nm") is None:
        pytest.skip("no C++ compiler or nm on this machine")
    src = tmp_path / "bad.cpp"
    src.write_text("#include <vector>\nvoid grow(std::vector<unsigned>& v, long n) { v.resize(n); }\n")
    obj = tmp_path / "bad.o"
    subprocess.run([cxx, "-O2", "-mavx512f", "-c", str(src), "-o", str(obj)], check=True, timeout=120)
    assert any("std::vector" in s for s in weak_symbols(obj))
