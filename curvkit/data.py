"""The ``data`` argument: one ``(X, y)`` batch or an iterable of batches."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from curvkit.errors import ConfigError, ShapeError


def as_batches(data) -> list[tuple[Tensor, Tensor]]:
    """Normalise ``data`` to a list of ``(X, y)`` batches.

    Args:
        data: A tuple ``(X, y)`` of tensors, or an iterable (list, DataLoader)
            of such tuples.

    Returns:
        The batches as a list (a DataLoader is iterated once).

    Raises:
        ShapeError: If ``data`` is neither form, holds no batch, or a batch is
            not a pair of tensors, holds no example (an empty ``X`` or ``y``:
            every curvature is an average or sum over examples), or ``y``'s
            rows are no whole multiple of ``X``'s examples (first dimension).
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        _check_batch(0, data[0], data[1])
        return [(data[0], data[1])]
    if not isinstance(data, Iterable):
        raise ConfigError(
            "data must be an (X, y) tuple or an iterable of (X, y) batches, "
            f"got {type(data).__name__}."
        )
    batches = []
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError(f"data batch {i} is not an (X, y) pair: {type(batch).__name__}.")
        _check_batch(i, batch[0], batch[1])
        batches.append((batch[0], batch[1]))
    if not batches:
        raise ConfigError("data holds no batch.")
    return batches


def _check_batch(i: int, X, y) -> None:
    """A batch is two tensors, each with a leading dimension of at least one example."""
    for name, t in (("X", X), ("y", y)):
        if not isinstance(t, Tensor):
            raise ConfigError(f"data batch {i}: {name} is a {type(t).__name__}, not a tensor.")
    if X.ndim == 0 or X.shape[0] == 0:
        raise ShapeError(
            f"data batch {i} holds no example: X has shape {tuple(X.shape)} "
            "(the first dimension counts the examples and must be at least 1)."
        )
    if y.numel() == 0:
        raise ShapeError(f"data batch {i} holds no example: y has shape {tuple(y.shape)}.")
    if y.ndim == 0 or y.shape[0] % X.shape[0]:
        raise ShapeError(
            f"data batch {i}: X and y hold {X.shape[0]} and {y.shape[0] if y.ndim else 0} "
            f"examples (shapes {tuple(X.shape)} and {tuple(y.shape)}); y needs the same "
            "number of rows as X, or a whole number of rows per example (a model that "
            "flattens its [N, T, C] output to [N*T, C])."
        )


def num_data(batches: list[tuple[Tensor, Tensor]]) -> int:
    """Total number of examples ``N`` over the batches."""
    return sum(X.shape[0] for X, _ in batches)
