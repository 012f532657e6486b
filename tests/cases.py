"""The one table of test problems: tiny models x losses x reductions x devices.

Two model families share the losses, reductions and devices:

- the operator problems (:data:`MODELS`: ``mlp``, ``cnn`` and ``norm_res``, which is
  not a ``Sequential`` and holds BatchNorm and LayerNorm), built by
  :func:`build_case` into a :class:`Case` with its data split into batches;
- the extraction problems (:data:`EXTRACTION_MODELS`, the chains of
  :data:`tests.reference.MODELS` whose layers the sweep factors), built by
  :func:`tests.reference.make_problem`.

:func:`grid` turns names into ``pytest.param`` rows with readable ids
(``mlp-ce-mean-cpu``); CUDA rows are skipped on machines without CUDA.
``conftest.py`` exposes the grids as the fixtures ``case`` and
``extraction_case``, so a test that takes one runs on every row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tests import reference

#: Every device a case can run on; :func:`grid` skips CUDA where it is absent.
ALL_DEVICES = ("cpu", "cuda")
#: The devices of this machine.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#: Tiny operator models (D <= 120) by name; "norm_res" is not a Sequential.
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
    model_name: str = ""
    loss_name: str = ""
    reduction: str = ""

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
    loss_func = make_loss(loss_name, reduction)
    return Case(model, loss_func, X, y, batches, model_name, loss_name, reduction)


#: Extraction models: Sequential chains of Linear / Conv layers (see tests/reference.py).
EXTRACTION_MODELS = tuple(reference.MODELS)


def grid(models, losses=LOSSES, reductions=REDUCTIONS, devices=ALL_DEVICES) -> list:
    """Rows ``(model, loss, reduction, device)`` of the product, with ids; CUDA skipped.

    Args:
        models: Model names.
        losses: Loss names.
        reductions: ``"mean"`` and/or ``"sum"``.
        devices: Device names; ``"cuda"`` rows carry a skip mark without CUDA.

    Returns:
        ``pytest.param`` rows for ``parametrize`` or fixture ``params``.
    """
    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    return [
        pytest.param(
            m, loss, red, dev, id=f"{m}-{loss}-{red}-{dev}", marks=no_cuda if dev == "cuda" else ()
        )
        for m, loss, red, dev in itertools.product(models, losses, reductions, devices)
    ]


def as_fixture_params(rows: list) -> list:
    """``grid`` rows as fixture ``params``: one tuple each, same ids and marks."""
    return [pytest.param(row.values, id=row.id, marks=row.marks) for row in rows]


#: Operator problems: every model, loss, reduction and device.
CASES = grid(MODELS)
#: Extraction problems: every chain, loss, reduction and device.
EXTRACTION_CASES = grid(EXTRACTION_MODELS)


@dataclass
class ExtractionCase:
    """An extraction problem: ``(net, loss_func, X, y)`` of :func:`tests.reference.make_problem`."""

    model_name: str
    loss_name: str
    reduction: str
    device: str
    net: nn.Module
    loss_func: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    def __iter__(self):
        return iter((self.net, self.loss_func, self.X, self.y))


def build_extraction_case(model_name, loss_name, reduction, device="cpu", **kwargs):
    """An :class:`ExtractionCase` (``kwargs`` go to :func:`tests.reference.make_problem`)."""
    problem = reference.make_problem(model_name, loss_name, reduction, device, **kwargs)
    return ExtractionCase(model_name, loss_name, reduction, device, *problem)
