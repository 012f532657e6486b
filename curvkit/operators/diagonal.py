r"""Diagonal curvature approximations: GGN (exact or Monte Carlo) and Hessian diagonals.

The diagonals come from one extraction pass (BackPACK's ``DiagGGNExact``,
``DiagGGNMC`` and ``DiagHessian`` quantities; Dangel et al. 2020,
arXiv:1912.10985): :math:`\operatorname{diag}(R\sum_n J_n^\top\Lambda_n J_n)`, its
Monte Carlo estimate, and :math:`\operatorname{diag}(\nabla^2_\theta L)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from curvkit.errors import ShapeError
from curvkit.extraction.batches import extract_batches
from curvkit.operators import kron_math as km
from curvkit.operators.base import CurvatureOperator
from curvkit.records import Records


def in_model_order(model: torch.nn.Module, records: Records) -> Records:
    """``records`` with the layers in ``model.parameters()`` order (graph path: call order).

    Unchanged if a layer's parameters are not contiguous in the model's order.
    """
    pos = {id(p): k for k, p in enumerate(model.parameters())}
    layers = sorted(records.layers, key=lambda r: pos.get(id(r.params[0]), len(pos)))
    flat = [pos.get(id(p), len(pos)) for r in layers for p in r.params]
    if flat != sorted(flat):
        return records
    return replace(records, layers=layers)


#: Diagonal quantities of :class:`~curvkit.records.LayerRecord`.
DIAGONALS = ("diag_ggn", "diag_ggn_mc", "diag_hessian")


class DiagonalOperator(CurvatureOperator):
    """A diagonal matrix over the flat parameter space.

    Args:
        diagonals: One tensor per parameter, shaped like it, in flat order.
        block_sizes: Sizes of the blocks (default: one per parameter).
        block_names: A name per block.
    """

    def __init__(
        self,
        diagonals: Sequence[Tensor],
        block_sizes: Sequence[int] | None = None,
        block_names: Sequence[str] | None = None,
    ):
        first = diagonals[0]
        super().__init__(
            [d.shape for d in diagonals], first.dtype, first.device, block_sizes, block_names
        )
        self.diagonal = torch.cat([d.reshape(-1) for d in diagonals])

    @classmethod
    def from_records(cls, records: Records, which: str = "diag_ggn") -> DiagonalOperator:
        """The diagonal ``which`` of ``records``, one block per layer.

        Raises:
            ShapeError: If ``which`` is unknown or was not extracted.
        """
        if which not in DIAGONALS:
            raise ShapeError(f"which={which!r} is not supported; use one of {DIAGONALS}.")
        if any(getattr(rec, which) is None for rec in records):
            raise ShapeError(
                f"The records hold no {which!r}; extract with quantities=({which!r},)."
            )
        diagonals = [d for rec in records for d in getattr(rec, which)]
        return cls(diagonals, [rec.numel for rec in records], [rec.name for rec in records])

    def _matmat(self, X: Tensor) -> Tensor:
        return self.diagonal[:, None] * X

    def to_dense(self, chunk_size: int = 512) -> Tensor:
        """The ``D x D`` diagonal matrix."""
        return torch.diag(self.diagonal)

    def _like(self, values: Tensor) -> DiagonalOperator:
        parts = [v.reshape(s) for v, s in zip(values.split(self.param_numels), self.param_shapes)]
        return DiagonalOperator(parts, self.block_sizes, self.block_names)

    def inverse(self, damping: float = 0.0) -> DiagonalOperator:
        r""":math:`(D + \lambda I)^{-1}`; at ``damping=0`` zero entries stay zero (pseudo-inverse).

        A Hessian diagonal can have negative entries; the inverse is then that of
        an indefinite matrix, and entries with :math:`d + \lambda = 0` are set to zero.

        Raises:
            ShapeError: On a negative damping.
        """
        if damping < 0:
            raise ShapeError(f"damping must be non-negative, got {damping}.")
        shifted = self.diagonal + damping
        pseudo = damping == 0 or bool((shifted <= 0).any())
        return self._like(km.safe_reciprocal(shifted, pseudo=pseudo))

    def logdet(self, damping: float = 0.0) -> Tensor:
        r""":math:`\sum \log(d + \lambda)`."""
        return torch.log(self.diagonal + damping).sum()

    def trace(self) -> Tensor:
        r""":math:`\sum d`."""
        return self.diagonal.sum()


def diag_ggn(
    model: torch.nn.Module,
    loss_func: torch.nn.Module,
    data,
    exact: bool = True,
    mc_samples: int = 1,
    seed: int = 0,
) -> DiagonalOperator:
    r"""Diagonal of the GGN, exact or Monte Carlo, on a data set.

    Args:
        model: An ``nn.Sequential`` of supported modules.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: One ``(X, y)`` batch or an iterable of batches.
        exact: Exact diagonal (``True``) or Monte Carlo estimate with sampled labels.
        mc_samples: Monte Carlo samples per example (``exact=False``).
        seed: Seed of the label sampling.

    Returns:
        A :class:`DiagonalOperator` with one block per layer.

    Example:
        >>> import torch, curvkit as ck
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> ck.diag_ggn(model, nn.CrossEntropyLoss(), (X, y)).block_sizes
        [15, 8]
    """
    which = "diag_ggn" if exact else "diag_ggn_mc"
    records = extract_batches(model, loss_func, data, (which,), seed=seed, mc_samples=mc_samples)
    return DiagonalOperator.from_records(in_model_order(model, records), which)


def diag_hessian(model: torch.nn.Module, loss_func: torch.nn.Module, data) -> DiagonalOperator:
    r"""Diagonal of the Hessian :math:`\nabla^2_\theta L` on a data set.

    Args:
        model: An ``nn.Sequential`` of supported modules.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: One ``(X, y)`` batch or an iterable of batches.

    Returns:
        A :class:`DiagonalOperator` with one block per layer.
    """
    records = in_model_order(model, extract_batches(model, loss_func, data, ("diag_hessian",)))
    return DiagonalOperator.from_records(records, "diag_hessian")
