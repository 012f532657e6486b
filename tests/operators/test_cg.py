"""Conjugate-gradient inverse against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

import curvkit as ck
from curvkit.errors import ShapeError
from curvkit.operators.base import DenseOperator
from curvkit.operators.cg import CGInverse


def spd_matrix(dim, cond, device, seed=0):
    """A symmetric positive definite matrix with condition number ``cond``."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    evals = torch.logspace(
        0, torch.log10(torch.tensor(float(cond))).item(), dim, dtype=torch.float64
    )
    return ((Q * evals) @ Q.T).to(device)


@pytest.mark.parametrize("damping", [0.0, 0.5], ids=["undamped", "damped"])
def test_cg_solves_dense_spd_system(damping, device):
    A = spd_matrix(30, 100.0, device)
    B = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(
        device
    )
    inv = CGInverse(DenseOperator(A), damping=damping, tol=1e-12, maxiter=200)
    X = inv @ B
    expected = torch.linalg.solve(
        A + damping * torch.eye(30, dtype=torch.float64, device=device), B
    )
    torch.testing.assert_close(X, expected, rtol=1e-9, atol=1e-10)
    assert bool(inv.info.converged.all())
    assert all(1 <= it <= 60 for it in inv.info.iterations), inv.info.iterations
    assert float(inv.info.residuals.max()) <= 1e-12
    assert inv.info.history[-1] <= 1e-12


@pytest.mark.parametrize(
    "model_name,loss_name", [("mlp", "ce"), ("cnn", "mse")], ids=["mlp-ce", "cnn-mse"]
)
def test_cg_on_ggn_matches_dense_solve(model_name, loss_name, device, make_case):
    case = make_case(model_name, loss_name, "mean", device)
    G = ck.ggn(case.model, case.loss_func, case.batches)
    damping = 1e-2
    b = torch.randn(G.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(
        device
    )
    inv = G.inverse(damping=damping, tol=1e-10, maxiter=2 * G.dim)
    assert isinstance(inv, CGInverse)
    x = inv @ b
    A = G.to_dense() + damping * torch.eye(G.dim, dtype=torch.float64, device=device)
    expected = torch.linalg.solve(A, b)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())
    # residual of the returned solution, measured independently of the recursion
    assert ((A @ x - b).norm(dim=0) / b.norm(dim=0)).max() < 1e-9


def test_exact_preconditioner_converges_in_one_iteration(device):
    A = spd_matrix(20, 1e4, device)
    eye = torch.eye(20, dtype=torch.float64, device=device)
    precond = DenseOperator(torch.linalg.inv(A + eye))
    inv = CGInverse(DenseOperator(A), damping=1.0, tol=1e-10, preconditioner=precond)
    b = torch.ones(20, dtype=torch.float64, device=device)
    torch.testing.assert_close(inv @ b, torch.linalg.solve(A + eye, b))
    assert inv.info.iterations == [1]


def test_zero_column_is_zero_and_does_not_iterate():
    A = DenseOperator(spd_matrix(10, 10.0, "cpu"))
    B = torch.zeros(10, 2, dtype=torch.float64)
    B[0, 1] = 1.0
    inv = CGInverse(A, tol=1e-12)
    X = inv @ B
    assert torch.equal(X[:, 0], torch.zeros(10, dtype=torch.float64))
    assert inv.info.iterations[0] == 0 and inv.info.iterations[1] > 0


def test_maxiter_reached_warns_and_reports():
    A = DenseOperator(spd_matrix(40, 1e6, "cpu"))
    inv = CGInverse(A, tol=1e-14, maxiter=3)
    with pytest.warns(UserWarning, match="maxiter=3"):
        inv @ torch.ones(40, dtype=torch.float64)
    assert inv.info.iterations == [3]
    assert not bool(inv.info.converged.all())
    assert len(inv.info.history) == 3


def test_negative_curvature_is_reported():
    A = DenseOperator(torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64)))
    inv = CGInverse(A, damping=0.5, tol=1e-12)
    with pytest.warns(UserWarning, match="non-positive curvature"):
        x = inv @ torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert bool(inv.info.breakdown[0])
    assert torch.isfinite(x).all()


def test_float32_cg(make_case):
    case = make_case("mlp", "ce", "mean", dtype=torch.float32)
    G = ck.ggn(case.model, case.loss_func, case.batches)
    b = torch.randn(G.dim, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    x = G.inverse(damping=0.1, tol=1e-5) @ b
    A = G.to_dense().double() + 0.1 * torch.eye(G.dim, dtype=torch.float64)
    torch.testing.assert_close(x.double(), torch.linalg.solve(A, b.double()), rtol=1e-3, atol=1e-4)


def test_bad_arguments_raise():
    A = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="tol"):
        CGInverse(A, tol=-1.0)
    with pytest.raises(ShapeError, match="maxiter"):
        CGInverse(A, maxiter=0)
    with pytest.raises(ShapeError, match="preconditioner"):
        CGInverse(A, preconditioner=DenseOperator(torch.eye(4, dtype=torch.float64)))
