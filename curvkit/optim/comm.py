"""Collectives of the optimisers, with a single-process default.

:class:`Communicator` is what :class:`~curvkit.optim.KFAC` and its
:class:`~curvkit.optim.preconditioner.KroneckerPreconditioner` call wherever data
parallel training must agree across processes. It holds collectives only:
averaging labelled tensors and numbers, agreeing on a flag, and sharing out
per-layer work (:meth:`Communicator.distribute`) whose pieces the caller
assembles. The default implementation is one process: every collective is the
identity and all work is done here. :mod:`curvkit.distributed.kfac` implements it
on ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext

from torch import Tensor


class Communicator:
    """Single-process communicator: every collective is the identity."""

    rank = 0
    world_size = 1

    def average_(self, tensors: list[Tensor], symmetric: int = 0, label: str = "other") -> None:
        """Average ``tensors`` over processes, in place.

        Args:
            tensors: Floating-point tensors (``None`` entries are skipped).
            symmetric: The first ``symmetric`` tensors are symmetric matrices: only
                their upper triangles need to travel.
            label: What is averaged (e.g. ``"gradients"``, ``"factors"``); timers and
                counters are kept per label.
        """

    def average_scalar(self, value: float) -> float:
        """Average a Python number over processes."""
        return value

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        return flag

    @property
    def shares_work(self) -> bool:
        """Whether :meth:`distribute` divides work between processes (here: no)."""
        return False

    def distribute(
        self,
        label: str,
        costs: Sequence[float],
        compute: Callable[[int], object],
        key: Hashable = None,
        *,
        like: Tensor | None = None,
    ) -> list:
        """``compute(i)`` for every item ``i``, each on one process, the results on all.

        Args:
            label: What is computed, for timers and error messages.
            costs: One cost per item (their number is the number of items); a
                distributed implementation balances the processes by them.
            compute: Item ``i``'s result: a nest of lists, tuples and tensors.
            key: Changes exactly when the results' sizes may change (a distributed
                implementation caches its plan per key).
            like: A tensor of the dtype and device the results travel in.

        Returns:
            The results, in item order (here: all computed on this process).
        """
        return [compute(i) for i in range(len(costs))]

    def timed(self, phase: str) -> AbstractContextManager:
        """A context that times local work under ``phase`` (here: not timed)."""
        return nullcontext()
