"""One rank of the multi-process context-parallel tests (tests/test_distributed.py launches
`world` of these with tests/distributed_launch.py). Runs a suite of cases and prints one JSON
line per result to stdout; the test process checks them. Run as a script:

    python tests/distributed_worker.py SUITE RANK WORLD INIT_FILE
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import longreach  # noqa: E402
import longreach.distributed  # noqa: E402

TIMEOUT = timedelta(seconds=60)  # every collective; the launcher's bound is above it


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------- equality --

def equality_cases(world: int):
    """(name, case) pairs: every feature against the single-process op. lengths: the shards."""
    f64 = torch.float64
    if world == 2:
        return [
            ("short window causal", dict(lengths=[13, 9], window=(3, 0), causal=True)),
            ("bidirectional multi-hop dilation 2", dict(lengths=[6, 11], window=(9, 7), dilation=2)),
            ("unbounded left, softcap, GQA", dict(lengths=[10, 10], window=(None, 2), hq=4, hk=2, softcap=3.0)),
            ("sigmoid alibi causal", dict(lengths=[12, 7], window=(5, 0), causal=True, score="sigmoid",
                                          alibi=True)),
            ("global tokens both ranks", dict(lengths=[11, 9], window=(2, 1), globals_=[[0, 5, 14], [3, 12]])),
            ("float32 window > total", dict(lengths=[8, 9], window=(1000, 1000), dtype=torch.float32)),
            ("bfloat16 globals GQA", dict(lengths=[9, 12], window=(4, 2), hq=4, hk=2, globals_=[[2, 17], [10]],
                                          dtype=torch.bfloat16)),
            ("sigmoid globals without alibi", dict(lengths=[10, 7], window=(3, 3), score="sigmoid",
                                                   globals_=[[1, 15], [8]], softcap=4.0)),
        ]
    return [
        ("uneven, empty shard, multi-hop causal", dict(lengths=[7, 0, 12, 5], window=(15, 0), causal=True)),
        ("bidirectional dilation 3 alibi", dict(lengths=[5, 9, 4, 8], window=(4, 3), dilation=3, alibi=True,
                                                hq=4, hk=1)),
        ("globals on several ranks, alibi, GQA", dict(lengths=[6, 8, 0, 9], window=(2, 2), hq=4, hk=2, alibi=True,
                                                       globals_=[[1, 9, 20], [7, 15]])),
        ("sigmoid bidirectional globals dilation 2", dict(lengths=[5, 6, 7, 4], window=(3, 2), dilation=2,
                                                          score="sigmoid", alibi=True, globals_=[[4, 16], [11]])),
        ("sigmoid explicit bias softcap", dict(lengths=[4, 4, 9, 3], window=(6, 6), score="sigmoid",
                                               sigmoid_bias=-1.5, softcap=2.0)),
        ("float32 globals window (5, 0) dilation 2", dict(lengths=[9, 3, 6, 7], window=(5, 0), dilation=2,
                                                   globals_=[[2, 18], [2]], dtype=torch.float32, alibi=True)),
        ("per-batch slopes, scale", dict(lengths=[3, 10, 2, 6], window=(7, 1), alibi="batch", scale=0.7,
                                         dtype=f64)),
    ]


def run_equality(rank: int, world: int) -> None:
    for index, (name, case) in enumerate(equality_cases(world)):
        errors = check_case(rank, world, index, **case)
        emit(kind="equality", name=name, dtype=str(case.get("dtype", torch.float64)), **errors)
    if world == 2:
        run_compiled(rank)


def run_compiled(rank: int) -> None:
    """Inside torch.compile (the graph splits at the call): the eager values and gradients."""
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(1, 2, 9 + rank, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def layer(x):
        y = torch.tanh(x) * 2
        out = longreach.distributed.local_attention(y, y, y, window=(4, 0), causal=True)
        return (out.sin() * y).sum()

    eager = layer(x)
    (grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(layer, backend="aot_eager")(x)
    (compiled_grad,) = torch.autograd.grad(compiled, x)
    emit(kind="equality", name="inside torch.compile", dtype="torch.float64", out=abs(float(compiled - eager)),
         dq=float((compiled_grad - grad).abs().max()), dk=0.0, dv=0.0, finite=bool(torch.isfinite(compiled)))


def check_case(rank, world, seed, *, lengths, window, causal=False, dilation=1, hq=2, hk=2, d=8, batch=2,
               score="softmax", alibi=False, globals_=None, softcap=None, scale=None, sigmoid_bias=None,
               dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + seed)  # the same full tensors on every rank
    total = sum(lengths)
    q = torch.randn(batch, hq, total, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, hk, total, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, hk, total, d, generator=gen, dtype=dtype)
    grad = torch.randn(batch, hq, total, d, generator=gen, dtype=dtype)
    slopes = None
    if alibi:
        shape = (batch, hq) if alibi == "batch" else (hq,)
        slopes = (torch.rand(shape, generator=gen) - 0.5) * 0.6  # signed
    mask = None
    if globals_:
        mask = torch.zeros(batch, total, dtype=torch.bool)
        for b, positions in enumerate(globals_):
            mask[b, positions] = True
    options = dict(window=window, causal=causal, dilation=dilation, score=score, softcap=softcap, scale=scale,
                   sigmoid_bias=sigmoid_bias)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]

    # The oracle: the single-process op over the whole sequence.
    rq, rk, rv = leaves(q, k, v)
    rs = None if slopes is None else slopes.clone().requires_grad_(True)
    ref = longreach.local_attention(rq, rk, rv, global_mask=mask, alibi_slopes=rs, **options)
    (ref * grad).sum().backward()

    start = sum(lengths[:rank])
    own = slice(start, start + lengths[rank])
    sq, sk, sv = leaves(q[:, :, own], k[:, :, own], v[:, :, own])
    ss = None if slopes is None else slopes.clone().requires_grad_(True)
    own_mask = None if mask is None or not mask[:, own].any() else mask[:, own]  # None: no globals here
    out = longreach.distributed.local_attention(sq, sk, sv, global_mask=own_mask,
                                                alibi_slopes=ss, **options)
    (out * grad[:, :, own]).sum().backward()

    def err(a, b):  # relative to the values' size (the slope gradients are float32 sums over many pairs)
        if not a.numel():
            return 0.0
        return float((a.double() - b.double()).abs().max()) / max(1.0, float(b.double().abs().max()))

    errors = dict(out=err(out, ref[:, :, own]), dq=err(sq.grad, rq.grad[:, :, own]),
                  dk=err(sk.grad, rk.grad[:, :, own]), dv=err(sv.grad, rv.grad[:, :, own]))
    if ss is not None:
        dist.all_reduce(ss.grad)  # a replicated parameter: its gradient is the group's sum
        errors["dslopes"] = err(ss.grad, rs.grad)
    errors["finite"] = bool(torch.isfinite(out).all())
    return errors


# ------------------------------------------------------------------------ bytes --

def run_bytes(rank: int, world: int) -> None:
    """Bytes this rank sends point-to-point per layer (forward, backward), for growing shards."""
    sent = {"bytes": 0, "messages": 0}
    original = dist.batch_isend_irecv

    def counting(ops):
        for op in ops:
            if op.op in (dist.isend, dist.send):
                sent["bytes"] += op.tensor.numel() * op.tensor.element_size()
                sent["messages"] += 1
        return original(ops)

    dist.batch_isend_irecv = counting
    try:
        for shard in (8192, 32768, 131072):
            for window, causal in (((64, 0), True), ((32, 16), False)):
                q, k, v = (torch.randn(1, 2, shard, 8, dtype=torch.float32, requires_grad=True) for _ in range(3))
                sent.update(bytes=0, messages=0)
                out = longreach.distributed.local_attention(q, k, v, window=window, causal=causal)
                forward = dict(sent)
                sent.update(bytes=0, messages=0)
                out.sum().backward()
                emit(kind="bytes", shard=shard, window=list(window), causal=causal, forward=forward["bytes"],
                     forward_messages=forward["messages"], backward=sent["bytes"], heads=2, head_dim=8,
                     itemsize=4)
    finally:
        dist.batch_isend_irecv = original
    run_order(rank)


def run_order(rank: int) -> None:
    """The order of a forward's steps: the halo is posted, the interior rows run, then the wait."""
    from longreach import ops
    from longreach.distributed import exchange

    events = []
    post, op, wait = dist.batch_isend_irecv, ops.local_attention, exchange.PendingHalo.wait

    def record(name, fn):
        def wrapped(*args, **kwargs):
            events.append(name if name != "op" else f"op({args[0].shape[2]} rows)")
            return fn(*args, **kwargs)
        return wrapped

    dist.batch_isend_irecv, ops.local_attention = record("post", post), record("op", op)
    exchange.PendingHalo.wait = record("wait", wait)
    try:
        q, k, v = (torch.randn(1, 2, 1000, 8) for _ in range(3))
        longreach.distributed.local_attention(q, k, v, window=(64, 0), causal=True)
    finally:
        dist.batch_isend_irecv, ops.local_attention, exchange.PendingHalo.wait = post, op, wait
    emit(kind="order", events=events)


# -------------------------------------------------------------------- bad input --

def run_errors(rank: int, world: int) -> None:
    """Each mistake on one rank: every rank must raise (and not hang), then the group still works."""
    def attempt(name, q, k, v, **options):
        try:
            longreach.distributed.local_attention(q, k, v, **options)
        except (ValueError, TypeError, RuntimeError) as error:
            emit(kind="error", name=name, type=type(error).__name__, message=str(error))
        else:
            emit(kind="error", name=name, type=None, message="")

    def qkv(d=8, dtype=torch.float64, length=5, heads=2):
        return (torch.randn(1, heads, length, d, dtype=dtype), torch.randn(1, heads, length, d, dtype=dtype),
                torch.randn(1, heads, length, d, dtype=dtype))

    last = world - 1
    attempt("head dim differs", *qkv(d=16 if rank == last else 8), window=(2, 0))
    attempt("dtype differs", *qkv(dtype=torch.float32 if rank == last else torch.float64), window=(2, 0))
    attempt("heads differ", *qkv(heads=4 if rank == last else 2), window=(2, 0))
    attempt("window differs", *qkv(), window=(3 if rank == last else 2, 0))
    q, k, v = qkv()
    slopes = torch.tensor([0.1, -0.2]) + (0.05 if rank == last else 0.0)
    attempt("alibi slopes differ", *qkv(), window=(2, 0), alibi_slopes=slopes)
    attempt("alibi on one rank only", *qkv(), window=(2, 0), alibi_slopes=slopes if rank == last else None)
    q, k, v = qkv()
    attempt("requires_grad differs", q.requires_grad_(rank == last), k, v, window=(2, 0))
    attempt("3-D q on one rank", q[0] if rank == last else q, k, v, window=(2, 0))
    attempt("bad dilation everywhere", *qkv(), window=(2, 0), dilation=0)
    gm = torch.zeros(1, 5, dtype=torch.bool)
    gm[0, 1] = True
    attempt("causal globals on one rank", *qkv(), window=(2, 0), causal=True, global_mask=gm if rank == 0 else None)
    q, k, v = qkv()
    out = longreach.distributed.local_attention(q, k, v, window=(2, 0))
    emit(kind="after errors", ok=bool(torch.isfinite(out).all()), shape=list(out.shape))


def run_hf(rank: int, world: int) -> None:
    """A tiny Hugging Face Llama (longreach-patched, window 6) with its sequence split over the
    ranks: logits and every parameter gradient equal the unsharded model's."""
    import transformers

    import longreach.hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.3, attention_dropout=0.0)
    full = longreach.hf.patch(transformers.LlamaForCausalLM(config).double(), window=6)
    sharded = longreach.hf.patch(transformers.LlamaForCausalLM(config).double(), window=6)
    sharded.load_state_dict(full.state_dict())
    longreach.distributed.enable_context_parallel(sharded)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (2, 37), generator=gen)
    weights = torch.randn(2, 37, 61, generator=gen, dtype=torch.float64)
    ref = full(ids, use_cache=False).logits
    (ref * weights).sum().backward()
    shard = longreach.distributed.shard_sequence(ids)
    own = slice(shard.start, shard.start + shard.input_ids.shape[1])
    logits = sharded(shard.input_ids, position_ids=shard.position_ids, use_cache=False).logits
    (logits * weights[:, own]).sum().backward()
    grad_error = 0.0
    for p, r in zip(sharded.parameters(), full.parameters()):
        dist.all_reduce(p.grad)  # every rank's tokens reach every weight
        grad_error = max(grad_error, float((p.grad - r.grad).abs().max()) / max(1.0, float(r.grad.abs().max())))
    emit(kind="hf", out=float((logits - ref[:, own]).abs().max()), grads=grad_error, rows=logits.shape[1])


def run_fsdp(rank: int, world: int) -> None:
    """One training step on a (dp=2, cp=2) mesh: FSDP2 (fully_shard) over the flattened mesh,
    each sequence split over cp. Parameter gradients (full tensors) equal one process's over the
    whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from longreach.nn import LocalTransformerConfig, LocalTransformerLM

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    torch.manual_seed(0)
    config = LocalTransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=5)
    reference = LocalTransformerLM(config).double()
    model = LocalTransformerLM(config).double()
    model.load_state_dict(reference.state_dict())
    cp_group = mesh.get_group("cp")
    longreach.distributed.enable_context_parallel(model, cp_group)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp", "cp"]._flatten("dp_cp"))
    fully_shard(model, mesh=mesh["dp", "cp"]._flatten("dp_cp"))

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (4, 23), generator=gen)  # 2 rows per dp rank
    labels = longreach.distributed.next_token_labels(ids)
    ce = torch.nn.functional.cross_entropy
    ref_loss = ce(reference(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()

    dp = mesh.get_local_rank("dp")
    rows = slice(2 * dp, 2 * dp + 2)
    shard = longreach.distributed.shard_sequence(ids[rows], labels=labels[rows], mesh=mesh, mesh_dim="cp")
    logits = model(shard.input_ids, position_ids=shard.position_ids)
    count = (labels != -100).sum().double()  # the whole batch's tokens
    loss = ce(logits.flatten(0, 1), shard.labels.flatten(), ignore_index=-100, reduction="sum") / count
    # FSDP averages the gradients over its 4 ranks; the objective is their sum
    (loss * 4).backward()
    error = 0.0
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        full = p.grad.full_tensor()
        error = max(error, float((full - r.grad).abs().max()) / max(1.0, float(r.grad.abs().max())))
    emit(kind="fsdp", grads=error, dp=dp, cp=mesh.get_local_rank("cp"), rows=shard.input_ids.shape[1])


SUITES = {"equality": run_equality, "bytes": run_bytes, "errors": run_errors, "hf": run_hf, "fsdp": run_fsdp}


def main(argv) -> int:
    suite, rank, world, init_file = argv[1], int(argv[2]), int(argv[3]), argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        SUITES[suite](rank, world)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
