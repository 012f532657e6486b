"""Data-parallel curvature and K-FAC on ``torch.distributed``.

``operators``: exact operators whose products are summed over the processes' data
shards; ``kfac``: the communicator of data-parallel K-FAC and :func:`make_kfac`;
``launch``: re-running a command under ``torchrun``. Imports ``torch.distributed``
only; the single-process packages never import this one.
"""

from curvkit.distributed.kfac import DistributedCommunicator, DistributedError, make_kfac
from curvkit.distributed.operators import (
    DistributedOperator,
    distributed_empirical_fisher,
    distributed_fisher,
    distributed_ggn,
    distributed_hessian,
    distributed_loss_and_gradient,
)

__all__ = [
    "DistributedCommunicator",
    "DistributedError",
    "DistributedOperator",
    "distributed_empirical_fisher",
    "distributed_fisher",
    "distributed_ggn",
    "distributed_hessian",
    "distributed_loss_and_gradient",
    "make_kfac",
]
