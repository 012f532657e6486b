"""Kronecker factors (A, G for kflr / empirical, cross factors) against brute force."""

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

from curvkit.extraction import extract
from tests.extraction.cases import CONV, FULL, LINEAR
from tests.reference import (
    DEVICES,
    assert_allclose_report,
    brute_force_factors,
    dense_ef,
    dense_ggn,
    joint_block,
    kron_block,
    layer_slices,
    make_problem,
    param_layers,
    trainable_params,
)

APPROX_CASES = [pytest.param(*p.values, "expand", id=f"{p.id}-expand") for p in FULL] + [
    pytest.param(*p.values, "reduce", id=f"{p.id}-reduce") for p in CONV
]


@pytest.mark.parametrize("model,loss,reduction,device,approx", APPROX_CASES)
def test_factors_match_brute_force(model, loss, reduction, device, approx):
    net, loss_func, X, y = make_problem(model, loss, reduction, device)
    rec = extract(net, loss_func, X, y, ("kflr", "empirical", "cross"), kfac_approx=approx)
    for kind in ("kflr", "empirical"):
        expected = brute_force_factors(net, loss_func, X, y, kind, approx)
        for r, e in zip(rec, expected):
            assert_allclose_report(r.A, e["A"], 1e-10, 1e-13, f"{r.name} A")
            assert_allclose_report(r.G[kind], e["G"], 1e-10, 1e-13, f"{r.name} G[{kind}]")
            if e["cross_A"] is None:
                assert r.cross_A is None and r.cross_G == {} and r.cross_reason
            else:
                assert_allclose_report(r.cross_A, e["cross_A"], 1e-10, 1e-13, f"{r.name} cross A")
                assert_allclose_report(
                    r.cross_G[kind], e["cross_G"], 1e-10, 1e-13, f"{r.name} cross G[{kind}]"
                )
    assert rec[-1].cross_reason == "last parametrised layer"


@pytest.mark.parametrize("model,loss,reduction,device", LINEAR)
def test_kflr_and_empirical_exact_for_single_datum(model, loss, reduction, device):
    """With N = 1, G ⊗ A is the exact GGN / empirical-Fisher block of a Linear layer."""
    net, loss_func, X, y = make_problem(model, loss, reduction, device, n=1)
    rec = extract(net, loss_func, X, y, ("kflr", "empirical", "kfra"))
    ggn, ef = dense_ggn(net, loss_func, X, y), dense_ef(net, loss_func, X, y)
    for r in rec:
        for kind, dense in (("kflr", ggn), ("kfra", ggn), ("empirical", ef)):
            expected = joint_block(dense, net, r.name)
            assert_allclose_report(kron_block(r.G[kind], r.A), expected, 1e-9, 1e-12, kind)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("device", DEVICES)
def test_kflr_exact_for_deep_linear_mse(reduction, device):
    """Deep linear net + MSE: Λ and the layer Jacobians are data-independent, KFLR is exact."""
    net, loss_func, X, y = make_problem("deep_linear", "mse", reduction, device, n=7)
    rec = extract(net, loss_func, X, y, ("kflr",))
    ggn = dense_ggn(net, loss_func, X, y)
    for r in rec:
        expected = joint_block(ggn, net, r.name)
        assert_allclose_report(kron_block(r.G["kflr"], r.A), expected, 1e-9, 1e-12, r.name)


def _curvlinops_dense(net, loss_func, X, y, approx, separate):
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        y = (y > 0.5).to(y.dtype)  # curvlinops' type-2 BCE needs binary targets
    K = KFACLinearOperator(
        net,
        loss_func,
        trainable_params(net),
        [(X, y)],
        fisher_type="type-2",
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    return K @ torch.eye(K.shape[0], dtype=X.dtype, device=X.device), y


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "model,loss,reduction,device", [p for p in CONV if p.values[0] == "cnn"] + LINEAR[:6]
)
def test_kflr_matches_curvlinops_type2(model, loss, reduction, device, approx, separate):
    net, loss_func, X, y = make_problem(model, loss, reduction, device, d_out=3)
    dense, y = _curvlinops_dense(net, loss_func, X, y, approx, separate)
    rec = extract(net, loss_func, X, y, ("kflr",), kfac_approx=approx, separate_bias=separate)
    slices = layer_slices(net)
    for r in rec:
        assert r.joint == (r.has_bias and not separate)
        block = joint_block(dense, net, r.name, separate=separate)
        assert_allclose_report(kron_block(r.G["kflr"], r.A), block, 1e-9, 1e-12, r.name)
        if separate and r.has_bias:
            s = slices[r.name]["bias"]
            assert_allclose_report(r.G["kflr"] * r.bias_scale, dense[s][:, s], 1e-9, 1e-12, "bias")


def test_separate_bias_layout():
    net, loss_func, X, y = make_problem("cnn", "ce", "sum", n=5)
    joint = extract(net, loss_func, X, y, ("kflr", "cross"))
    sep = extract(net, loss_func, X, y, ("kflr", "cross"), separate_bias=True)
    for j, s, (_, m) in zip(joint, sep, param_layers(net)):
        k = m.weight[0].numel()
        assert j.joint and not s.joint and s.separate_bias
        assert j.A.shape == (k + 1, k + 1) and s.A.shape == (k, k)
        assert_allclose_report(s.A, j.A[:k, :k], 1e-12, 1e-14, "weight part")
        assert j.A[k, k].item() == pytest.approx(j.bias_scale)
        assert_allclose_report(s.G["kflr"], j.G["kflr"], 1e-12, 1e-14, "G")
    T = 8 * 8  # first conv keeps the 8x8 resolution
    assert joint[0].bias_scale == pytest.approx(5 * T)
    lin = -1
    assert sep[lin - 1].cross_A is None  # conv -> linear
    assert joint[lin].bias_scale == pytest.approx(5)


def test_cross_factors_separate_bias_mlp():
    net, loss_func, X, y = make_problem("deep_mlp", "mse", "mean")
    rec = extract(net, loss_func, X, y, ("empirical", "cross"), separate_bias=True)
    e = brute_force_factors(net, loss_func, X, y, "empirical", separate_bias=True)
    for r, b in zip(rec[:-1], e[:-1]):
        assert_allclose_report(r.cross_A, b["cross_A"], 1e-10, 1e-13, "cross A")
        assert_allclose_report(r.cross_G["empirical"], b["cross_G"], 1e-10, 1e-13, "cross G")
    assert rec[0].cross_A.shape == (5, 4)  # no homogeneous coordinates
