"""Tiny seeded synthetic problems for tests, including cases where approximations are exact."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError
from curvkit.problems._data import check_sizes
from curvkit.problems._models import make_problem, mlp
from curvkit.problems.problem import Problem


def _generator(seed: int, n_train: int, n_test: int) -> torch.Generator:
    """The CPU generator all of a problem's data are drawn from, in a fixed order."""
    check_sizes(n_train, n_test)
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def tiny_mlp(
    seed: int = 0,
    task: str = "classification",
    n_train: int = 32,
    n_test: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """MLP 4-5-3 (tanh) on Gaussian inputs (43 parameters), for tests.

    Classification (cross-entropy) labels are the arg-max of a random linear
    teacher; regression (MSE) targets are ``sin`` of it plus noise.

    Args:
        seed: Seed of the initialisation and the data.
        task: ``"classification"`` or ``"regression"``.
        n_train: Training examples.
        n_test: Test examples.
        dtype: Floating-point type of model and data.
        device: Device of model and data.
    """
    tasks = {"classification": nn.CrossEntropyLoss, "regression": nn.MSELoss}
    if task not in tasks:
        raise ConfigError(f"tiny_mlp: task must be one of {sorted(tasks)}, got {task!r}.")
    gen = _generator(seed, n_train, n_test)
    X = _randn(gen, n_train + n_test, 4)
    logits = X @ _randn(gen, 4, 3)
    if task == "classification":
        y = logits.argmax(1)
    else:
        y = (torch.sin(logits) + 0.1 * _randn(gen, *logits.shape)).to(dtype)
    X = X.to(device=device, dtype=dtype)
    y = y.to(device)
    return make_problem(
        "tiny_mlp",
        seed,
        lambda: mlp((4, 5, 3), "tanh"),
        tasks[task](),
        (X[:n_train], y[:n_train]),
        (X[n_train:], y[n_train:]),
        f"MLP 4-5-3 (tanh), synthetic {task}",
        task,
        dtype,
        device,
    )


def tiny_cnn(
    seed: int = 0,
    n_train: int = 16,
    n_test: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """Two-conv CNN on random 1x6x6 images (95 parameters), cross-entropy, for tests.

    ``Conv2d(1, 2, 3)``-ReLU-``Conv2d(2, 2, 2)``-ReLU-Flatten-``Linear(18, 3)``:
    two conv layers of different spatial output size (4x4, then 3x3) and random
    labels. Arguments as in :func:`tiny_mlp`.
    """
    gen = _generator(seed, n_train, n_test)
    X = torch.randn(n_train + n_test, 1, 6, 6, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 3, (n_train + n_test,), generator=gen).to(device)

    def build():
        return [
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 2), nn.ReLU(),
            nn.Flatten(), nn.Linear(18, 3),
        ]  # fmt: skip

    return make_problem(
        "tiny_cnn",
        seed,
        build,
        nn.CrossEntropyLoss(),
        (X[:n_train], y[:n_train]),
        (X[n_train:], y[n_train:]),
        "CNN conv2-conv2-linear on random 1x6x6 images, cross-entropy",
        "classification",
        dtype,
        device,
    )


def linear_regression(
    seed: int = 0,
    in_features: int = 5,
    out_features: int = 2,
    n_train: int = 64,
    n_test: int = 32,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    r"""Linear least squares: one ``nn.Linear`` and ``MSELoss`` (12 parameters by default).

    Targets :math:`y = W_\star x + b_\star + \sigma\epsilon` with a random teacher.
    The loss is quadratic, so Hessian, GGN and type-2 Fisher coincide and equal
    their Kronecker factorisation :math:`\frac{2}{d_{out}} I \otimes \frac1N\sum_n
    \bar x_n \bar x_n^\top` exactly.

    Args:
        seed: Seed of the initialisation and the data.
        in_features: Input dimension.
        out_features: Output dimension.
        n_train: Training examples.
        n_test: Test examples.
        noise: Standard deviation :math:`\sigma` of the target noise.
        dtype: Floating-point type of model and data.
        device: Device of model and data.
    """
    gen, n = _generator(seed, n_train, n_test), n_train + n_test
    X = _randn(gen, n, in_features)
    y = X @ _randn(gen, in_features, out_features) + _randn(gen, out_features)
    y = y + noise * _randn(gen, n, out_features)
    X, y = X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    return make_problem(
        "linear_regression",
        seed,
        lambda: [nn.Linear(in_features, out_features)],
        nn.MSELoss(),
        (X[:n_train], y[:n_train]),
        (X[n_train:], y[n_train:]),
        f"linear least squares {in_features}->{out_features}, MSE",
        "regression",
        dtype,
        device,
    )


def deep_linear(
    seed: int = 0,
    widths: tuple[int, ...] = (4, 5, 4, 3),
    n_train: int = 32,
    n_test: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """Deep linear network (no activations) with MSE: 4-5-4-3 by default (64 parameters).

    The output Jacobians do not depend on the input, so type-2 K-FAC (KFLR)
    equals the block-diagonal GGN exactly: a case where the Kronecker
    approximation must be exact. Targets come from a random linear teacher plus
    noise. Other arguments as in :func:`linear_regression`.
    """
    gen, n = _generator(seed, n_train, n_test), n_train + n_test
    X = _randn(gen, n, widths[0])
    y = X @ _randn(gen, widths[0], widths[-1]) + 0.1 * _randn(gen, n, widths[-1])
    X, y = X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    return make_problem(
        "deep_linear",
        seed,
        lambda: [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])],
        nn.MSELoss(),
        (X[:n_train], y[:n_train]),
        (X[n_train:], y[n_train:]),
        f"deep linear network {'-'.join(map(str, widths))}, MSE",
        "regression",
        dtype,
        device,
    )
