"""Diagonals (GGN, Hessian) against dense torch.func matrices and BackPACK."""

import copy

import pytest
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact, DiagHessian

from curvkit.extraction import extract
from tests.extraction.cases import FULL, flat
from tests.reference import (
    assert_allclose_report,
    dense_ggn,
    dense_hessian,
    make_problem,
    param_layers,
)


@pytest.mark.parametrize("model,loss,reduction,device", FULL)
def test_diagonals_match_dense(model, loss, reduction, device):
    net, loss_func, X, y = make_problem(model, loss, reduction, device, n=4)
    rec = extract(net, loss_func, X, y, ("diag_ggn", "diag_hessian"))
    ggn, hess = dense_ggn(net, loss_func, X, y), dense_hessian(net, loss_func, X, y)
    got_ggn = flat(d for r in rec for d in r.diag_ggn)
    got_hess = flat(d for r in rec for d in r.diag_hessian)
    assert_allclose_report(got_ggn, ggn.diagonal(), 1e-9, 1e-12, "diag_ggn")
    assert_allclose_report(got_hess, hess.diagonal(), 1e-9, 1e-12, "diag_hessian")
    for r in rec:
        assert [d.shape for d in r.diag_ggn] == [p.shape for p in r.params]


BACKPACK_CASES = [
    pytest.param(m, loss, red, id=f"{m}-{loss}-{red}")
    for m in ("deep_mlp", "cnn")
    for loss in ("mse", "ce", "bce")
    for red in ("mean", "sum")
]


@pytest.mark.parametrize("model,loss,reduction", BACKPACK_CASES)
def test_diagonals_match_backpack(model, loss, reduction):
    net, loss_func, X, y = make_problem(model, loss, reduction, d_out=1 if loss == "bce" else 3)
    bp_net, bp_loss = extend(copy.deepcopy(net)), extend(copy.deepcopy(loss_func))
    with backpack(DiagGGNExact(), DiagHessian()):
        bp_loss(bp_net(X), y).backward()
    rec = extract(net, loss_func, X, y, ("diag_ggn", "diag_hessian"))
    bp_layers = [m for _, m in param_layers(bp_net)]
    for r, m in zip(rec, bp_layers):
        params = [m.weight, m.bias]
        for got, p in zip(r.diag_ggn, params):
            assert_allclose_report(got, p.diag_ggn_exact, 1e-10, 1e-13, f"{r.name} diag_ggn")
        for got, p in zip(r.diag_hessian, params):
            assert_allclose_report(got, p.diag_h, 1e-10, 1e-13, f"{r.name} diag_h")
