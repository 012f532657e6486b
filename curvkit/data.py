"""The ``data`` argument: one ``(X, y)`` batch or an iterable of batches."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from curvkit.errors import ShapeError


def as_batches(data) -> list[tuple[Tensor, Tensor]]:
    """Normalise ``data`` to a list of ``(X, y)`` batches.

    Args:
        data: A tuple ``(X, y)`` of tensors, or an iterable (list, DataLoader)
            of such tuples.

    Returns:
        The batches as a list (a DataLoader is iterated once).

    Raises:
        ShapeError: If ``data`` is neither form, or is empty.
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return [(data[0], data[1])]
    if not isinstance(data, Iterable):
        raise ShapeError(
            "data must be an (X, y) tuple or an iterable of (X, y) batches, "
            f"got {type(data).__name__}."
        )
    batches = []
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ShapeError(f"data batch {i} is not an (X, y) pair: {type(batch).__name__}.")
        batches.append((batch[0], batch[1]))
    if not batches:
        raise ShapeError("data holds no batch.")
    return batches


def num_data(batches: list[tuple[Tensor, Tensor]]) -> int:
    """Total number of examples ``N`` over the batches."""
    return sum(X.shape[0] for X, _ in batches)
