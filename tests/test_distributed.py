"""longreach.distributed: context-parallel local attention over gloo processes on CPU.

Outputs and every gradient of 2 and 4 ranks equal the single-process op over the whole sequence
(float64 to 1e-12, float32 to 1e-5, relative to the values' size); the bytes each rank sends per
layer equal its halo and do not grow with the shard; a mismatch between ranks raises on every
rank. The ranks run in subprocesses (tests/distributed_worker.py) under a hard time bound
(tests/distributed_launch.py), several cases per launch to keep process start-up rare.
"""

from __future__ import annotations

import pytest
import torch

import longreach.distributed as cp
from distributed_launch import launch
from longreach.distributed.layout import ShardLayout

# bfloat16: the sharded and unsharded calls round partial sums differently (a few ulps of 2^-8)
TOLERANCE = {"torch.float64": 1e-12, "torch.float32": 1e-5, "torch.bfloat16": 2e-2}
SLOPES_TOLERANCE = 1e-5  # slope gradients are float32 (the slopes' dtype) on every path


# ----------------------------------------------------------- the plan (no processes) --

def _needed(layout: ShardLayout, rank: int):
    """Positions rank's rows reach by their window, outside its shard (written out directly)."""
    start, end = layout.start(rank), layout.end(rank)
    if start == end:
        return set()
    reach_left = layout.total if layout.left < 0 else layout.left * layout.dilation
    reach_right = layout.total if layout.right < 0 else layout.right * layout.dilation
    return {p for p in range(layout.total) if (start - reach_left <= p < start) or (end <= p < end + reach_right)}


@pytest.mark.parametrize("lengths", [(13, 9), (7, 0, 12, 5), (0, 0, 4), (3, 3, 3, 3, 3), (5,)])
@pytest.mark.parametrize("left,right,dilation", [(3, 0, 1), (15, 0, 1), (4, 3, 3), (-1, 2, 1), (1000, -1, 2)])
def test_plan_covers_exactly_the_halo(lengths, left, right, dilation):
    layout = ShardLayout(lengths, left, right, dilation)
    for rank in range(layout.world):
        received = [(owner, p) for owner, lo, hi in layout.receives(rank) for p in range(lo, hi)]
        assert sorted(p for _, p in received) == sorted(_needed(layout, rank))  # each position once
        for owner, p in received:
            assert layout.start(owner) <= p < layout.end(owner) and owner != rank
        # what rank sends is what its readers receive from it
        sends = sorted((reader, lo, hi) for reader, lo, hi in layout.sends(rank))
        expected = sorted((reader, lo, hi) for reader in range(layout.world)
                          for owner, lo, hi in layout.receives(reader) if owner == rank)
        assert sends == expected


def test_multi_hop_plan_reads_several_owners():
    layout = ShardLayout((7, 0, 12, 5), 15, 0, 1)
    assert layout.receives(3) == [(0, 4, 7), (2, 7, 19)]  # over the empty rank 1
    assert layout.receives(2) == [(0, 0, 7)]
    assert layout.receives(1) == [] and layout.sends(1) == []
    layout = ShardLayout((4, 4, 4, 4), 9, 0, 1)
    assert layout.receives(3) == [(0, 3, 4), (1, 4, 8), (2, 8, 12)]


# --------------------------------------------------------------------- processes --

@pytest.mark.parametrize("world", [2, 4])
def test_outputs_and_gradients_equal_the_single_process_op(world):
    ranks = launch("equality", world, timeout=180)
    names = [r["name"] for r in ranks[0]]
    assert len(names) >= 6
    for rank, records in enumerate(ranks):
        assert [r["name"] for r in records] == names
        for r in records:
            tol = TOLERANCE[r["dtype"]]
            where = f"{r['name']} ({r['dtype']}) on rank {rank} of {world}"
            assert r["finite"], where
            for field in ("out", "dq", "dk", "dv"):
                assert r[field] <= tol, f"{field} differs by {r[field]:.3g} in {where}"
            if "dslopes" in r:
                assert r["dslopes"] <= SLOPES_TOLERANCE, f"dslopes differs by {r['dslopes']:.3g} in {where}"


def test_bytes_sent_equal_the_halo_and_stay_flat():
    ranks = launch("bytes", 2, timeout=180)
    # The forward posts the halo, runs the rows that need none (rank 1: rows 64..999 of a causal
    # 65-key window), then waits and runs the first 64 rows; rank 0 needs no halo: one call.
    assert ranks[0][-1] == {"kind": "order", "events": ["post", "wait", "op(1000 rows)"]}
    assert ranks[1][-1] == {"kind": "order", "events": ["post", "op(936 rows)", "wait", "op(64 rows)"]}
    for rank, records in enumerate(ranks):
        records = [r for r in records if r["kind"] == "bytes"]
        assert {r["shard"] for r in records} == {8192, 32768, 131072}
        for r in records:
            per_position = 2 * r["heads"] * r["head_dim"] * r["itemsize"]  # keys and values
            left, right = r["window"]
            # rank 0's last `left` positions go to rank 1, rank 1's first `right` to rank 0;
            # the backward sends the same pieces' gradients the other way.
            forward = (left if rank == 0 else right) * per_position
            backward = (right if rank == 0 else left) * per_position
            assert (r["forward"], r["backward"]) == (forward, backward), r
            assert r["forward_messages"] == (1 if forward else 0)


EXPECTED_ERRORS = {
    "head dim differs": "ValueError", "dtype differs": "TypeError", "heads differ": "ValueError",
    "window differs": "ValueError", "alibi slopes differ": "ValueError", "alibi on one rank only": "ValueError",
    "requires_grad differs": "ValueError", "3-D q on one rank": "ValueError", "bad dilation everywhere": "ValueError",
    "causal globals on one rank": "ValueError",
}


def test_bad_input_raises_on_every_rank_without_hanging():
    ranks = launch("errors", 2, timeout=180)
    for rank, records in enumerate(ranks):
        errors = {r["name"]: r for r in records if r["kind"] == "error"}
        assert set(errors) == set(EXPECTED_ERRORS)
        for name, expected in EXPECTED_ERRORS.items():
            assert errors[name]["type"] == expected, (rank, errors[name])
            assert "longreach.distributed.local_attention" in errors[name]["message"]
        assert "q must be a 4-D tensor" in errors["3-D q on one rank"]["message"] if rank == 1 else \
            "rank(s) [1]" in errors["3-D q on one rank"]["message"]
        assert "head dim D, got [8, 16]" in errors["head dim differs"]["message"]
        assert records[-1] == {"kind": "after errors", "ok": True, "shape": [1, 2, 5, 8]}  # the group still works


def test_not_initialised_raises():
    assert not torch.distributed.is_initialized()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.local_attention(q, q, q, window=(2, 0))


# ------------------------------------------------------------- sharding, the example --

def test_shard_sequence_splits_contiguously_with_true_positions():
    ids = torch.arange(2 * 11).view(2, 11)
    labels = cp.next_token_labels(ids)
    assert labels[:, :-1].equal(ids[:, 1:]) and (labels[:, -1] == -100).all()
    shards = [cp.shard_sequence(ids, labels=labels, rank=r, world=3) for r in range(3)]
    assert [s.input_ids.shape[1] for s in shards] == [4, 4, 3] and shards[0].lengths == (4, 4, 3)
    assert torch.cat([s.input_ids for s in shards], 1).equal(ids)
    assert torch.cat([s.labels for s in shards], 1).equal(labels)  # shifted before the split
    assert torch.cat([s.position_ids for s in shards], 1).equal(torch.arange(11)[None])
    assert [s.start for s in shards] == [0, 4, 8]
    assert cp.shard_lengths(2, 4) == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="rank and world"):
        cp.shard_sequence(ids, rank=3, world=3)
    with pytest.raises(ValueError, match="labels"):
        cp.shard_sequence(ids, labels=labels[:, :-1], rank=0, world=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.shard_sequence(ids)


def test_enable_context_parallel_needs_attention_modules():
    from longreach.nn import LocalTransformerConfig, LocalTransformerLM

    with pytest.raises(ValueError, match="no LocalSelfAttention"):
        cp.enable_context_parallel(torch.nn.Linear(2, 2))
    model = cp.enable_context_parallel(LocalTransformerLM(LocalTransformerConfig(d_model=16, n_heads=2, window=4)))
    with pytest.raises(ValueError, match="context parallelism takes no KV cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache())


def test_example_trains_on_two_ranks_and_matches_one_process():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "train_context_parallel.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               "--steps", "2", "--seq-len", "96", "--window", "16", "--check", "--timeout", "40"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=180,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    checks = re.findall(r"loss sharded ([\d.]+) unsharded ([\d.]+), max gradient difference ([\d.e+-]+)", run.stdout)
    assert len(checks) == 2, run.stdout
    for sharded, unsharded, grad in checks:
        assert abs(float(sharded) - float(unsharded)) <= 1e-5 and float(grad) <= 1e-5, run.stdout
    assert "step 1: loss" in run.stdout


def test_hf_llama_with_the_sequence_split_equals_unsharded():
    pytest.importorskip("transformers")
    ranks = launch("hf", 2, timeout=180)
    assert [r[0]["rows"] for r in ranks] == [19, 18]
    for rank, (record,) in enumerate(ranks):
        assert record["out"] <= 1e-12 and record["grads"] <= 1e-12, (rank, record)


def test_fsdp2_and_context_parallel_on_a_2x2_mesh():
    """One training step, FSDP2 over the flattened (dp=2, cp=2) mesh, each sequence split over cp:
    the full parameter gradients equal one process's over the whole batch."""
    ranks = launch("fsdp", 4, timeout=180)
    assert sorted((r[0]["dp"], r[0]["cp"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank, (record,) in enumerate(ranks):
        assert record["rows"] == (12 if record["cp"] == 0 else 11)
        assert record["grads"] <= 1e-12, (rank, record)
