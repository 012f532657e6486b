"""The :class:`Problem` record and its mini-batch loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError

_SPLITS = ("train", "test")


@dataclass
class Problem:
    """A model, its loss and a train/test split of data, ready for curvature work.

    Attributes:
        name: Name in the table of built-in problems.
        model: The network on ``device`` in ``dtype``.
        loss_func: The loss, ``reduction="mean"``.
        train: ``(X, y)`` training tensors (for autoencoders ``y`` is ``X``).
        test: ``(X, y)`` test tensors.
        description: One line on model, data and loss.
        task: ``"classification"``, ``"regression"``, ``"autoencoder"`` or
            ``"language-model"``.
        seed: Seed the model (and, where it applies, the split) came from.
    """

    name: str
    model: nn.Module
    loss_func: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    description: str
    task: str
    seed: int = 0

    @property
    def num_params(self) -> int:
        """Number of trainable parameters of the model."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return self.train[0].shape[0]

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return self.test[0].shape[0]

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in _SPLITS:
            raise ConfigError(f"split must be one of {_SPLITS}, got {split!r}.")
        return self.train if split == "train" else self.test

    def loader(
        self,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int | None = None,
        split: str = "train",
        drop_last: bool = False,
    ) -> BatchLoader:
        """Mini-batches over one split, re-shuffled at every epoch.

        Args:
            batch_size: Examples per batch.
            shuffle: Draw a new permutation at every pass over the data.
            seed: Seed of the permutations (defaults to the problem's seed).
            split: ``"train"`` or ``"test"``.
            drop_last: Drop a last batch smaller than ``batch_size``.

        Returns:
            A re-iterable :class:`BatchLoader` of ``(X, y)`` batches.

        Raises:
            ConfigError: If ``split`` or ``batch_size`` is not valid.
        """
        X, y = self._split(split)
        return BatchLoader(
            X, y, batch_size, shuffle, self.seed if seed is None else seed, drop_last
        )

    def batches(
        self,
        batch_size: int = 128,
        split: str = "train",
        num_batches: int | None = None,
        shuffle: bool = False,
        seed: int | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """One pass of batches as a list, the ``data`` argument of the operators.

        Args:
            batch_size: Examples per batch (the last batch may be smaller).
            split: ``"train"`` or ``"test"``.
            num_batches: Keep only the first ``num_batches`` batches.
            shuffle: Permute the examples first (seeded).
            seed: Seed of the permutation (defaults to the problem's seed).

        Returns:
            A list of ``(X, y)`` batches.

        Raises:
            ConfigError: If an argument is not valid.
        """
        out = list(self.loader(batch_size, shuffle, seed, split))
        return out if num_batches is None else out[:num_batches]

    def batch(self, batch_size: int | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
        """The first ``batch_size`` examples of a split (all of them for ``None``).

        The splits are already in a seeded random order, so this is a random
        batch that is the same at every call.

        Raises:
            ConfigError: If ``split`` is not valid or ``batch_size`` is not positive.
        """
        X, y = self._split(split)
        if batch_size is None:
            return X, y
        check_batch_size(batch_size)
        return X[:batch_size], y[:batch_size]


class BatchLoader:
    """A minimal, device-native replacement for a ``DataLoader`` over two tensors.

    Batches are slices of the tensors (on their device); the permutation of each
    epoch comes from a CPU generator seeded once, so the sequence of epochs is
    reproducible and differs from epoch to epoch.
    """

    def __init__(
        self, X: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int, drop_last: bool
    ):
        check_batch_size(batch_size)
        self.X, self.y = X, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.X.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        size = self.batch_size
        order = torch.randperm(self.X.shape[0], generator=self._generator) if self.shuffle else None
        if order is not None:
            order = order.to(self.X.device)
        for start in range(0, len(self) * size, size):
            idx = slice(start, start + size) if order is None else order[start : start + size]
            yield self.X[idx], self.y[idx]


def check_batch_size(batch_size) -> None:
    """Raise :class:`ShapeError` unless ``batch_size`` is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}.")
