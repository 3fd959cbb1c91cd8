"""The study's jobs and worker processes: which jobs a run has, that running them in worker
processes gives exactly the numbers of running them here (same threads per job), that a worker's
progress reaches the parent's bars and its exception the caller, and the new flags' checks."""

from __future__ import annotations

import csv
import time

import pytest
import torch

from longreach.extrapolate import cli, workers
from longreach.extrapolate.train import train

from test_extrapolate import tiny_text, tiny_without  # noqa: F401  (the module-scoped corpus fixture)


def test_jobs_group_each_trained_model_with_its_fine_tunes_longest_first():
    names = ["rope", "rope-pi", "alibi", "rope-pi-ft", "rope-yarn-ft", "swat"]
    jobs = cli.plan_jobs(names, seeds=[0, 1])
    assert jobs == [cli.Job(0, ("rope", "rope-pi-ft", "rope-yarn-ft")), cli.Job(1, ("rope", "rope-pi-ft", "rope-yarn-ft")),
                    cli.Job(0, ("alibi",)), cli.Job(0, ("swat",)), cli.Job(1, ("alibi",)), cli.Job(1, ("swat",))]
    # A fine-tune alone still brings in the model it starts from, in the same job.
    assert cli.plan_jobs(["rope-yarn-ft"], seeds=[5]) == [cli.Job(5, ("rope", "rope-yarn-ft"))]


def _rows(path):
    with open(path, newline="") as f:
        return [(r["scheme"], r["seed"], r["eval_len"], r["bits_per_byte"], r["second_half_alone_bpb"])
                for r in csv.DictReader(f)]


def test_worker_processes_give_the_numbers_of_one_process(tiny_text, tmp_path):  # noqa: F811
    """2 seeds x (rope with a fine-tune, alibi) = 4 jobs on 2 one-thread workers, against the same
    jobs run here on one thread: the same CSV, digit for digit, and the same training curves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--data", str(tiny_text), "--schemes", "rope-yarn,rope-pi-ft,alibi-pi"] + tiny_without(
            "--seeds", "--workers") + ["--seeds", "2", "--finetune-steps", "2"]
        cli.main(argv + ["--workers", "1", "--out", str(tmp_path / "one")])
        cli.main(argv + ["--workers", "2", "--out", str(tmp_path / "two")])
    finally:
        torch.set_num_threads(threads)
    one, two = _rows(tmp_path / "one" / "results.csv"), _rows(tmp_path / "two" / "results.csv")
    assert one == two and len(one) == 3 * 2 * 3
    assert (tmp_path / "one" / "training.csv").read_text() == (tmp_path / "two" / "training.csv").read_text()
    assert "2 worker processes x 1 torch thread" in (tmp_path / "two" / "results.md").read_text()


class _SlowToPickle:
    """Pickles (in the worker queue's feeder thread) as a plain string, half a second late: the
    job's result then reaches the parent before its bar's last messages do."""

    def __init__(self, text):
        self.text = text

    def __reduce__(self):
        time.sleep(0.5)
        return (str, (self.text,))


def _job_with_progress(job, shared, progress):
    """A job for run_jobs: 3 steps of a bar (forwarded only at close, since 3 < _FORWARD_EVERY),
    a postfix that is slow to send, returns what it was given."""
    bar = progress(f"job {job}", 3) if progress else None
    for _ in range(3):
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.set_postfix({"job": _SlowToPickle(f"finished {job}")})
        bar.close()
    return (job, shared, torch.get_num_threads())


def _failing_job(job, shared, progress):
    if job == 1:
        raise FloatingPointError(f"job {job}: training loss became nan")
    return job


def test_run_jobs_keeps_order_threads_and_forwards_progress(capsys):
    out = workers.run_jobs(_job_with_progress, [3, 1, 2], shared="data", workers=2, threads_per_worker=1,
                           progress=True)
    assert out == [(3, "data", 1), (1, "data", 1), (2, "data", 1)]
    err = capsys.readouterr().err
    # The parent drew each job's bar to its end, though the result came before the last messages.
    assert all(f"job {j}" in err and f"finished {j}" in err for j in (1, 2, 3)) and "3/3" in err
    # One worker: the jobs run here, with this process's bars (here: none).
    assert workers.run_jobs(_job_with_progress, [7], shared=0, workers=1, threads_per_worker=1,
                            progress=False) == [(7, 0, torch.get_num_threads())]


def test_a_workers_exception_reaches_the_caller():
    with pytest.raises(FloatingPointError, match="job 1: training loss became nan"):
        workers.run_jobs(_failing_job, [0, 1, 2, 3], shared=None, workers=2, threads_per_worker=1, progress=False)
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        workers.run_jobs(_failing_job, [0], shared=None, workers=0, threads_per_worker=1, progress=False)


@pytest.mark.parametrize("argv, match", [
    (["--workers", "0"], r"--workers: expected a positive integer, got 0"),
    (["--precision", "float16"], r"--precision: invalid choice: 'float16'"),
    (["--optimizer", "sgd"], r"--optimizer: invalid choice: 'sgd'"),
])
def test_bad_worker_precision_and_optimizer_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert match.replace("\\", "") in capsys.readouterr().err


def test_workers_default_and_cap():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = cli.parse_args([])  # 3 seeds x 4 trained models = 12 jobs
        assert (args.workers, args.threads_per_worker) == (2, 1)
        args = cli.parse_args(["--seeds", "1", "--schemes", "alibi", "--workers", "4"])
        assert (args.workers, args.threads_per_worker) == (1, 2)  # one job: no more workers than jobs
    finally:
        torch.set_num_threads(threads)


def test_precision_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(cli, "cpu_has_amx", lambda: True)
    assert cli.resolve_precision("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(cli, "cpu_has_amx", lambda: False)
    assert cli.resolve_precision("auto", "cpu") == "float32"
    assert cli.resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert cli.parse_args(["--precision", "float32"]).precision == "float32"
    assert cli.autocast_dtype(cli.parse_args(["--precision", "bfloat16"])) is torch.bfloat16


class _Probe(torch.nn.Module):
    """Records the dtype its linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 256)
        self.dtypes = []

    def forward(self, ids, position_ids=None):
        out = self.linear(torch.nn.functional.one_hot(ids, 4).float())
        self.dtypes.append(out.dtype)
        return out


class _Sampler:
    def next(self):
        ids = torch.randint(0, 4, (2, 8), generator=torch.Generator().manual_seed(0))
        return ids, ids


@pytest.mark.parametrize("autocast, expected", [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_train_autocasts_the_forward_only(autocast, expected):
    model = _Probe()
    result = train(model, _Sampler(), steps=2, lr=1e-3, progress=False, autocast=autocast)
    assert model.dtypes == [expected, expected]
    assert model.linear.weight.dtype == torch.float32  # the weights (and AdamW's state) stay float32
    assert len(result.losses) == 2 and all(l > 0 for l in result.losses)
