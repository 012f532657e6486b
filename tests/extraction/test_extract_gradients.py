"""Gradients, per-example gradients and the loss value from ``extract``."""

import copy

import pytest
import torch

from curvkit.extraction import extract
from tests.reference import (
    assert_allclose_report,
    dense_grad,
    make_problem,
    per_example_grads,
    trainable_params,
)


def test_grad_and_batch_grad(extraction_case):
    """Every extraction case of the table (model x loss x reduction x device)."""
    net, loss_func, X, y = extraction_case
    expected_grad = dense_grad(net, loss_func, X, y)
    expected_batch = per_example_grads(net, loss_func, X, y)

    rec = extract(net, loss_func, X, y, quantities=("batch_grad",))

    assert_allclose_report(rec.loss, loss_func(net(X), y), 1e-12, 1e-14, "loss")
    params = trainable_params(net)
    assert [id(p) for p in rec.params] == [id(p) for p in params]
    batch = [g for r in rec for g in r.batch_grad]
    for p, g, bg, ebg in zip(params, expected_grad, batch, expected_batch):
        assert_allclose_report(p.grad, g, 1e-10, 1e-13, "grad")
        assert_allclose_report(bg, ebg, 1e-10, 1e-13, "batch_grad")
        assert_allclose_report(bg.sum(0), p.grad, 1e-10, 1e-13, "sum of batch_grad")


def test_batch_grad_factors(extraction_case):
    """Linear layers: outer products of the factors; other layers: batch_grad itself."""
    net, loss_func, X, y = extraction_case
    expected = iter(per_example_grads(net, loss_func, X, y))
    rec = extract(net, loss_func, X, y, quantities=("batch_grad_factors",))
    for r in rec:
        want = [next(expected) for _ in r.params]
        if isinstance(r.module, torch.nn.Linear):
            assert r.batch_grad is None
            g, a = r.grad_factors
            got = [torch.einsum("no,ni->noi", g, a), g][: len(r.params)]
        else:
            assert r.grad_factors is None
            got = r.batch_grad
        for bg, ebg in zip(got, want):
            assert_allclose_report(bg, ebg, 1e-10, 1e-13, f"per-example gradient of {r.name}")


def test_batch_grad_and_its_factors_together():
    net, loss_func, X, y = make_problem("deep_mlp", "ce", "mean")
    rec = extract(net, loss_func, X, y, quantities=("batch_grad", "batch_grad_factors"))
    for r in rec:
        g, a = r.grad_factors
        assert_allclose_report(torch.einsum("no,ni->noi", g, a), r.batch_grad[0], 1e-12, 1e-14)


@pytest.mark.parametrize("quantities", [("kfac",), ("diag_hessian", "cross", "kflr")], ids=str)
def test_grad_accumulates_like_autograd(quantities):
    net, loss_func, X, y = make_problem("deep_mlp", "ce", "mean")
    loss_func(net(X), y).backward()
    twice = [2 * p.grad.clone() for p in trainable_params(net)]
    extract(net, loss_func, X, y, quantities=quantities)
    for p, g in zip(trainable_params(net), twice):
        assert_allclose_report(p.grad, g, 1e-12, 1e-14, "accumulated grad")


def test_frozen_parameters():
    net, loss_func, X, y = make_problem("deep_mlp", "mse", "sum")
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    layers[0].requires_grad_(False)  # whole layer frozen: skipped
    layers[2].bias.requires_grad_(False)  # weight only
    expected = dense_grad(net, loss_func, X, y)
    expected_batch = per_example_grads(net, loss_func, X, y)

    rec = extract(net, loss_func, X, y, quantities=("kflr", "batch_grad"))

    assert [r.module for r in rec] == layers[1:]
    assert [r.position for r in rec] == [0, 1]
    assert not rec[1].has_bias and rec[1].A.shape == (4, 4)
    assert layers[0].weight.grad is None and layers[2].bias.grad is None
    for p, g, bg, ebg in zip(
        rec.params, expected, [g for r in rec for g in r.batch_grad], expected_batch
    ):
        assert_allclose_report(p.grad, g, 1e-10, 1e-13, "grad")
        assert_allclose_report(bg, ebg, 1e-10, 1e-13, "batch_grad")


def test_float32_model_float64_factors():
    net, loss_func, X, y = make_problem("mlp", "ce", "mean", dtype=torch.float32)
    rec32 = extract(net, loss_func, X, y, quantities=("kflr", "diag_ggn"))
    rec64 = extract(
        net, loss_func, X, y, quantities=("kflr", "diag_ggn"), factor_dtype=torch.float64
    )
    ref = extract(
        copy.deepcopy(net).double(), loss_func, X.double(), y, quantities=("kflr", "diag_ggn")
    )
    for r32, r64, r in zip(rec32, rec64, ref):
        assert r32.A.dtype == torch.float32 and r64.A.dtype == torch.float64
        assert r64.G["kflr"].dtype == torch.float64 and r64.diag_ggn[0].dtype == torch.float64
        assert_allclose_report(r64.A, r.A, 1e-6, 1e-7, "A")
        assert_allclose_report(r64.G["kflr"], r.G["kflr"], 1e-5, 1e-7, "G")
    assert rec32.params[0].grad.dtype == torch.float32


def test_half_precision_model_gets_float32_factors():
    net, loss_func, X, y = make_problem("mlp", "ce", "sum", dtype=torch.float64)
    ref = extract(copy.deepcopy(net), loss_func, X, y, ("kflr",))
    rec = extract(net.to(torch.bfloat16), loss_func, X.to(torch.bfloat16), y, ("kflr",))
    for r, e in zip(rec, ref):
        assert r.A.dtype == torch.float32 and r.G["kflr"].dtype == torch.float32
        # bfloat16 keeps ~3 significant digits: compare at that precision
        for got, exp in ((r.A, e.A), (r.G["kflr"], e.G["kflr"])):
            assert (got.double() - exp).norm() <= 3e-2 * exp.norm()
