"""Optimisers: K-FAC (block-diagonal and tri-diagonal) and the exact natural-gradient reference."""

from curvkit.optim.distributed import DistributedCommunicator, make_kfac
from curvkit.optim.kfac import KFAC
from curvkit.optim.ngd import NaturalGradient
from curvkit.optim.preconditioner import KroneckerPreconditioner

__all__ = [
    "KFAC",
    "DistributedCommunicator",
    "KroneckerPreconditioner",
    "NaturalGradient",
    "make_kfac",
]
