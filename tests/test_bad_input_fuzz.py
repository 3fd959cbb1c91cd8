"""Fuzz of every argument's bad values for local_attention, apply_rotary and apply_rotary_qk
(issue 12, "Tests that would have found these"), each case run in a child process.

The cases (tests/fuzz_cases.py) are wrong types (str, list, numpy array, bool, None, complex,
int), tensors of a wrong rank, dtype, shape or device (``meta`` among CPU tensors), zero sizes,
extreme integers (2**62, 2**63-1, -2**63, 2**64) and NaN/inf floats: about 530 cases, ~12 s.
One child process runs them in a batch, writing a JSON line before and after every case, so when
it crashes (signal, abort, heap corruption) or hangs (no line for CASE_TIMEOUT_S), the case that
was running is known; a new child then runs the remaining cases, and each crashing case is re-run
alone to confirm that the crash is its own (the record says so when it is not). On the tree
before issue 12's fixes this found 182 failing cases, 9 of them heap-corrupting crashes
(dilation 2**63-2 and 2**63-1), all attributed and reproduced alone.

A case fails on:
- a crash or a hang;
- ``bad``: a silent acceptance (returned without raising); an exception other than TypeError,
  ValueError or RuntimeError (NotImplementedError included); a message that does not name the
  argument (the case's regex) or the function, or that shows C++/dispatcher internals
  (``c10::``, ``long int``, "Expected a value of type ... found type");
- ``extreme`` (valid but extreme, e.g. dilation=2**62 with a window): any error, or a result
  (output, lse, gradients) that differs from longreach.reference on a small problem, NaN/inf
  placement included;
- ``either`` (e.g. a window of 2**64): neither a clean error as for ``bad`` nor a result equal
  to the reference.

Run some cases alone with ``-k 'attn-dilation-2pow62'``-style ids (the whole batch runs only the
selected cases). KNOWN_FAILING below lists the cases that failed when this file was written,
with what they did; they are not xfailed: each fails until its fix lands (then delete its line).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Dict, List

import pytest

import fuzz_cases

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CASE_TIMEOUT_S = 60.0  # one case (all are tiny); generous for a busy machine
STARTUP_TIMEOUT_S = 120.0  # a child importing torch and building the cases

CASES = fuzz_cases.build_cases()
BY_ID = {c.id: c for c in CASES}

# Failing when this file was written (issue 12 work in progress), with what happened. Not
# xfailed: each stays red until it is fixed (or the semantics are decided and the case changed);
# delete an entry when its case passes.
KNOWN_FAILING: Dict[str, str] = {}


# ----------------------------------------------------------------------------- running children

CHILD_CODE = (
    "import sys; sys.path.insert(0, {tests!r}); import fuzz_cases; fuzz_cases.child_main()"
)


def _reader(stream, out: "queue.Queue"):
    for line in stream:
        if line.startswith(fuzz_cases.MARK):
            out.put(json.loads(line[len(fuzz_cases.MARK):]))
    out.put(None)  # EOF


def run_batch(ids: List[str]) -> Dict[str, dict]:
    """Run `ids` in one child; return the records it produced, plus a crash / hang record for
    the case that was running when it died, and the ids it never reached under "_left"."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    records: Dict[str, dict] = {}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD_CODE.format(tests=TESTS_DIR)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
        proc.stdin.write(json.dumps(ids))
        proc.stdin.close()
        lines: "queue.Queue" = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        current, ready, hung = None, False, False
        while True:
            try:
                rec = lines.get(timeout=CASE_TIMEOUT_S if ready else STARTUP_TIMEOUT_S)
            except queue.Empty:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if rec is None or rec.get("done"):
                break
            if rec.get("ready"):
                ready = True
            elif "start" in rec:
                current = rec["start"]
            else:
                records[rec["id"]] = rec
                current = None
        code = proc.wait()
        err.seek(0)
        tail = err.read()[-3000:]
    if not ready and not hung:
        raise RuntimeError(f"fuzz child failed to start (exit {code}): {tail}")
    if not ready:
        raise RuntimeError(f"fuzz child did not start within {STARTUP_TIMEOUT_S} s: {tail}")
    if current is not None:
        if hung:
            records[current] = {"id": current, "outcome": "hang", "detail": f"no result within {CASE_TIMEOUT_S} s"}
        else:
            sig = -code if code < 0 else None
            what = f"signal {signal.Signals(sig).name}" if sig else f"exit code {code}"
            records[current] = {"id": current, "outcome": "crash", "detail": f"child died ({what}); stderr: {tail}"}
    elif code != 0 and not hung:
        # Died after its last case (e.g. heap corruption found at exit): blame the last case run.
        done_ids = [i for i in ids if i in records]
        if done_ids:
            records[done_ids[-1]] = {"id": done_ids[-1], "outcome": "crash",
                                     "detail": f"child exited with {code} after this case; stderr: {tail}"}
    records["_left"] = [i for i in ids if i not in records]  # type: ignore[assignment]
    return records


def run_all(ids: List[str]) -> Dict[str, dict]:
    results: Dict[str, dict] = {}
    pending = list(ids)
    while pending:  # a new child for what is left after each crash or hang
        batch = run_batch(pending)
        left = batch.pop("_left")
        results.update(batch)
        pending = [i for i in left if i not in results]
    # Confirm every crash alone: a crash caused by damage an earlier case left behind says so.
    for cid, rec in list(results.items()):
        if rec["outcome"] == "crash":
            alone = run_batch([cid])
            alone.pop("_left")
            again = alone.get(cid, {"outcome": "missing"})
            if again["outcome"] != "crash":
                rec["detail"] += (f" -- NOT reproduced alone (alone it {again['outcome']}): probably heap damage "
                                  f"from an earlier case in the same child")
    return results


@pytest.fixture(scope="module")
def results(request):
    selected = [item.callspec.params["case_id"] for item in request.session.items
                if item.module.__name__ == __name__ and hasattr(item, "callspec") and "case_id" in item.callspec.params]
    return run_all(selected or [c.id for c in CASES])


# ----------------------------------------------------------------------------- judging one case


def judge(case: fuzz_cases.FuzzCase, rec: dict) -> List[str]:
    """Why a case failed (empty when it passed)."""
    outcome = rec["outcome"]
    if outcome in ("crash", "hang"):
        return [f"{outcome}: {rec.get('detail', '')}"]
    if outcome == "harness_error":
        return [f"the test's own setup failed: {rec.get('detail')}"]
    if outcome == "returned":
        if case.kind == "bad":
            return [f"silently accepted: returned {rec.get('value')}"]
        if not rec.get("match"):
            return [f"returned a wrong result: {rec.get('detail')}"]
        return []
    # raised
    if case.kind == "extreme":
        return [f"rejected a valid value: {rec['type']}: {rec['message']}"]
    problems = []
    if not any(name in rec["mro"] for name in fuzz_cases.ALLOWED_ERRORS):
        problems.append(f"raised {rec['type']}, expected TypeError/ValueError/RuntimeError")
    msg = rec["message"]
    if not re.search(case.names, msg):
        problems.append(f"message does not name the argument (/{case.names}/)")
    if not re.search(rf"\b{case.function}\b", msg):
        problems.append(f"message does not name the function {case.function}")
    leaks = [p for p in fuzz_cases.UNCLEAR_PHRASES if p in msg]
    if leaks:
        problems.append(f"message shows internals {leaks}")
    if problems:
        problems.append(f"{rec['type']}: {msg[:600]}")
    return problems


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_fuzz_case(case_id, results):
    case = BY_ID[case_id]
    rec = results.get(case_id)
    assert rec is not None, f"{case_id}: no result from the children"
    problems = judge(case, rec)
    known = KNOWN_FAILING.get(case_id)
    note = f" (known failing at writing: {known})" if known else ""
    assert not problems, f"{case_id} [{case.kind}]{note}: " + "; ".join(problems)


# ----------------------------------------------------------------------------- the harness itself


def test_harness_detects_crash_hang_and_attributes_them(monkeypatch):
    """The parent notices a child that aborts or hangs, blames the running case and goes on."""
    ids = ["harness-ok", "harness-abort", "harness-after", "harness-hang", "harness-last"]
    module = os.path.join(TESTS_DIR, "fuzz_cases.py")
    with tempfile.TemporaryDirectory() as tmp:
        # A child that also knows the harness cases: a copy of fuzz_cases with them appended.
        with open(module) as src, open(os.path.join(tmp, "fuzz_cases.py"), "w") as dst:
            dst.write(src.read())
            dst.write(
                "\n_real_build = build_cases\n"
                "def build_cases():\n"
                "    import os, time\n"
                "    def crash(): os.abort()\n"
                "    def hang(): time.sleep(3600)\n"
                "    return _real_build()[:0] + [FuzzCase('harness-ok', 'bad', 'x', 'f', lambda: 1),\n"
                "        FuzzCase('harness-abort', 'bad', 'x', 'f', crash), FuzzCase('harness-after', 'bad', 'x', 'f', lambda: 2),\n"
                "        FuzzCase('harness-hang', 'bad', 'x', 'f', hang), FuzzCase('harness-last', 'bad', 'x', 'f', lambda: 3)]\n")
        monkeypatch.setattr(sys.modules[__name__], "TESTS_DIR", tmp)
        monkeypatch.setattr(sys.modules[__name__], "CASE_TIMEOUT_S", 3.0)
        res = run_all(ids)
    assert res["harness-ok"]["outcome"] == "returned"
    assert res["harness-abort"]["outcome"] == "crash" and "SIGABRT" in res["harness-abort"]["detail"]
    assert "NOT reproduced" not in res["harness-abort"]["detail"]
    assert res["harness-hang"]["outcome"] == "hang"
    assert res["harness-after"]["outcome"] == "returned" and res["harness-last"]["outcome"] == "returned"
    ok_case = fuzz_cases.FuzzCase("harness-ok", "bad", r"x", "f", lambda: 1)
    assert judge(ok_case, res["harness-ok"])[0].startswith("silently accepted")


def test_case_ids_cover_every_argument():
    ids = " ".join(BY_ID)
    for arg in ("q", "k", "v", "window", "causal", "dilation", "global_mask", "alibi_slopes", "score", "sigmoid_bias",
                "softcap", "scale", "return_lse"):
        assert f"attn-{arg}-" in ids, arg
    for fn in ("rot", "rotqk"):
        for arg in ("cos", "sin", "position_ids", "interleaved"):
            assert f"{fn}-{arg}-" in ids, (fn, arg)
    assert "rot-x-meta" in ids and "rotqk-k-meta" in ids and "rotqk-q-meta" in ids
    assert set(KNOWN_FAILING) <= set(BY_ID), set(KNOWN_FAILING) - set(BY_ID)
