"""Runs the study's independent jobs (one seed's trained model and what is evaluated on it) in
worker processes, each with its own few torch threads.

Why processes: the study's models are small (width 128, sequences of 256 bytes), and their
matmuls scale poorly over threads; two single-thread processes train 2.2x as many steps per
second as one process with 2 threads (docs/extrapolation.md, "Run time and the profiles").

Determinism: a job's numbers depend only on its seed, the settings and its thread count, not on
which worker runs it or what else runs beside it, so `--workers 2` (one thread each) gives the
same table as `--workers 1` with one thread.

Progress: a worker's training and evaluation loops get `RemoteBar`s instead of tqdm bars; they
forward their updates through a queue to the parent, which draws one tqdm bar per run.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Dict, List, Sequence, Set, Tuple

import torch
from tqdm.auto import tqdm

# A worker forwards a bar's count at most this often (every n-th update, and at close).
_FORWARD_EVERY = 5
# How long the parent waits, once every job has returned, for their last bar messages. They are
# already sent, so this bounds a wait that normally takes milliseconds.
_LAST_MESSAGES_TIMEOUT_S = 30.0

_worker_state: Dict[str, Any] = {}


class RemoteBar:
    """tqdm's update / set_postfix / close, forwarded to the parent process's bar of this id."""

    def __init__(self, messages, key: Tuple[int, int], desc: str, total: int):
        self._messages = messages
        self._key = key
        self._pending = 0
        messages.put(("open", key, desc, total))

    def update(self, n: int = 1) -> None:
        self._pending += n
        if self._pending >= _FORWARD_EVERY:
            self._flush()

    def set_postfix(self, postfix: Dict[str, str]) -> None:
        self._messages.put(("postfix", self._key, dict(postfix)))

    def close(self) -> None:
        self._flush()
        self._messages.put(("close", self._key))

    def _flush(self) -> None:
        if self._pending:
            self._messages.put(("update", self._key, self._pending))
            self._pending = 0


def _initialize(threads: int, messages, shared: Any) -> None:
    torch.set_num_threads(threads)
    _worker_state.update(messages=messages, shared=shared, bars=0)


def _bar_factory(job_index: int) -> Callable[[str, int], RemoteBar]:
    messages = _worker_state["messages"]

    def make(desc: str, total: int) -> RemoteBar:
        _worker_state["bars"] += 1
        return RemoteBar(messages, (job_index, _worker_state["bars"]), desc, total)

    return make


def _run_in_worker(fn: Callable, job_index: int, job: Any, progress: bool) -> Any:
    bars = _bar_factory(job_index) if progress else False
    try:
        return fn(job, _worker_state["shared"], bars)
    finally:
        # The result returns through the pool's own pipe, which can overtake this queue. The queue
        # keeps one process's messages in order, so once the parent reads this, it has every bar
        # message of the job.
        _worker_state["messages"].put(("done", job_index))


class _ParentBars:
    """The parent's tqdm bars, one per (job, bar) id, drawn from the workers' messages."""

    def __init__(self):
        self._bars: Dict[Tuple[int, int], tqdm] = {}

    def handle(self, message) -> None:
        kind, key = message[0], message[1]
        if kind == "open":
            self._bars[key] = tqdm(total=message[3], desc=message[2], leave=True, dynamic_ncols=True)
        elif key in self._bars:
            bar = self._bars[key]
            if kind == "update":
                bar.update(message[2])
            elif kind == "postfix":
                bar.set_postfix(message[2])
            elif kind == "close":
                bar.close()
                del self._bars[key]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def run_jobs(fn: Callable[[Any, Any, Any], Any], jobs: Sequence[Any], shared: Any, workers: int,
             threads_per_worker: int, progress: bool) -> List[Any]:
    """``[fn(job, shared, progress) for job in jobs]``, computed by ``workers`` processes.

    ``fn`` must be a module-level function (it is pickled to the workers, as are ``jobs`` and,
    once per worker, ``shared``). ``progress`` is what fn receives for train() / evaluate():
    a factory of bars forwarded to this process, or False. Jobs are handed out in the order
    given (put the longest first). With ``workers`` = 1 they run here, one after another, on
    this process's threads. A job's exception is raised here after the other workers are
    stopped.
    """
    if workers < 1:
        raise ValueError(f"run_jobs: workers must be at least 1, got {workers}")
    if workers == 1:
        return [fn(job, shared, progress) for job in jobs]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP threads
    messages = context.Queue()
    bars = _ParentBars()
    results: List[Any] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context, initializer=_initialize,
                             initargs=(threads_per_worker, messages, shared)) as pool:
        pending: Dict[Future, int] = {pool.submit(_run_in_worker, fn, i, job, progress): i
                                      for i, job in enumerate(jobs)}
        reported: Set[int] = set()  # the jobs whose messages have all been read
        try:
            while pending:
                reported |= _drain(messages, bars, timeout=0.2)
                done, _ = wait(list(pending), timeout=0, return_when=FIRST_COMPLETED)
                for future in done:
                    results[pending.pop(future)] = future.result()  # raises the job's exception
            # Every job has returned; its last bar messages may still be in the queue's pipe.
            deadline = time.monotonic() + _LAST_MESSAGES_TIMEOUT_S
            while len(reported) < len(jobs) and time.monotonic() < deadline:
                reported |= _drain(messages, bars, timeout=0.2)
        except BaseException:
            # Stop the other jobs now rather than after their remaining minutes of training.
            for future in pending:
                future.cancel()
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise
        finally:
            bars.close()
    return results


def _drain(messages, bars: _ParentBars, timeout: float) -> Set[int]:
    """Hand every queued bar message to ``bars``, waiting up to ``timeout`` seconds for the first;
    returns the jobs whose "done" message came."""
    finished: Set[int] = set()
    try:
        message = messages.get(timeout=timeout)
    except queue_mod.Empty:
        return finished
    while True:
        if message[0] == "done":
            finished.add(message[1])
        else:
            bars.handle(message)
        try:
            message = messages.get_nowait()
        except queue_mod.Empty:
            return finished
