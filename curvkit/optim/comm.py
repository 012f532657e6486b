"""Communication points of the optimisers, with a single-process default.

:class:`Communicator` is what :class:`~curvkit.optim.KFAC` calls wherever data
parallel training must agree across processes: averaging gradients, Kronecker
statistics and curvature products, agreeing on a rejected step, and dividing
inverse work. The default implementation does nothing (one process);
:mod:`curvkit.distributed.kfac` implements it on ``torch.distributed``.
"""

from __future__ import annotations

from torch import Tensor


class Communicator:
    """Single-process communicator: every collective is the identity."""

    rank = 0
    world_size = 1

    def average_(self, tensors: list[Tensor], symmetric: int = 0) -> None:
        """Average ``tensors`` over processes, in place.

        The first ``symmetric`` tensors are symmetric matrices: only their upper
        triangles need to travel.
        """

    def average_scalar(self, value: float) -> float:
        """Average a Python number over processes."""
        return value

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process."""
        return flag

    def refresh(self, preconditioner, damping: float) -> None:
        """Rebuild the preconditioner's inverse (here: on this process, for every layer)."""
        preconditioner.refresh(damping)
