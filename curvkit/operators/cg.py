r"""Conjugate-gradient inverse of a damped curvature operator.

:class:`CGInverse` applies :math:`(A + \lambda I)^{-1}` to the columns of a
``[D, k]`` matrix by (preconditioned) conjugate gradients (Hestenes & Stiefel
1952; Nocedal & Wright 2006, Alg. 5.3), all columns at once on the operator's
device: one product with ``A`` per iteration on the columns that have not
converged yet. It needs :math:`A + \lambda I` symmetric positive definite
(GGN, Fisher, empirical Fisher with :math:`\lambda > 0`; a Hessian only where
the damping makes it so — negative curvature stops the column and is reported).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvkit.errors import ShapeError
from curvkit.operators.base import CurvatureOperator


@dataclass
class CGInfo:
    r"""What the last solve did, one entry per column.

    Attributes:
        iterations: Iterations run per column.
        residuals: Final relative residual :math:`\|b - (A+\lambda I)x\| / \|b\|` per
            column (from the CG recursion).
        converged: Whether each column reached the tolerance.
        breakdown: Columns stopped by non-positive curvature
            :math:`p^\top (A+\lambda I) p \le 0`.
        history: Largest relative residual over the active columns, per iteration.
    """

    iterations: list[int] = field(default_factory=list)
    residuals: Tensor | None = None
    converged: Tensor | None = None
    breakdown: Tensor | None = None
    history: list[float] = field(default_factory=list)


class CGInverse(CurvatureOperator):
    r"""``(op + damping * I)^{-1}`` by batched conjugate gradients.

    Args:
        op: A symmetric operator ``A``.
        damping: :math:`\lambda` added to the diagonal.
        tol: Relative tolerance, column ``j`` stops when
            :math:`\|r_j\| \le \max(\text{tol}\,\|b_j\|, \text{atol})`.
        maxiter: Iteration limit (CG converges in at most ``D`` iterations in
            exact arithmetic).
        atol: Absolute tolerance.
        preconditioner: Optional operator applying :math:`M^{-1} \approx (A + \lambda I)^{-1}`
            (symmetric positive definite, e.g. a K-FAC inverse).

    Attributes:
        info: A :class:`CGInfo` about the last product.

    Raises:
        ShapeError: For a negative tolerance, ``maxiter < 1`` or a preconditioner
            of the wrong shape.

    Example:
        >>> import torch
        >>> from curvkit.operators.base import DenseOperator
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> x = CGInverse(A, damping=1.0, tol=1e-12) @ b
        >>> torch.allclose(x, torch.linalg.solve(A.matrix + torch.eye(2, dtype=torch.float64), b))
        True
    """

    def __init__(
        self,
        op: CurvatureOperator,
        damping: float = 0.0,
        tol: float = 1e-6,
        maxiter: int = 1000,
        atol: float = 0.0,
        preconditioner: CurvatureOperator | None = None,
    ):
        if tol < 0 or atol < 0:
            raise ShapeError(f"CGInverse: tol and atol must be >= 0, got tol={tol}, atol={atol}.")
        if maxiter < 1:
            raise ShapeError(f"CGInverse: maxiter must be >= 1, got {maxiter}.")
        if preconditioner is not None and preconditioner.shape != op.shape:
            raise ShapeError(
                f"CGInverse: preconditioner shape {preconditioner.shape} != operator shape "
                f"{op.shape}."
            )
        super().__init__(op.param_shapes, op.dtype, op.device, op.block_sizes, op.block_names)
        self.op = op
        self.damping = float(damping)
        self.tol = tol
        self.atol = atol
        self.maxiter = maxiter
        self.preconditioner = preconditioner
        self.info = CGInfo()

    def _apply_A(self, P: Tensor) -> Tensor:
        out = self.op.matmat(P)
        return out + self.damping * P if self.damping else out

    def _apply_M(self, R: Tensor) -> Tensor:
        return R.clone() if self.preconditioner is None else self.preconditioner.matmat(R)

    def _matmat(self, B: Tensor) -> Tensor:
        k = B.shape[1]
        X = torch.zeros_like(B)
        bnorm = B.norm(dim=0)
        threshold = torch.clamp(self.tol * bnorm, min=self.atol)
        res = bnorm.clone()
        iterations = torch.zeros(k, dtype=torch.long, device=B.device)
        breakdown = torch.zeros(k, dtype=torch.bool, device=B.device)
        info = CGInfo()
        active = torch.nonzero(res > threshold).squeeze(1)  # zero columns are solved by x = 0
        if active.numel():
            R = B[:, active].clone()
            Z = self._apply_M(R)
            P = Z.clone()
            rz = (R * Z).sum(0)
        for _ in range(self.maxiter):
            if active.numel() == 0:
                break
            AP = self._apply_A(P)
            pAp = (P * AP).sum(0)
            bad = pAp <= 0
            alpha = torch.where(
                bad, torch.zeros_like(rz), rz / torch.where(bad, torch.ones_like(pAp), pAp)
            )
            X[:, active] += alpha * P
            R -= alpha * AP
            rnorm = R.norm(dim=0)
            res[active] = rnorm
            iterations[active] += 1
            breakdown[active] = bad
            keep = (rnorm > threshold[active]) & ~bad
            # one device-to-host transfer per iteration: the stopping test and the history
            worst, all_kept = torch.stack(
                [(rnorm / bnorm[active]).max(), keep.all().to(rnorm.dtype)]
            ).tolist()
            info.history.append(worst)
            if not all_kept:
                active, R, P, rz = active[keep], R[:, keep], P[:, keep], rz[keep]
                if active.numel() == 0:
                    break
            Z = self._apply_M(R)
            rz_new = (R * Z).sum(0)
            P = Z + (rz_new / rz) * P
            rz = rz_new
        converged = (res <= threshold) & ~breakdown
        info.iterations = iterations.tolist()
        info.residuals = res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        info.converged = converged
        info.breakdown = breakdown
        self.info = info
        if not bool(converged.all()):
            n_bad = int((~converged).sum())
            reason = (
                "non-positive curvature"
                if bool(breakdown.any())
                else f"maxiter={self.maxiter} reached"
            )
            warnings.warn(
                f"CGInverse: {n_bad} of {k} columns did not reach tol={self.tol} ({reason}; "
                f"largest relative residual {float(info.residuals.max()):.3g}). Increase damping "
                "or maxiter.",
                stacklevel=3,
            )
        return X
