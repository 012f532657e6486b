r"""Exact curvature operators on data sharded over processes (``torch.distributed``).

Each process builds an operator on its own shard of the data;
:class:`DistributedOperator` sums the processes' products with the weights that
make the result the operator of the whole data set (docs/conventions.md):
with :math:`N_r` examples on process :math:`r` and :math:`N = \sum_r N_r`,

.. math::
   M v = \sum_r w_r M_r v, \qquad
   w_r = N_r / N \ (\texttt{reduction="mean"}), \quad w_r = 1 \ (\texttt{"sum"}),

one all-reduce per product. This is exact for the matrices that are sums over
examples (Hessian, GGN, Fisher, empirical Fisher, their diagonals), not for
Kronecker approximations (a Kronecker product of averages is not the average of
Kronecker products).

Everything built on products then runs on several processes:
:func:`curvkit.eigenvalues`, :func:`curvkit.spectral_density`, :func:`curvkit.trace`,
CG inverses. Every process must run the same calls with the same arguments: the
estimators draw their probes from a ``torch.Generator`` seeded with their ``seed``
argument (Lanczos start vectors, Rademacher probes, SciPy's ``v0``), so equal seeds
give equal probes on every process; ``check_inputs=True`` verifies it at each product.
The ``distributed_*`` functions return the plain operator of the local data when
``torch.distributed`` is not initialised, so one script runs with and without ``torchrun``.

Example (one of two processes, ``torchrun --nproc_per_node 2``)::

    import torch.distributed as dist, curvkit as ck
    from curvkit.distributed import distributed_ggn

    dist.init_process_group("gloo")
    G = distributed_ggn(model, loss_func, local_batches)  # this process's shard
    top = ck.eigenvalues(G, k=10)         # the same on every process
    density = ck.spectral_density(G, seed=0)
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvkit.data import as_batches
from curvkit.errors import ConfigError, ShapeError
from curvkit.operators import exact
from curvkit.operators.base import CurvatureOperator
from curvkit.operators.cg import CGInverse

REDUCTIONS = ("mean", "sum")


class DistributedOperator(CurvatureOperator):
    r"""The operator of the whole data set from one operator per process on its shard.

    Args:
        op: This process's operator (same parameters, in the same order, on every process).
        process_group: The processes sharing the data (default: all).
        num_data: :math:`N_r`, examples in this process's shard (default: ``op.num_data``,
            which the exact operators have).
        reduction: ``"mean"`` or ``"sum"``, the loss's reduction (default: that of
            ``op.loss_func``).
        check_inputs: Verify at every product that all processes multiply the same
            matrix (one more small all-reduce per product).

    Attributes:
        weight: :math:`w_r` of this process.
        total_data: :math:`N`.

    Raises:
        ShapeError: If ``op`` is not an operator, its normalisation cannot be inferred,
            ``torch.distributed`` is not initialised, or the processes' operators differ
            in size.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        process_group=None,
        num_data: int | None = None,
        reduction: str | None = None,
        check_inputs: bool = False,
    ):
        if not isinstance(op, CurvatureOperator):
            raise ConfigError(
                "DistributedOperator: expected a curvkit CurvatureOperator, "
                f"got {type(op).__name__}."
            )
        num_data = getattr(op, "num_data", None) if num_data is None else num_data
        if reduction is None and hasattr(op, "loss_func"):
            reduction = getattr(op.loss_func, "reduction", None)
        if num_data is None or reduction not in REDUCTIONS:
            raise ConfigError(
                f"DistributedOperator: cannot tell how {type(op).__name__} is normalised; pass "
                f"num_data= (examples on this process) and reduction= (one of {REDUCTIONS}). "
                "Note that summing Kronecker approximations over shards does not give the "
                "Kronecker approximation of all data."
            )
        _check_initialised("DistributedOperator")
        super().__init__(op.param_shapes, op.dtype, op.device, op.block_sizes, op.block_names)
        self.op = op
        # weakly held: a group must not outlive destroy_process_group() (gloo may abort)
        self._group = None if process_group is None else weakref.ref(process_group)
        self.check_inputs = check_inputs
        total = torch.tensor([float(num_data)], dtype=torch.float64, device=op.device)
        dims = torch.tensor([float(op.dim), -float(op.dim)], dtype=torch.float64, device=op.device)
        dist.all_reduce(total, group=process_group)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=process_group)
        if dims[0] != -dims[1]:
            raise ShapeError(
                f"DistributedOperator: the processes' operators differ in size (D between "
                f"{int(-dims[1])} and {int(dims[0])}); build them on the same parameters."
            )
        self.total_data = int(total.item())
        self.weight = num_data / self.total_data if reduction == "mean" else 1.0

    @property
    def group(self):
        """The process group (``None``: the default group).

        Raises:
            RuntimeError: If the group was destroyed.
        """
        if self._group is None:
            return None
        group = self._group()
        if group is None:
            raise RuntimeError("DistributedOperator: its process group was destroyed.")
        return group

    def _matmat(self, X: Tensor) -> Tensor:
        if self.check_inputs:
            self._check_same(X)
        Y = self.op.matmat(X)
        Y = (Y * self.weight) if self.weight != 1.0 else Y.contiguous()
        dist.all_reduce(Y, group=self.group)
        return Y

    def _check_same(self, X: Tensor) -> None:
        summary = torch.stack([X.sum(), (X * X).sum(), X.abs().max()]).to(torch.float64)
        both = torch.cat([summary, -summary])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(both[:3], -both[3:]):
            raise ConfigError(
                "DistributedOperator: the processes multiply different matrices; give every "
                "process the same vectors (estimators: the same seed)."
            )

    def inverse(self, damping: float = 0.0, **kwargs) -> CGInverse:
        """``(self + damping * I)^{-1}`` by conjugate gradients (see :class:`CGInverse`)."""
        return CGInverse(self, damping=damping, **kwargs)


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _wrap(op: CurvatureOperator, process_group, kwargs) -> CurvatureOperator:
    return DistributedOperator(op, process_group, **kwargs) if _initialised() else op


def _check_initialised(where: str) -> None:
    if not _initialised():
        raise ConfigError(
            f"{where}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first (torchrun sets its environment)."
        )


def distributed_hessian(
    model: nn.Module,
    loss_func: nn.Module,
    local_data,
    params: Sequence[Tensor] | None = None,
    process_group=None,
    **kwargs,
) -> DistributedOperator:
    r"""The Hessian of the loss on the data of all processes.

    Args:
        model: The model (the same parameters on every process).
        loss_func: The loss (``reduction`` ``"mean"`` or ``"sum"``).
        local_data: This process's ``(X, y)`` or iterable of batches.
        params: Parameters (default: all with ``requires_grad``).
        process_group: The processes sharing the data (default: all).
        **kwargs: Passed on to :class:`DistributedOperator` (``check_inputs``).

    Returns:
        A :class:`DistributedOperator` around :func:`curvkit.hessian` of the shard;
        without an initialised ``torch.distributed``, the plain operator of
        ``local_data`` (so that one script runs with and without ``torchrun``).
    """
    op = exact.hessian(model, loss_func, local_data, params=params)
    return _wrap(op, process_group, kwargs)


def distributed_ggn(
    model: nn.Module,
    loss_func: nn.Module,
    local_data,
    params: Sequence[Tensor] | None = None,
    process_group=None,
    **kwargs,
) -> DistributedOperator:
    """The GGN on the data of all processes; arguments as :func:`distributed_hessian`."""
    op = exact.ggn(model, loss_func, local_data, params=params)
    return _wrap(op, process_group, kwargs)


def distributed_fisher(
    model: nn.Module,
    loss_func: nn.Module,
    local_data,
    mc_samples: int | None = None,
    seed: int = 0,
    params: Sequence[Tensor] | None = None,
    process_group=None,
    **kwargs,
) -> DistributedOperator:
    """The Fisher on the data of all processes (see :func:`curvkit.fisher`).

    Monte Carlo labels (``mc_samples``) are drawn with seed ``seed + rank``, so the
    shards' samples are independent; the result is a Monte Carlo Fisher of all data,
    not the one a single process would draw with ``seed``.
    """
    rank = dist.get_rank(process_group) if _initialised() else 0
    op = exact.fisher(
        model, loss_func, local_data, mc_samples=mc_samples, seed=seed + rank, params=params
    )
    return _wrap(op, process_group, kwargs)


def distributed_empirical_fisher(
    model: nn.Module,
    loss_func: nn.Module,
    local_data,
    params: Sequence[Tensor] | None = None,
    process_group=None,
    **kwargs,
) -> DistributedOperator:
    """The empirical Fisher on the data of all processes; as :func:`distributed_hessian`."""
    op = exact.empirical_fisher(model, loss_func, local_data, params=params)
    return _wrap(op, process_group, kwargs)


def distributed_loss_and_gradient(
    model: nn.Module,
    loss_func: nn.Module,
    local_data,
    params: Sequence[Tensor] | None = None,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """Loss and flat gradient on the data of all processes (one all-reduce).

    Returns:
        ``(loss, gradient)`` as :func:`curvkit.operators.exact.loss_and_gradient` of
        the concatenated data, the same on every process (of ``local_data`` alone
        without an initialised ``torch.distributed``).
    """
    batches = as_batches(local_data)
    n = sum(X.shape[0] for X, _ in batches)
    loss, grad = exact.loss_and_gradient(model, loss_func, batches, params)
    if not _initialised():
        return loss, grad
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in REDUCTIONS:
        raise ConfigError(
            f"distributed_loss_and_gradient: reduction={reduction!r} is not one of {REDUCTIONS}."
        )
    weight = float(n) if reduction == "mean" else 1.0
    buf = torch.cat([grad * weight, (loss * weight).reshape(1), grad.new_full((1,), float(n))])
    dist.all_reduce(buf, group=process_group)
    scale = buf[-1] if reduction == "mean" else 1.0
    return buf[-2] / scale, buf[:-2] / scale
