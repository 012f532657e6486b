"""Optimisers: K-FAC (block-diagonal and tri-diagonal) and the exact natural-gradient reference.

Data-parallel K-FAC (``make_kfac``, ``DistributedCommunicator``) lives in
:mod:`curvkit.distributed`; nothing here imports it.
"""

from curvkit.optim.config import KFACConfig
from curvkit.optim.kfac import KFAC
from curvkit.optim.ngd import NaturalGradient
from curvkit.optim.preconditioner import KroneckerPreconditioner

__all__ = [
    "KFAC",
    "KFACConfig",
    "KroneckerPreconditioner",
    "NaturalGradient",
]
