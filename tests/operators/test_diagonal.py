"""Diagonal operators against the diagonals of dense GGN and Hessian matrices."""

import pytest
import torch

import curvkit as ck
from curvkit.errors import ShapeError
from curvkit.operators.diagonal import DiagonalOperator
from tests.reference import (
    DEVICES,
    assert_allclose_report,
    dense_ggn,
    dense_hessian,
    make_problem,
    mc_error_bound,
    param_layers,
)

DTYPE = torch.float64

CASES = {
    "mlp-ce-mean": ("mlp", "ce", "mean"),
    "mlp-mse-sum": ("mlp", "mse", "sum"),
    "deep_mlp-bce-mean": ("deep_mlp", "bce", "mean"),
    "cnn-ce-sum": ("cnn", "ce", "sum"),
    "cnn1d-mse-mean": ("cnn1d", "mse", "mean"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_diag_ggn_matches_dense(case, device):
    model, lf, X, y = make_problem(*case, device=device, n=5)
    D = ck.diag_ggn(model, lf, (X, y))
    assert D.block_names == [name for name, _ in param_layers(model)]
    expected = dense_ggn(model, lf, X, y).diagonal()
    assert_allclose_report(D.diagonal, expected, rtol=1e-10, atol=1e-13)
    assert_allclose_report(D.to_dense(), torch.diag(expected), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_diag_hessian_matches_dense(case, device):
    model, lf, X, y = make_problem(*case, device=device, n=5)
    D = ck.diag_hessian(model, lf, (X, y))
    expected = dense_hessian(model, lf, X, y).diagonal()
    assert_allclose_report(D.diagonal, expected, rtol=1e-9, atol=1e-12)


def test_diag_ggn_mc_is_unbiased():
    model, lf, X, y = make_problem("mlp", "ce", "mean", n=4)
    exact = dense_ggn(model, lf, X, y).diagonal()
    M = 4000
    D = ck.diag_ggn(model, lf, (X, y), exact=False, mc_samples=M, seed=1)
    # relative error of a mean of M samples, with a generous constant for 60 entries
    tol = mc_error_bound(M, 6.0) * exact.abs().max()
    assert (D.diagonal - exact).abs().max() < tol
    again = ck.diag_ggn(model, lf, (X, y), exact=False, mc_samples=M, seed=1)
    assert torch.equal(again.diagonal, D.diagonal)
    other = ck.diag_ggn(model, lf, (X, y), exact=False, mc_samples=M, seed=2)
    assert not torch.equal(other.diagonal, D.diagonal)


@pytest.mark.parametrize("which", ["ggn", "hessian"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_several_batches_equal_one_batch(which, red):
    model, lf, X, y = make_problem("cnn", "ce", red, n=7)
    func = ck.diag_ggn if which == "ggn" else ck.diag_hessian
    one = func(model, lf, (X, y)).diagonal
    several = func(model, lf, [(X[:3], y[:3]), (X[3:], y[3:])]).diagonal
    assert_allclose_report(several, one, rtol=1e-10, atol=1e-14)


def test_inverse_logdet_trace():
    gen = torch.Generator().manual_seed(0)
    diags = [
        torch.rand(3, 2, generator=gen, dtype=DTYPE),
        torch.rand(3, generator=gen, dtype=DTYPE),
    ]
    diags[1][0] = 0.0
    D = DiagonalOperator(diags)
    dense = D.to_dense()
    inv = D.inverse(0.1)
    eye = torch.eye(9, dtype=DTYPE)
    assert_allclose_report(inv.to_dense() @ (dense + 0.1 * eye), eye, rtol=0, atol=1e-12)
    assert [tuple(s) for s in inv.param_shapes] == [(3, 2), (3,)]
    assert_allclose_report(D.inverse(0.0).to_dense(), torch.linalg.pinv(dense), rtol=1e-12, atol=0)
    assert_allclose_report(D.logdet(0.1), torch.logdet(dense + 0.1 * eye), rtol=1e-12, atol=0)
    assert_allclose_report(D.trace(), torch.trace(dense), rtol=1e-12, atol=0)


def test_bad_input_raises():
    model, lf, X, y = make_problem("mlp", "ce", "mean", n=3)
    records = ck.extract(model, lf, X, y, quantities=("diag_ggn",))
    with pytest.raises(ShapeError, match="diag_hessian"):
        DiagonalOperator.from_records(records, "diag_hessian")
    with pytest.raises(ShapeError, match="which='diag'"):
        DiagonalOperator.from_records(records, "diag")
    with pytest.raises(ShapeError, match="non-negative"):
        DiagonalOperator.from_records(records).inverse(-1.0)
