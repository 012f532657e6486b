"""Bad input raises curvkit errors that name the culprit and what is supported."""

import pytest
import torch
from torch import nn

from curvkit.errors import (
    ConfigError,
    CurvkitError,
    ShapeError,
    UnsupportedLossError,
    UnsupportedModuleError,
)
from curvkit.extraction import extract
from tests.reference import make_problem


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x)


UNSUPPORTED_MODULES = [
    pytest.param(nn.BatchNorm1d(4), "BatchNorm1d", id="batchnorm1d"),
    pytest.param(nn.LayerNorm(4), "LayerNorm", id="layernorm"),
    pytest.param(nn.Softmax(dim=1), "Softmax", id="softmax"),
    pytest.param(nn.PReLU(), "PReLU", id="prelu"),
]


@pytest.mark.parametrize("module,name", UNSUPPORTED_MODULES)
def test_unsupported_module_named(module, name):
    net = nn.Sequential(nn.Linear(5, 4), nn.Sequential(module), nn.Linear(4, 3)).double()
    _, loss_func, X, y = make_problem("mlp", "mse")
    with pytest.raises(UnsupportedModuleError, match=rf"{name} at position 1 \(name '1.0'\)") as e:
        extract(net, loss_func, X, y, backend="sweep")
    assert "Supported modules: " in str(e.value) and "Linear" in str(e.value)


CONV_PROBLEMS = [
    pytest.param(nn.Conv2d(2, 4, 3, groups=2), "grouped", id="groups"),
    pytest.param(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "padding_mode", id="reflect"
    ),
    pytest.param(nn.Conv2d(2, 4, 2, padding="same"), "asymmetric", id="same-even-kernel"),
    pytest.param(nn.Conv3d(2, 4, 1), "Conv3d", id="conv3d"),
    pytest.param(nn.MaxPool2d(2, return_indices=True), "return_indices", id="pool-indices"),
]


@pytest.mark.parametrize("module,match", CONV_PROBLEMS)
def test_unsupported_conv_options(module, match):
    net = nn.Sequential(module, nn.Flatten(), nn.LazyLinear(3)).double()
    X, y = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match=match):
        extract(net, nn.MSELoss(), X, y, backend="sweep")


BAD_LOSSES = [
    pytest.param(nn.NLLLoss(), "NLLLoss", id="nll"),
    pytest.param(nn.MSELoss(reduction="none"), "reduction='none'", id="none"),
    pytest.param(nn.CrossEntropyLoss(weight=torch.ones(3)), "weights", id="ce-weight"),
    pytest.param(nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing", id="ce-smooth"),
    pytest.param(nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight", id="bce-pos"),
]


@pytest.mark.parametrize("loss_func,match", BAD_LOSSES)
def test_unsupported_loss(loss_func, match):
    net, _, X, y = make_problem("mlp", "ce")
    with pytest.raises(UnsupportedLossError, match=match):
        extract(net, loss_func, X, y)


def test_ce_bad_targets():
    net, loss_func, X, y = make_problem("mlp", "ce")
    with pytest.raises(UnsupportedLossError, match="class-index"):
        extract(net, loss_func, X, torch.rand(6, 3, dtype=torch.float64))
    y[0] = 3  # a class index out of range (ignored targets, -100, are supported)
    with pytest.raises(ConfigError, match=r"class indices in \[0, 3\)"):
        extract(net, loss_func, X, y)
    with pytest.raises(ConfigError, match="every target in y equals ignore_index"):
        extract(net, loss_func, X, torch.full_like(y, -100))


BAD_ARGUMENTS = [
    pytest.param({"quantities": ("kfac", "hessian")}, "Unknown quantities", id="quantity"),
    pytest.param({"quantities": ("cross",)}, "at least one factor kind", id="cross-alone"),
    pytest.param({"mc_samples": 0}, "mc_samples", id="mc0"),
    pytest.param({"mc_samples": 1.5}, "mc_samples", id="mc-float"),
    pytest.param({"kfac_approx": "mean"}, "kfac_approx", id="approx"),
    pytest.param({"factor_dtype": torch.float16}, "factor_dtype", id="dtype"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, match):
    net, loss_func, X, y = make_problem("mlp", "mse")
    with pytest.raises(ShapeError, match=match):
        extract(net, loss_func, X, y, **kwargs)


def test_shapes():
    net, loss_func, X, y = make_problem("mlp", "mse")
    with pytest.raises(ShapeError, match="batch sizes: 6 and 5"):
        extract(net, loss_func, X, y[:5])
    with pytest.raises(ShapeError, match="targets shaped like"):
        extract(net, loss_func, X, y[:, :2])
    with pytest.raises(ShapeError, match="2-D input"):
        extract(net, loss_func, X[:, None].expand(-1, 2, -1), y, backend="sweep")


def test_not_sequential_and_kfra_with_conv():
    _, loss_func, X, y = make_problem("mlp", "mse")
    with pytest.raises(UnsupportedModuleError, match="nn.Sequential.*NotSequential"):
        extract(NotSequential().double(), loss_func, X, y, backend="sweep")
    net, loss_func, X, y = make_problem("cnn", "ce")
    with pytest.raises(UnsupportedModuleError, match="KFRA.*Conv2d at position 0"):
        extract(net, loss_func, X, y, ("kfra",))


def test_errors_are_curvkit_errors_and_nothing_is_touched():
    net, loss_func, X, y = make_problem("mlp", "mse")
    with pytest.raises(CurvkitError):
        extract(net, loss_func, X, y, ("bogus",))
    assert all(p.grad is None for p in net.parameters())
