"""Exact natural gradient against a dense solve."""

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ShapeError
from tests.conftest import DEVICES
from tests.reference import dense_ef, dense_ggn


def _problem(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().to(device)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 4, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (12,), generator=gen).to(device)
    return model, nn.CrossEntropyLoss(), X, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["cg", "dense"])
@pytest.mark.parametrize("curvature", ["ggn", "empirical"])
def test_step_solves_damped_fisher_system(solver, curvature, device):
    model, loss_func, X, y = _problem(device)
    lam, lr = 0.5, 0.7  # well conditioned: dense solve and eigh agree to ~1e-12
    F = (dense_ggn if curvature == "ggn" else dense_ef)(model, loss_func, X, y)
    model.zero_grad()
    loss_func(model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = _flat(model) - lr * torch.linalg.solve(
        F + lam * torch.eye(F.shape[0], device=device), g
    )
    opt = ck.optim.NaturalGradient(
        model,
        loss_func,
        lr=lr,
        damping=lam,
        solver=solver,
        curvature=curvature,
        cg_tol=1e-12,
        cg_maxiter=500,
    )
    opt.step(lambda: loss_func(model(X), y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-7, atol=1e-9)


def test_bad_arguments():
    model, loss_func, _, _ = _problem("cpu")
    with pytest.raises(ShapeError, match="solver"):
        ck.optim.NaturalGradient(model, loss_func, solver="lu")
    with pytest.raises(ShapeError, match="damping"):
        ck.optim.NaturalGradient(model, loss_func, damping=0.0)


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(lr=float("nan")), "lr"),
        (dict(lr=0.0), "lr"),
        (dict(damping=float("nan")), "damping"),
        (dict(damping=float("inf")), "damping"),
        (dict(momentum=-0.1), "momentum"),
    ],
)
def test_bad_numbers_raise(options, name):
    model, loss_func, _, _ = _problem("cpu")
    with pytest.raises(ShapeError, match=name):
        ck.optim.NaturalGradient(model, loss_func, **options)


def test_parameter_listed_twice_raises():
    model, loss_func, _, _ = _problem("cpu")
    w = model[0].weight
    with pytest.raises(ShapeError, match="twice"):
        ck.optim.NaturalGradient(model, loss_func, [w, w])


def test_batchnorm_statistics_move_once_and_not_on_a_nan_batch():
    import copy
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    plain = copy.deepcopy(model)
    loss_func = nn.CrossEntropyLoss()
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    opt = ck.optim.NaturalGradient(model, loss_func, solver="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: loss_func(model(X), y))
    plain(X)
    assert model[1].num_batches_tracked.item() == 1
    assert torch.equal(model[1].running_mean, plain[1].running_mean)
    assert torch.equal(model[1].running_var, plain[1].running_var)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    bad = X.clone()
    bad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not torch.isfinite(opt.step(lambda: loss_func(model(bad), y)))
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert all(torch.equal(b, c) for b, c in zip(buffers, model.buffers()))
