"""``extract(..., unsupported="gradient")``: modules without factors get exact gradients."""

import copy

import pytest
import torch
from torch import nn

from curvkit import extract
from curvkit.errors import UnsupportedModuleError
from tests.reference import assert_allclose_report, brute_force_factors

DT = torch.float64


def _model(train_bn: bool):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.LayerNorm(5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    ).to(DT)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        for m in (model[1], model[4]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    model.train(train_bn)
    return model


def _data(N=10):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N, 4, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen)


@pytest.mark.parametrize("train_bn", [False, True], ids=["bn-eval", "bn-train"])
def test_gradients_of_every_parameter_equal_autograd(train_bn):
    model = _model(train_bn)
    ref = copy.deepcopy(model)
    X, y = _data()
    loss_func = nn.CrossEntropyLoss()
    rec = extract(model, loss_func, X, y, quantities=("kfac",), unsupported="gradient")
    loss_func(ref(X), y).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert_allclose_report(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert [r.name for r in rec] == ["0", "3", "6"]
    assert [name for name, _, _ in rec.unfactored] == ["1", "4"]
    assert rec.unfactored[0][2] == [model[1].weight, model[1].bias]
    # one forward pass: the running statistics moved exactly as in one plain forward
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=1e-12, atol=0)
    assert int(model[1].num_batches_tracked) == int(ref[1].num_batches_tracked)


@pytest.mark.parametrize("kind", ["kflr", "empirical"])
def test_factors_around_unfactored_modules_match_brute_force(kind):
    model = _model(train_bn=False)
    for m in (model[1], model[4]):
        m.requires_grad_(False)  # the brute-force reference factors trainable layers only
    X, y = _data()
    loss_func = nn.CrossEntropyLoss()
    rec = extract(model, loss_func, X, y, quantities=(kind, "cross"), unsupported="gradient")
    ref = brute_force_factors(model, loss_func, X, y, kind=kind)
    assert rec.unfactored == []  # frozen: passed through, nothing to update
    for r, f in zip(rec, ref):
        assert_allclose_report(r.A, f["A"], rtol=1e-10, atol=1e-12)
        assert_allclose_report(r.G[kind], f["G"], rtol=1e-10, atol=1e-12)
        if f["cross_A"] is not None:
            assert_allclose_report(r.cross_A, f["cross_A"], rtol=1e-10, atol=1e-12)
            assert_allclose_report(r.cross_G[kind], f["cross_G"], rtol=1e-10, atol=1e-12)


def test_default_still_raises_and_names_the_option():
    model = _model(train_bn=False)
    X, y = _data()
    with pytest.raises(UnsupportedModuleError, match="unsupported='gradient'"):
        extract(model, nn.CrossEntropyLoss(), X, y, backend="sweep")


def test_grouped_conv_gets_gradients_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    ).to(DT)
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(5, 2, 6, 6, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=gen)
    rec = extract(model, nn.CrossEntropyLoss(), X, y, quantities=("kflr",), unsupported="gradient")
    nn.CrossEntropyLoss()(ref(X), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_allclose_report(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert [r.name for r in rec] == ["2", "4"] and rec.unfactored[0][0] == "0"
