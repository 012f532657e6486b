"""Tied weights count once; Monte Carlo labels have one owner and refuse NaN outputs."""

import math

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import NonFiniteError, ShapeError, UnsupportedModuleError
from curvkit.extraction.losses import make_loss_handler, sample_labels
from curvkit.operators import _output_curvature as oc
from curvkit.operators.exact import loss_and_gradient

DT = torch.float64


def _tied_model():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight  # one Parameter in two Linear layers
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(3, 2)).to(DT)
    return model


def _data(N=7):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, generator=gen, dtype=DT), torch.randint(0, 2, (N,), generator=gen)


def _reference_forward(theta, X):
    """The tied network written out by hand: θ = [W, b1, b2, W3, b3] (W used twice)."""
    sizes = [9, 3, 3, 6, 2]
    W, b1, b2, W3, b3 = theta.split(sizes)
    W, W3 = W.reshape(3, 3), W3.reshape(2, 3)
    h = torch.tanh(X @ W.T + b1)
    h = torch.tanh(h @ W.T + b2)
    return h @ W3.T + b3


def _theta(model):
    parts = [model[0].weight, model[0].bias, model[2].bias, model[4].weight, model[4].bias]
    return torch.cat([p.detach().reshape(-1) for p in parts])


def test_exact_operators_count_a_tied_weight_once():
    model, (X, y) = _tied_model(), _data()
    loss_func = nn.CrossEntropyLoss()
    theta = _theta(model)
    D = theta.numel()
    assert D == 23 == sum(p.numel() for p in model.parameters())  # 32 with W counted twice

    def loss_of(t):
        return loss_func(_reference_forward(t, X), y)

    H_ref = torch.func.hessian(loss_of)(theta)
    J = torch.func.jacrev(lambda t: _reference_forward(t, X))(theta)  # [N, C, D]
    f = _reference_forward(theta, X)
    Lam = torch.func.hessian(lambda out: loss_func(out, y))(f)  # [N, C, N, C]
    G_ref = torch.einsum("ncd,ncme,mef->df", J, Lam, J)
    g_ref = torch.func.grad(loss_of)(theta)

    H = ck.hessian(model, loss_func, (X, y))
    G = ck.ggn(model, loss_func, (X, y))
    assert H.shape == G.shape == (D, D)
    # the flat order of the operators: 0.weight, 0.bias, 2.bias, 4.weight, 4.bias
    torch.testing.assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G.to_dense(), G_ref, rtol=1e-10, atol=1e-12)
    V = torch.randn(D, 2, dtype=DT)
    torch.testing.assert_close(G.quadratic_form(V), V.T @ G_ref @ V, rtol=1e-10, atol=1e-12)
    loss, grad = loss_and_gradient(model, loss_func, (X, y))
    torch.testing.assert_close(grad, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, loss_of(theta), rtol=1e-12, atol=0)


@pytest.mark.parametrize("build", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_parameter_listed_twice_raises(build):
    model, data = _tied_model(), _data()
    w = model[0].weight
    with pytest.raises(ShapeError, match=r"params\[1\] is params\[0\] \(0.weight\)"):
        getattr(ck, build)(model, nn.CrossEntropyLoss(), data, params=[w, w])
    # the same object under its second name is the same parameter
    with pytest.raises(ShapeError, match=r"params\[1\] is params\[0\]"):
        ck.ggn(model, nn.CrossEntropyLoss(), data, params=[model[0].weight, model[2].weight])
    with pytest.raises(ShapeError, match=r"params\[1\] is params\[0\]"):
        loss_and_gradient(model, nn.CrossEntropyLoss(), data, params=[w, w])


@pytest.mark.parametrize("kind", ["kfac", "kflr"])
@pytest.mark.parametrize("structure", ["block-diagonal", "tridiagonal"])
def test_kronecker_operators_refuse_tied_weights(kind, structure):
    model, data = _tied_model(), _data()
    with pytest.raises(UnsupportedModuleError, match=r"'0.weight' \(Linear\) and '2.weight'"):
        ck.kfac(model, nn.CrossEntropyLoss(), data, kind=kind, structure=structure)
    with pytest.raises(UnsupportedModuleError, match="tied"):
        ck.diag_ggn(model, nn.CrossEntropyLoss(), data)


def test_module_used_twice_is_a_tied_weight():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 2)).to(DT)
    with pytest.raises(UnsupportedModuleError, match=r"'0.weight' \(Linear\) and '2.weight'"):
        ck.kfac(model, nn.CrossEntropyLoss(), _data())


# -- Monte Carlo labels ----------------------------------------------------------------------

LOSSES = [
    (nn.MSELoss(), lambda N: torch.randn(N, 3, dtype=DT)),
    (nn.CrossEntropyLoss(), lambda N: torch.randint(0, 3, (N,))),
    (nn.BCEWithLogitsLoss(), lambda N: torch.rand(N, 3, dtype=DT).round()),
]


@pytest.mark.parametrize("loss_func, target", LOSSES, ids=["mse", "ce", "bce"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_from_a_non_finite_output_raises(loss_func, target, bad):
    f = torch.randn(5, 3, dtype=DT)
    f[2, 1] = bad
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(NonFiniteError, match=type(loss_func).__name__):
        sample_labels(loss_func, f, 2, gen)
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(FloatingPointError):  # NonFiniteError is one
        make_loss_handler(loss_func, f, target(5)).sqrt_hessian_sampled(2, gen)
    with pytest.raises(FloatingPointError):
        oc.sample_scores(loss_func, f, target(5), 2, gen)


def test_kfac_on_nan_data_raises_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    X[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        ck.kfac(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(NonFiniteError):
        ck.fisher(model, nn.CrossEntropyLoss(), (X, y), mc_samples=1) @ torch.ones(31, dtype=DT)


def test_empty_batch_is_a_clear_error():
    with pytest.raises(ShapeError, match="empty"):
        make_loss_handler(
            nn.CrossEntropyLoss(), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
        )


@pytest.mark.parametrize("loss_func, target", LOSSES, ids=["mse", "ce", "bce"])
@pytest.mark.parametrize("M", [1, 4])
def test_extraction_and_mc_fisher_draw_the_same_labels(loss_func, target, M):
    """One sampler: the extraction's sampled columns are the operator's scores, rescaled."""
    f = torch.randn(5, 3, dtype=DT)
    y = target(5)
    columns = make_loss_handler(loss_func, f, y).sqrt_hessian_sampled(
        M, torch.Generator().manual_seed(3)
    )
    scores = oc.sample_scores(loss_func, f, y, M, torch.Generator().manual_seed(3))
    c_eff = 1 if isinstance(loss_func, nn.CrossEntropyLoss) else 3
    if isinstance(loss_func, nn.MSELoss):
        # columns: (2/C)(f - y_hat)/sqrt(2/C M) ... with y_hat = f + sqrt(C/2) eps;
        # scores: 2 (f - y_hat') with y_hat' = f + sqrt(1/2) eps (same eps)
        expected = scores * (-math.sqrt(2.0 / c_eff / M) / (2 * math.sqrt(0.5)))
        torch.testing.assert_close(columns, expected, rtol=1e-7, atol=0)  # float32 sqrt(1/2)
    else:
        torch.testing.assert_close(columns, scores / math.sqrt(c_eff * M), rtol=1e-15, atol=1e-15)
