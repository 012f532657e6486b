"""KFRA against BackPACK's stock extension and where it is exact."""

import copy

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import KFRA

from curvkit.extraction import extract
from tests.reference import (
    assert_allclose_report,
    dense_ggn,
    joint_block,
    kron_block,
    make_problem,
    param_layers,
)

CASES = [
    pytest.param(m, loss, red, id=f"{m}-{loss}-{red}")
    for m in ("mlp", "deep_mlp")
    for loss in ("mse", "ce")
    for red in ("mean", "sum")
]


@pytest.mark.parametrize("model,loss,reduction", CASES)
def test_kfra_matches_backpack(model, loss, reduction):
    net, loss_func, X, y = make_problem(model, loss, reduction)
    bp_net, bp_loss = extend(copy.deepcopy(net)), extend(copy.deepcopy(loss_func))
    bp_X, bp_y = X, y
    tol = (1e-10, 1e-13)
    if loss == "mse":
        # BackPACK 1.7.1's MSE ``sum_hessian`` is float32 whatever the input: compare in float32.
        bp_net, bp_X, bp_y, tol = bp_net.float(), X.float(), y.float(), (1e-5, 1e-7)
    with backpack(KFRA()):
        bp_loss(bp_net(bp_X), bp_y).backward()
    rec = extract(net, loss_func, X, y, ("kfra",), separate_bias=True)
    for r, (_, m) in zip(rec, param_layers(bp_net)):
        G_bp, A_bp = m.weight.kfra
        expected = kron_block(G_bp, A_bp).double()
        assert_allclose_report(kron_block(r.G["kfra"], r.A), expected, *tol, f"{r.name} weight")
        if r.has_bias:
            bias = m.bias.kfra[0].double()
            assert_allclose_report(r.G["kfra"] * r.bias_scale, bias, *tol, f"{r.name} bias")


def test_kfra_equals_kflr_on_last_layer():
    """On the last layer KFRA's G is the batch-averaged loss Hessian, as is KFLR's."""
    net, loss_func, X, y = make_problem("deep_mlp", "bce", "mean")
    rec = extract(net, loss_func, X, y, ("kfra", "kflr"))
    assert_allclose_report(rec[-1].G["kfra"], rec[-1].G["kflr"], 1e-12, 1e-14)
    assert not torch.allclose(rec[0].G["kfra"], rec[0].G["kflr"])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfra_exact_for_deep_linear_mse(reduction):
    """Constant Jacobians and loss Hessian: KFRA's recursion is exact (Botev et al. 2017)."""
    net, loss_func, X, y = make_problem("deep_linear", "mse", reduction, n=5)
    rec = extract(net, loss_func, X, y, ("kfra",))
    ggn = dense_ggn(net, loss_func, X, y)
    for r in rec:
        expected = joint_block(ggn, net, r.name)
        assert_allclose_report(kron_block(r.G["kfra"], r.A), expected, 1e-9, 1e-12, r.name)
