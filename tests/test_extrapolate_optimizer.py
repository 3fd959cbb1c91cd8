"""The study's optimizers (train.make_optimizers): Muon on the weight matrices and AdamW on the
rest, or AdamW alone; checked against what each optimizer's first step must do, not against a
second run of the same code, and the --optimizer / --muon-lr flags (their errors sit with the
other flags': test_extrapolate.py, test_extrapolate_workers.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from longreach.extrapolate import cli
from longreach.extrapolate.model import ModelDims, build_model
from longreach.extrapolate.muon import BatchedMuon
from longreach.extrapolate.schemes import SCHEMES
from longreach.extrapolate.train import MUON_WEIGHT_DECAY, make_optimizers, muon_parameters, train

DIMS = ModelDims(d_model=32, layers=2, heads=4)


def _model():
    return build_model(SCHEMES["rope"], DIMS, None, 32, seed=0)


def test_muon_takes_the_weight_matrices_and_adamw_the_rest():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for p in muon_parameters(model)}
    assert matrices == {f"blocks.{i}.{w}.weight" for i in range(2)
                        for w in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.0", "mlp.2")}
    # The output layer is tied to the embedding, so neither goes to Muon.
    assert model.lm_head.weight is model.embed.weight
    (muon, muon_peak), (adamw, adamw_peak) = make_optimizers(model, 1e-3, 0.02)
    assert isinstance(muon, BatchedMuon) and isinstance(adamw, torch.optim.AdamW)
    assert (muon_peak, adamw_peak) == (0.02, 1e-3)
    given = [id(p) for opt in (muon, adamw) for g in opt.param_groups for p in g["params"]]
    assert sorted(given) == sorted(id(p) for p in model.parameters())  # each parameter once
    # A model with no matrices, or nothing else, gets one optimizer (torch's refuse empty lists).
    assert [type(o) for o, _ in make_optimizers(torch.nn.Embedding(4, 3), 1e-3, 0.02)] == [torch.optim.AdamW]
    assert [type(o) for o, _ in make_optimizers(torch.nn.Linear(3, 3, bias=False), 1e-3, 0.02)] == [BatchedMuon]
    only = make_optimizers(model, 1e-3, None)
    assert len(only) == 1 and isinstance(only[0][0], torch.optim.AdamW)
    assert len(only[0][0].param_groups[0]["params"]) == len(list(model.parameters()))


class _OneBatch:
    def __init__(self):
        self.ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))

    def next(self):
        return self.ids[:, :-1], self.ids[:, 1:]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_first_step_is_the_optimizers_own(optimizer):
    """One step at the peak (steps=1: no warm-up). Muon moves a matrix by an orthogonalised
    momentum: undoing its decoupled weight decay, the update's singular values are near 1
    (Newton-Schulz lands them in about [0.5, 1.5]), times lr * sqrt(max(1, rows / cols)). AdamW's
    first step moves every weight with a gradient by lr * sign(gradient)."""
    lr, muon_lr = 1e-3, 0.02
    model = _model()
    before = copy.deepcopy(model.state_dict())
    train(model, _OneBatch(), steps=1, lr=lr, progress=False, muon_lr=muon_lr if optimizer == "muon" else None)
    after = model.state_dict()

    # The MLP's output matrix (32 x 128): its input, GELU's output, has no null direction. (A matrix
    # after a LayerNorm has one: the normalised features sum to 0, so its gradient's smallest singular
    # value is 0 and stays small after the orthogonalisation.)
    w0, w1 = before["blocks.0.mlp.2.weight"], after["blocks.0.mlp.2.weight"]
    if optimizer == "muon":
        adjusted = muon_lr * max(1.0, w0.shape[0] / w0.shape[1]) ** 0.5
        update = (w1 - w0 * (1 - muon_lr * MUON_WEIGHT_DECAY)) / adjusted
        s = torch.linalg.svdvals(update)  # descending
        # Five Newton-Schulz steps cannot lift the gradient's smallest singular values all the way.
        assert s.max() < 1.5 and s[: 3 * len(s) // 4].min() > 0.5, s
    else:
        step = (w1 - w0 * (1 - lr * 0.1)).abs() / lr
        # Each element by lr (but those whose gradient is within a few eps of 0), not orthogonal.
        assert step.max() < 1 + 1e-3 and (step > 0.99).float().mean() > 0.95
        assert torch.linalg.svdvals(step).max() > 3
    # The embedding is AdamW's with either optimizer: rows of bytes in the batch move by lr each.
    e0, e1 = before["embed.weight"], after["embed.weight"]
    seen = torch.unique(_OneBatch().ids[:, :-1])
    step = (e1 - e0 * (1 - lr * 0.1))[seen].abs() / lr
    assert step.max() < 1 + 1e-3 and (step > 0.99).float().mean() > 0.95


def test_optimizer_flags():
    args = cli.parse_args([])
    assert args.optimizer == "muon" and args.muon_lr == cli.PROFILES["default"].muon_lr
    assert cli.training_muon_lr(args) == args.muon_lr
    assert cli.training_muon_lr(cli.parse_args(["--optimizer", "adamw"])) is None
    assert cli.parse_args(["--muon-lr", "0.01"]).muon_lr == 0.01


def test_batched_muon_is_torchs_muon():
    """Three steps of BatchedMuon and of torch.optim.Muon from the same weights and gradients (8
    square matrices and 4 tall ones, as the study's model, and a wide one alone): the same weights
    up to bfloat16 rounding of the orthogonalised updates (batched and single products may add in
    another order)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 16)] * 8 + [(64, 16)] * 4 + [(8, 24)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opt_ours = BatchedMuon(ours, lr=0.02, momentum=0.95, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b, s, w0 in zip(ours, theirs, shapes, start):
        # The weights moved by up to ~0.04; a bfloat16 ulp of an update is ~2e-5 of it per step
        # (on this machine the two agree bit for bit).
        assert (b - w0).abs().max() > 0.01
        assert torch.allclose(a, b, rtol=0, atol=1e-4), s


def test_batched_muon_takes_matrices_only():
    with pytest.raises(ValueError, match=r"BatchedMuon: parameters must be matrices, got shape \(3,\)"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3))], lr=0.02)
