"""Data-parallel K-FAC: 2 processes x half batch against 1 process x full batch (float64).

Averaging mean-reduced gradients, factors and curvature products over equal shards
gives exactly the full batch's, so every deterministic configuration must reach the
same parameters as a single process up to round-off. Each test runs two gloo
processes on 127.0.0.1 (see ``harness.py``), bounded in time.
"""

from __future__ import annotations

import copy
import warnings
from datetime import timedelta

import pytest
import torch
from torch import nn

from curvkit.distributed.kfac import (
    DistributedCommunicator,
    assign_layers,
    flatten,
    make_kfac,
    unflatten,
)
from curvkit.errors import ShapeError
from curvkit.optim import KFAC
from tests.distributed.harness import MARKS, run_workers

DT = torch.float64
N, STEPS = 16, 6
BASE = dict(damping=1e-2, T_inv=3, T1=2, factor_dtype=DT)

#: (model, loss, KFAC options); "auto" rows use M&G's α/μ step with LM damping.
CASES = {
    "blockdiag-kflr-auto": ("mlp", "ce", dict(kind="kflr")),
    "blockdiag-empirical-lr-momentum": ("mlp", "mse", dict(kind="empirical", lr=0.2, momentum=0.5)),
    "blockdiag-kflr-exact-damping-lr": (
        "mlp",
        "ce",
        dict(kind="kflr", damping_mode="exact", lr=0.3),
    ),
    "blockdiag-ekfac-kflr-auto": ("mlp", "ce", dict(kind="kflr", ekfac=True)),
    "tridiag-kflr-auto": ("mlp", "ce", dict(kind="kflr", structure="tridiagonal")),
    "tridiag-empirical-lr": ("mlp", "mse", dict(kind="empirical", structure="tridiagonal", lr=0.2)),
    "tridiag-kflr-auto-T2": ("mlp", "mse", dict(kind="kflr", structure="tridiagonal", T2=2)),
    "tridiag-cnn-kflr-lr": ("cnn", "ce", dict(kind="kflr", structure="tridiagonal", lr=0.3)),
}


def make_model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    if name == "mlp":
        layers = [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)]
    else:  # a conv layer breaks the tri-diagonal chain: no cross factor to the Linear
        layers = [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 6), nn.Tanh()]
        layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers).to(DT)


def make_loss(name: str) -> nn.Module:
    return nn.CrossEntropyLoss() if name == "ce" else nn.MSELoss()


def batch(model: str, loss: str, step: int, n: int = N):
    """The global batch of ``step`` (the same on every process)."""
    gen = torch.Generator().manual_seed(100 + step)
    X = torch.randn(n, *((1, 5, 5) if model == "cnn" else (5,)), generator=gen, dtype=DT)
    y = (
        torch.randint(0, 3, (n,), generator=gen)
        if loss == "ce"
        else torch.randn(n, 3, generator=gen, dtype=DT)
    )
    return X, y


def shard(X, y, rank: int, world_size: int, sizes=None):
    sizes = sizes or [X.shape[0] // world_size] * world_size
    start = sum(sizes[:rank])
    return X[start : start + sizes[rank]], y[start : start + sizes[rank]]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(opt, model, loss_func, data, steps=STEPS, comm=None, sizes=None):
    """``steps`` steps on ``data(step)``; ``sizes`` are passed to ``comm.set_batch_size``."""
    for k in range(steps):
        X, y = data(k)
        if comm is not None and sizes is not None:
            comm.set_batch_size(X.shape[0])
        opt.step(lambda X=X, y=y: loss_func(model(X), y))
    return flat(model)


def single_process(model_name, loss_name, options, data=None, steps=STEPS):
    model, loss_func = make_model(model_name), make_loss(loss_name)
    opt = KFAC(model, loss_func, **{**BASE, **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theta = train(opt, model, loss_func, data or (lambda k: batch(model_name, loss_name, k)))
    return theta, opt


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- workers (run in each process) -------------------------------------------------------
def _train_worker(rank, world, model_name, loss_name, options, assignment="distributed"):
    warnings.simplefilter("ignore")
    model, loss_func = make_model(model_name), make_loss(loss_name)
    comm = DistributedCommunicator(inverse_assignment=assignment)
    opt = KFAC(model, loss_func, comm=comm, **{**BASE, **options})
    theta = train(opt, model, loss_func, lambda k: shard(*batch(model_name, loss_name, k), rank, 2))
    return {"theta": theta, "damping": opt.damping, "events": opt.events, "counts": comm.counts}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_two_processes_equal_one_process_on_full_batch(case):
    model_name, loss_name, options = CASES[case]
    reference, ref_opt = single_process(model_name, loss_name, options)
    out = run_workers(_train_worker, model_name, loss_name, options)
    start = flat(make_model(model_name))
    assert rel(reference, start) > 1e-3, "the parameters must move for the test to mean anything"
    for r in out:
        assert rel(r["theta"], reference) <= 1e-8, rel(r["theta"], reference)
        assert r["damping"] == pytest.approx(ref_opt.damping, rel=1e-10)
        assert [e["step"] for e in r["events"]] == [e["step"] for e in ref_opt.events]
    assert rel(out[0]["theta"], out[1]["theta"]) <= 1e-12
    # one all-reduce per averaging call: gradients+loss once per step
    assert out[0]["counts"]["average/gradients"] == STEPS


@pytest.mark.parametrize("structure", ["block-diagonal", "tridiagonal"])
def test_distributed_inverse_equals_everywhere(structure):
    options = dict(kind="kflr", structure=structure, T_inv=2)
    dist_run = run_workers(_train_worker, "mlp", "ce", options, "distributed")
    every_run = run_workers(_train_worker, "mlp", "ce", options, "everywhere")
    for a, b in zip(dist_run, every_run):
        assert rel(a["theta"], b["theta"]) <= 1e-12
    assert dist_run[0]["counts"]["inverse/broadcast"] > 0
    assert "inverse/broadcast" not in every_run[0]["counts"]


def _undamped_refresh_worker(rank, world):
    warnings.simplefilter("ignore")
    model, loss_func = make_model("mlp"), make_loss("ce")
    comm = DistributedCommunicator(inverse_assignment="distributed")
    opt = KFAC(model, loss_func, comm=comm, **{**BASE, "kind": "kflr", "structure": "tridiagonal"})
    train(opt, model, loss_func, lambda k: shard(*batch("mlp", "ce", k), rank, 2), steps=2)
    pre = opt.preconditioner
    v = torch.linspace(-1, 1, pre.inverse.shape[0], dtype=DT)
    pre.refresh(0.0, comm=comm)  # undamped: shared eigendecompositions, then the chain pieces
    distributed = pre.inverse @ v
    pre.refresh(0.0)  # the same on this process alone
    return {"distributed": distributed, "local": pre.inverse @ v, "counts": comm.counts}


def test_undamped_tridiagonal_refresh_distributed_equals_local():
    for r in run_workers(_undamped_refresh_worker):
        assert rel(r["distributed"], r["local"]) <= 1e-10
        assert r["counts"]["inverse/broadcast"] > 0


def _average_worker(rank, world):
    gen = torch.Generator().manual_seed(rank)
    B = torch.randn(5, 5, generator=gen, dtype=DT)
    S, M, v = B + B.T, torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(6, dtype=DT)
    inputs = [S.clone(), M.clone(), v.clone()]
    comm = DistributedCommunicator()
    comm.average_([S, M, v], symmetric=1)  # only S's upper triangle travels
    with pytest.raises(ShapeError, match="square"):
        comm.average_([M], symmetric=1)
    return {"inputs": inputs, "outputs": [S, M, v]}


def test_average_sends_upper_triangles_of_symmetric_tensors():
    out = run_workers(_average_worker)
    for r in out:
        for j in range(3):
            expected = (out[0]["inputs"][j] + out[1]["inputs"][j]) / 2
            assert torch.allclose(r["outputs"][j], expected, rtol=1e-14, atol=1e-14)


def test_unequal_shards_weighted_by_batch_size():
    sizes = [5, 11]
    options = dict(kind="kflr")
    reference, _ = single_process("mlp", "ce", options)
    out = run_workers(_unequal_worker, sizes, options)
    for theta in out:
        assert rel(theta, reference) <= 1e-8


def _unequal_worker(rank, world, sizes, options):
    model, loss_func = make_model("mlp"), make_loss("ce")
    comm = DistributedCommunicator()
    opt = KFAC(model, loss_func, comm=comm, **{**BASE, **options})
    data = lambda k: shard(*batch("mlp", "ce", k), rank, 2, sizes)  # noqa: E731
    return train(opt, model, loss_func, data, comm=comm, sizes=sizes)


def _uneven_make_kfac_worker(rank, world, sizes, set_sizes):
    model, loss_func = make_model("mlp"), make_loss("ce")
    opt = make_kfac(model, loss_func, kind="kflr", **BASE)
    before = flat(model)
    data = lambda k: shard(*batch("mlp", "ce", k), rank, 2, sizes)  # noqa: E731
    try:
        theta = train(opt, model, loss_func, data, comm=opt.comm, sizes=set_sizes)
    except ShapeError as err:
        return {"error": str(err), "unchanged": torch.equal(flat(model), before)}
    return {"theta": theta}


def test_uneven_shards_without_set_batch_size_raise_on_every_process():
    out = run_workers(_uneven_make_kfac_worker, [5, 11], None, timeout=60)
    for r in out:
        assert "differ in size (5 to 11 examples" in r["error"]
        assert "set_batch_size" in r["error"]
        assert r["unchanged"]  # raised in the first step, before any update


def test_uneven_shards_with_set_batch_size_pass_the_check():
    reference, _ = single_process("mlp", "ce", dict(kind="kflr"))
    out = run_workers(_uneven_make_kfac_worker, [5, 11], [5, 11], timeout=60)
    for r in out:
        assert rel(r["theta"], reference) <= 1e-8


def _half_set_worker(rank, world):
    model, loss_func = make_model("mlp"), make_loss("ce")
    opt = make_kfac(model, loss_func, kind="kflr", **BASE)
    if rank == 1:
        opt.comm.set_batch_size(N // 2)
    X, y = shard(*batch("mlp", "ce", 0), rank, 2)
    with pytest.raises(ShapeError, match="some processes but not on others"):
        opt.step(lambda: loss_func(model(X), y))
    return True


def test_set_batch_size_on_one_process_only_raises_on_every_process():
    assert run_workers(_half_set_worker, timeout=60) == [True, True]


def _replica_worker(rank, world, how):
    model, loss_func = make_model("mlp"), make_loss("ce")
    if how == "seed":
        torch.manual_seed(rank)  # a different initialisation on each process
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    elif how == "nudge" and rank == 1:
        with torch.no_grad():
            model[2].weight[0, 0] += 1e-6
    elif how == "shape" and rank == 1:
        model[4] = nn.Linear(6, 4).to(DT)
    try:
        make_kfac(model, loss_func, kind="kflr", **BASE)
    except ShapeError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    "how, words",
    [
        ("seed", "parameter '0.weight'"),
        ("nudge", "parameter '2.weight'"),
        ("shape", "parameter '4.weight' [4, 6]"),
    ],
)
def test_replicas_with_different_weights_are_rejected_at_construction(how, words):
    out = run_workers(_replica_worker, how, timeout=60)
    for err in out:
        assert "model replicas differ: process 1's" in err and words in err


def test_identical_replicas_pass_the_check():
    assert run_workers(_replica_worker, "same", timeout=60) == [None, None]


# -- failures ----------------------------------------------------------------------------
BAD_STEP = 3


def _nan_batch(model_name, loss_name, k, rank=None):
    X, y = batch(model_name, loss_name, k)
    if k == BAD_STEP:
        X = X.clone()
        X[N - 1, 0] = float("nan")  # the last example: on process 1 only
    return (X, y) if rank is None else shard(X, y, rank, 2)


def _nan_worker(rank, world):
    model, loss_func = make_model("mlp"), make_loss("ce")
    opt = KFAC(model, loss_func, comm=DistributedCommunicator(), kind="kflr", **BASE)
    thetas = []
    for k in range(STEPS):
        X, y = _nan_batch("mlp", "ce", k, rank)
        opt.step(lambda X=X, y=y: loss_func(model(X), y))
        thetas.append(flat(model))
    return {"thetas": thetas, "events": opt.events, "damping": opt.damping}


def test_nan_on_one_process_rejects_the_step_on_all():
    out = run_workers(_nan_worker)
    ref, ref_opt = single_process(
        "mlp", "ce", dict(kind="kflr"), lambda k: _nan_batch("mlp", "ce", k)
    )
    for r in out:
        assert torch.equal(r["thetas"][BAD_STEP], r["thetas"][BAD_STEP - 1])
        assert [(e["step"], e["event"]) for e in r["events"]] == [(BAD_STEP + 1, "rejected")]
        assert r["damping"] == pytest.approx(ref_opt.damping, rel=1e-10)
        assert rel(r["thetas"][-1], ref) <= 1e-8
    assert rel(out[0]["thetas"][-1], out[1]["thetas"][-1]) <= 1e-12


def _raising_worker(rank, world, exit_at_once: bool):
    import time

    model, loss_func = make_model("mlp"), make_loss("ce")
    comm = DistributedCommunicator(timeout=timedelta(seconds=4))
    opt = KFAC(model, loss_func, comm=comm, kind="kflr", **BASE)
    X, y = shard(*batch("mlp", "ce", 0), rank, 2)
    opt.step(lambda: loss_func(model(X), y))
    if rank == 1:
        X = X[:, :3]  # a bad batch: the model raises before the step's first collective
    MARKS["failing step"] = time.monotonic()
    try:
        opt.step(lambda: loss_func(model(X), y))
    except RuntimeError:
        if rank == 1 and not exit_at_once:  # alive: the peer can only learn of it by timeout
            time.sleep(8)
        raise
    return "no error"


@pytest.mark.parametrize(
    "exit_at_once", [True, False], ids=["failed-process-exits", "failed-process-hangs"]
)
def test_exception_on_one_process_fails_the_other_in_bounded_time(exit_at_once):
    import time

    start = time.monotonic()
    records = run_workers(_raising_worker, exit_at_once, allow_errors=True, timeout=45)
    assert time.monotonic() - start < 40
    failed, peer = records[1], records[0]
    assert (
        failed["error_type"] == "RuntimeError" and "shapes cannot be multiplied" in failed["error"]
    )
    assert peer["error_type"] == "DistributedError", peer
    assert "Process 0 of 2" in peer["error"] and "Another process probably raised" in peer["error"]
    waited = peer["end"] - peer["marks"]["failing step"]
    if exit_at_once:  # the closed connection fails the collective at once
        assert waited < 5, waited
    else:  # the communicator's 4 s timeout
        assert 3.9 <= waited < 12, waited


def _failing_inverse_worker(rank, world):
    import curvkit.operators.kron_math as km

    if rank == 1:  # the factor inverses fail on process 1 only

        def broken(*args, **kwargs):
            raise torch.linalg.LinAlgError("factorisation failed (injected)")

        km.eigh_psd = km.shifted_inverse = broken
    model, loss_func = make_model("mlp"), make_loss("ce")
    opt = KFAC(model, loss_func, comm=DistributedCommunicator(), kind="kflr", **BASE)
    X, y = shard(*batch("mlp", "ce", 0), rank, 2)
    opt.step(lambda: loss_func(model(X), y))


def test_inverse_failing_on_one_process_fails_all_at_once():
    records = run_workers(_failing_inverse_worker, allow_errors=True, timeout=45)
    assert "(injected)" in records[1]["error"]
    assert records[0]["error_type"] == "DistributedError"
    assert "inverse failed on another process" in records[0]["error"]
    assert records[0]["end"] - records[1]["end"] < 5  # by agreement, not by a timeout


# -- checkpoints, DDP, helper -------------------------------------------------------------
def _checkpoint_worker(rank, world, path):
    options = {**BASE, "kind": "kflr", "structure": "tridiagonal", "T_inv": 2}
    loss_func = make_loss("ce")
    data = lambda k: shard(*batch("mlp", "ce", k), rank, 2)  # noqa: E731
    comm = DistributedCommunicator()

    def steps(opt, model, ks):
        for k in ks:
            X, y = data(k)
            opt.step(lambda X=X, y=y: loss_func(model(X), y))

    model = make_model("mlp")
    opt = KFAC(model, loss_func, comm=comm, **options)
    steps(opt, model, range(STEPS))
    uninterrupted = flat(model)
    model = make_model("mlp")
    opt = KFAC(model, loss_func, comm=comm, **options)
    steps(opt, model, range(3))
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    torch.distributed.barrier()
    saved = torch.load(path, weights_only=True)
    model = make_model("mlp")
    torch.manual_seed(rank)  # the fresh processes' models differ before loading
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.load_state_dict(saved["model"])
    opt = KFAC(model, loss_func, comm=comm, **options)
    opt.load_state_dict(saved["opt"])
    steps(opt, model, range(3, STEPS))
    return {"resumed": flat(model), "uninterrupted": uninterrupted}


def test_state_dict_of_process_0_restores_all(tmp_path):
    out = run_workers(_checkpoint_worker, str(tmp_path / "ckpt.pt"))
    for r in out:
        assert rel(r["resumed"], r["uninterrupted"]) <= 1e-12
    assert rel(out[0]["resumed"], out[1]["resumed"]) <= 1e-12


def _ddp_worker(rank, world):
    net = make_model("mlp")
    model = nn.parallel.DistributedDataParallel(net)
    loss_func = make_loss("ce")
    with pytest.raises(ShapeError, match="make_kfac"):
        KFAC(model, loss_func, kind="kflr", **BASE)  # no communicator: refused
    opt = make_kfac(model, loss_func, kind="kflr", **BASE)
    theta = train(opt, model, loss_func, lambda k: shard(*batch("mlp", "ce", k), rank, 2))
    auto = isinstance(opt.comm, DistributedCommunicator)
    return {"theta": theta, "net_is_inner": opt.net is net and auto}


def test_ddp_wrapped_model():
    reference, _ = single_process("mlp", "ce", dict(kind="kflr"))
    out = run_workers(_ddp_worker)
    for r in out:
        assert r["net_is_inner"]
        assert rel(r["theta"], reference) <= 1e-8


def _make_kfac_worker(rank, world):
    model = make_model("mlp")
    opt = make_kfac(model, make_loss("ce"), kind="kflr", factor_dtype=DT)
    try:
        make_kfac(model, nn.CrossEntropyLoss(reduction="sum"))
        sum_error = None
    except ShapeError as err:
        sum_error = str(err)
    return {"comm": type(opt.comm).__name__, "seed_rank": opt.comm.rank, "sum_error": sum_error}


def test_make_kfac_builds_communicator_and_rejects_sum_reduction():
    out = run_workers(_make_kfac_worker)
    assert [r["comm"] for r in out] == ["DistributedCommunicator"] * 2
    assert [r["seed_rank"] for r in out] == [0, 1]
    assert all("reduction='mean'" in r["sum_error"] for r in out)


# -- single-process pieces ----------------------------------------------------------------
def test_make_kfac_without_process_group_is_plain_kfac():
    opt = make_kfac(make_model("mlp"), make_loss("ce"))
    assert type(opt.comm).__name__ == "Communicator"


def test_communicator_needs_initialised_process_group():
    with pytest.raises(ShapeError, match="init_process_group"):
        DistributedCommunicator()


@pytest.mark.parametrize(
    "costs, world, owners",
    [
        ([8, 1, 1, 8], 2, [0, 0, 1, 1]),
        ([1, 2, 3, 4, 5], 2, [0, 0, 1, 1, 0]),
        ([5, 5, 5], 3, [0, 1, 2]),
        ([3, 1], 4, [0, 1]),
    ],
    ids=["pairs", "five-layers", "one-each", "more-processes-than-layers"],
)
def test_assign_layers_greedy(costs, world, owners):
    assert assign_layers(costs, world) == owners


def test_flatten_round_trip():
    from curvkit.operators.kron_math import KronDifferenceInverse

    nest = [(torch.ones(2, 3), None), KronDifferenceInverse(torch.eye(2), torch.eye(3), None)]
    leaves, layout = flatten(nest)
    back = unflatten(layout, [t.clone() for t in leaves])
    assert len(leaves) == 3 and isinstance(back[1], KronDifferenceInverse)
    assert back[0][1] is None and torch.equal(back[0][0], nest[0][0])
    assert copy.deepcopy(layout) == layout
