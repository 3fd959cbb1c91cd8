"""Launch `world` processes of tests/distributed_worker.py and collect their JSON lines, with a
hard time bound: a process still running at the deadline is killed and reported, so a hang
fails the test instead of stalling the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(suite: str, world: int, timeout: float = 60.0) -> List[List[dict]]:
    """Run the suite on `world` gloo ranks; returns each rank's records. Raises AssertionError
    (with the ranks' output) if a rank fails or runs past `timeout` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [subprocess.Popen([sys.executable, str(WORKER), suite, str(rank), str(world), init_file],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in range(world)]
        deadline = time.monotonic() + timeout
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                details = [p.communicate() for p in procs]
                raise AssertionError(f"{suite} on {world} ranks ran past {timeout} s (a hang?); stderr of rank 0:\n"
                                     f"{details[0][1][-3000:]}")
        for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
            assert proc.returncode == 0, f"rank {rank} of {suite} failed (rc {proc.returncode}):\n{err[-4000:]}"
        return [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]
