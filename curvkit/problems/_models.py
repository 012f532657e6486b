"""Seeded construction of the built-in models."""

from __future__ import annotations

import torch
from torch import nn

from curvkit.errors import ConfigError
from curvkit.problems.problem import Problem

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def activation_module(name: str) -> type[nn.Module]:
    """The activation class called ``name``; :class:`ShapeError` for an unknown one."""
    if name not in _ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}.")
    return _ACTIVATIONS[name]


def mlp(widths, activation: str, linear_at=()) -> list[nn.Module]:
    """Linear layers of ``widths`` with an activation after each hidden layer.

    ``linear_at`` lists hidden layer indices left without activation.
    """
    act = activation_module(activation)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2 and i not in linear_at:
            layers.append(act())
    return layers


def sparse_init_(model: nn.Sequential, nonzero: int = 15) -> None:
    """Sparse initialisation (Martens 2010, used by M&G 2015 §13).

    Each unit gets ``nonzero`` incoming weights drawn from :math:`N(0, 1)`, the
    others and the biases are zero.
    """
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
                k = min(nonzero, m.in_features)
                for row in m.weight:
                    row[torch.randperm(m.in_features)[:k]] = torch.randn(k)


def seeded_model(seed: int, build, dtype, device, init=None) -> nn.Sequential:
    """Build ``nn.Sequential(*build())`` on the CPU under a forked, seeded RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*build())
        if init is not None:
            init(model)
    return model.to(device=device, dtype=dtype)


def make_problem(
    name, seed, build, loss_func, train, test, description, task, dtype, device, init=None
) -> Problem:
    """A :class:`Problem` whose model is built by :func:`seeded_model`."""
    return Problem(
        name=name,
        model=seeded_model(seed, build, dtype, device, init),
        loss_func=loss_func,
        train=train,
        test=test,
        description=description,
        task=task,
        seed=seed,
    )
