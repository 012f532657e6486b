"""Shared test fixtures: devices and a table of tiny problems (model, loss, data).

Tests build problems by name with the ``make_case`` fixture, e.g.
``make_case("mlp", "ce", "mean", device)``; parametrise over the names below to
get readable ids (``mlp-ce-mean-cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

# The problems are tiny: thread-pool start-up and contention cost more than they
# save (a 4x6 layer_norm backward takes 20 ms with 2 busy threads, 0.1 ms with one).
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: Tiny models (D <= 120) by name; "norm_res" is not a Sequential.
MODELS = ("mlp", "cnn", "norm_res")
#: Losses by name.
LOSSES = ("mse", "ce", "bce")
REDUCTIONS = ("mean", "sum")
NUM_OUT = 3


class NormResidual(nn.Module):
    """Linear -> BatchNorm (eval) -> residual block with LayerNorm -> Linear."""

    def __init__(self, d_in: int = 4, width: int = 6, d_out: int = NUM_OUT):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.bn = nn.BatchNorm1d(width)
        self.block = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.bn(self.inp(x))
        h = h + torch.tanh(self.ln(self.block(h)))
        return self.out(h)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny model in float64 on CPU, in eval mode (BatchNorm statistics randomised)."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_OUT))
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 4 * 4, NUM_OUT)
        )
    elif name == "norm_res":
        model = NormResidual()
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.5, 0.5)
            model.ln.weight.uniform_(0.5, 1.5)
            model.ln.bias.uniform_(-0.5, 0.5)
    else:
        raise KeyError(name)
    return model.double().eval()


def make_loss(name: str, reduction: str) -> nn.Module:
    return {
        "mse": nn.MSELoss,
        "ce": nn.CrossEntropyLoss,
        "bce": nn.BCEWithLogitsLoss,
    }[name](reduction=reduction)


def make_data(model_name: str, loss_name: str, num: int = 6, seed: int = 1):
    """``(X, y)`` in float64 on CPU."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num, 1, 6, 6) if model_name == "cnn" else (num, 4)
    X = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if loss_name == "mse":
        y = torch.randn(num, NUM_OUT, generator=gen, dtype=torch.float64)
    elif loss_name == "ce":
        y = torch.randint(0, NUM_OUT, (num,), generator=gen)
    else:
        y = torch.randint(0, 2, (num, NUM_OUT), generator=gen).double()
    return X, y


@dataclass
class Case:
    """A problem on one device: ``model``, ``loss_func``, full data and its batches."""

    model: nn.Module
    loss_func: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    batches: list

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_case(
    model_name, loss_name, reduction, device="cpu", dtype=torch.float64, num=6, splits=(2, 4)
):
    """A :class:`Case`; ``batches`` split the data into ``splits`` sized batches."""
    model = make_model(model_name).to(device=device, dtype=dtype)
    X, y = make_data(model_name, loss_name, num)
    X = X.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    batches = list(zip(X.split(list(splits)), y.split(list(splits))))
    return Case(model, make_loss(loss_name, reduction), X, y, batches)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def make_case():
    """The :func:`build_case` function."""
    return build_case
