"""Exact curvature on sharded data: 2 processes with unequal shards against the whole data.

The distributed operators must equal the dense brute-force matrices of
``tests/reference.py`` on the concatenated data (and curvkit's single-process
operators), for mean and sum reductions; estimators built on products (traces,
Lanczos eigenvalues, SLQ densities, CG) must return what they return on one process.
"""

from __future__ import annotations

import pytest
import torch

import curvkit as ck
from curvkit.distributed import (
    DistributedOperator,
    distributed_empirical_fisher,
    distributed_fisher,
    distributed_ggn,
    distributed_hessian,
    distributed_loss_and_gradient,
)
from curvkit.errors import ShapeError
from curvkit.operators.exact import loss_and_gradient
from tests.conftest import make_data, make_loss, make_model
from tests.distributed.harness import run_workers
from tests.reference import dense_ef, dense_ggn, dense_hessian

N, SIZES = 8, [3, 5]  # unequal shards: the weights N_r / N matter
#: id -> (distributed constructor, single-process constructor, dense reference, loss, reduction)
CASES = {
    "ggn-ce-mean": (distributed_ggn, ck.ggn, dense_ggn, "ce", "mean"),
    "ggn-mse-sum": (distributed_ggn, ck.ggn, dense_ggn, "mse", "sum"),
    "hessian-ce-mean": (distributed_hessian, ck.hessian, dense_hessian, "ce", "mean"),
    "hessian-mse-sum": (distributed_hessian, ck.hessian, dense_hessian, "mse", "sum"),
    "hessian-bce-mean": (distributed_hessian, ck.hessian, dense_hessian, "bce", "mean"),
    "fisher-ce-mean": (distributed_fisher, ck.fisher, dense_ggn, "ce", "mean"),
    "ef-ce-mean": (distributed_empirical_fisher, ck.empirical_fisher, dense_ef, "ce", "mean"),
    "ef-ce-sum": (distributed_empirical_fisher, ck.empirical_fisher, dense_ef, "ce", "sum"),
}
ESTIMATES = {
    "trace-hutchinson": lambda op: ck.trace(op, num_matvecs=12, seed=3).value,
    "trace-hutch++": lambda op: ck.trace(op, method="hutch++", num_matvecs=12, seed=4).value,
    "eigenvalues-lanczos": lambda op: ck.eigenvalues(op, k=3, method="lanczos", seed=5)[0],
    "eigenvalues-scipy": lambda op: ck.eigenvalues(op, k=2, method="scipy", seed=6)[0],
    "slq-density": lambda op: ck.spectral_density(op, num_probes=3, lanczos_steps=8).density,
    "cg-inverse": lambda op: (
        op.inverse(damping=0.1, tol=1e-12) @ torch.ones(op.dim, dtype=op.dtype)
    ),
}


def problem(loss: str, reduction: str):
    model = make_model("mlp")
    X, y = make_data("mlp", loss, num=N)
    return model, make_loss(loss, reduction), X, y


def shard(X, y, rank):
    start = sum(SIZES[:rank])
    return X[start : start + SIZES[rank]], y[start : start + SIZES[rank]]


def _worker(rank, world):
    out = {"dense": {}, "estimates": {}}
    for name, (build, _, _, loss, reduction) in CASES.items():
        model, loss_func, X, y = problem(loss, reduction)
        op = build(model, loss_func, shard(X, y, rank), check_inputs=True)
        out["dense"][name] = op.to_dense()
    model, loss_func, X, y = problem("ce", "mean")
    G = distributed_ggn(model, loss_func, shard(X, y, rank))
    for name, estimate in ESTIMATES.items():
        out["estimates"][name] = estimate(G)
    out["loss_and_gradient"] = distributed_loss_and_gradient(model, loss_func, shard(X, y, rank))
    try:  # rank-dependent vectors must be caught on every process
        DistributedOperator(G.op, check_inputs=True) @ torch.full((G.dim,), float(rank + 1))
        out["mismatch"] = None
    except ShapeError as err:
        out["mismatch"] = str(err)
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, timeout=90)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matrix_equals_whole_data(results, case):
    _, single, dense, loss, reduction = CASES[case]
    model, loss_func, X, y = problem(loss, reduction)
    reference = dense(model, loss_func, X, y)
    assert torch.allclose(single(model, loss_func, (X, y)).to_dense(), reference, atol=1e-12)
    for r in results:
        err = (r["dense"][case] - reference).abs().max() / reference.abs().max()
        assert err <= 1e-12, err


@pytest.mark.parametrize("name", list(ESTIMATES), ids=list(ESTIMATES))
def test_estimators_match_one_process(results, name):
    model, loss_func, X, y = problem("ce", "mean")
    expected = ESTIMATES[name](ck.ggn(model, loss_func, (X, y)))
    for r in results:
        got = r["estimates"][name]
        assert torch.allclose(
            torch.as_tensor(got), torch.as_tensor(expected), rtol=1e-9, atol=1e-12
        )


def test_loss_and_gradient_equal_whole_data(results):
    model, loss_func, X, y = problem("ce", "mean")
    loss, grad = loss_and_gradient(model, loss_func, (X, y))
    for r in results:
        assert torch.allclose(r["loss_and_gradient"][0], loss, rtol=1e-12)
        assert torch.allclose(r["loss_and_gradient"][1], grad, rtol=1e-12, atol=1e-14)


def test_different_vectors_on_processes_raise_everywhere(results):
    assert all("multiply different matrices" in r["mismatch"] for r in results)


def test_kronecker_operator_needs_explicit_normalisation():
    model, loss_func, X, y = problem("ce", "mean")
    with pytest.raises(ShapeError, match="num_data="):
        DistributedOperator(ck.kfac(model, loss_func, (X, y), kind="kflr"))


def test_needs_initialised_process_group():
    model, loss_func, X, y = problem("ce", "mean")
    with pytest.raises(ShapeError, match="init_process_group"):
        DistributedOperator(ck.ggn(model, loss_func, (X, y)))


def test_without_process_group_the_helpers_return_the_local_operator():
    model, loss_func, X, y = problem("ce", "mean")
    G = distributed_ggn(model, loss_func, (X, y))
    assert type(G).__name__ == "GGNOperator"
    loss, grad = distributed_loss_and_gradient(model, loss_func, (X, y))
    assert torch.equal(grad, loss_and_gradient(model, loss_func, (X, y))[1])
