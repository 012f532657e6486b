r"""Krylov-subspace kernels on curvature operators: Lanczos and restarted Lanczos.

Everything runs in torch on the operator's device and dtype (no NumPy round
trip), with full re-orthogonalisation (classical Gram-Schmidt; "twice is
enough", Parlett 1998, *The Symmetric Eigenvalue Problem*; :func:`lanczos`
skips the second pass when the first removed little, the test of Daniel,
Gragg, Kaufman & Stewart 1976):

- :func:`lanczos` runs independent Lanczos recurrences on the columns of a
  ``[D, b]`` start matrix at once (one ``[D, b]`` product per step): the kernel
  of stochastic Lanczos quadrature.
- :func:`krylov_schur` is a restarted symmetric eigensolver (Krylov-Schur,
  Stewart 2001, *SIAM J. Matrix Anal. Appl.* 23(3); for symmetric matrices it
  coincides with thick-restart Lanczos, Wu & Simon 2000).

Linear solves use :class:`curvkit.operators.cg.CGInverse`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from curvkit.errors import ConfigError
from curvkit.operators.base import CurvatureOperator

#: Orderings of Ritz values understood by :func:`krylov_schur`.
WHICH = ("LA", "SA", "LM")


def rademacher(dim: int, num: int, generator: torch.Generator, dtype, device) -> Tensor:
    """A ``[dim, num]`` matrix of independent ``±1`` entries."""
    Z = torch.randint(0, 2, (dim, num), generator=generator, dtype=dtype, device=device)
    return Z.mul_(2).sub_(1)


def make_generator(seed: int, device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


#: A re-orthogonalisation pass that keeps at least this fraction of the vector's norm
#: needs no second pass (Daniel, Gragg, Kaufman & Stewart 1976).
_DGKS = 0.5**0.5


def _masked_div(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    """``num / den`` where ``mask`` holds (broadcast over rows), zero elsewhere."""
    return torch.where(
        mask, num / torch.where(mask, den, torch.ones_like(den)), torch.zeros_like(num)
    )


def _orthogonalise(w: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the span of the orthonormal columns of ``Q`` from ``w`` (two CGS passes).

    Returns the projected vector and the coefficients ``Qᵀ w`` of the original.
    """
    h = Q.T @ w
    w = w - Q @ h
    h2 = Q.T @ w
    return w - Q @ h2, h + h2


def _project(basis: Tensor, w: Tensor) -> Tensor:
    """Column ``i`` of ``w`` projected onto the rows of ``basis[i]`` (``[b, j, D]``, ``[D, b]``).

    One matrix-vector pair per column: a batched ``einsum`` over the strided
    slices of the basis ran 4-5 times slower on the CPU.
    """
    out = torch.empty_like(w)
    for i in range(w.shape[1]):
        out[:, i] = (basis[i] @ w[:, i]) @ basis[i]
    return out


def lanczos(op: CurvatureOperator, V0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    r"""Run ``b`` independent Lanczos recurrences with full re-orthogonalisation.

    Column ``i`` of ``V0`` starts a recurrence that builds an orthonormal basis
    :math:`Q_i` of the Krylov space :math:`\mathcal K_m(A, v_i)` and the
    tridiagonal :math:`T_i = Q_i^\top A Q_i` (Golub & Van Loan 2013, §10.1).
    An exhausted Krylov space (:math:`\beta_j \le \sqrt{\epsilon}\,\|A q_j\|`)
    ends a recurrence: its later coefficients are zero, so :math:`T_i` splits
    into the exact part and a zero block that carries no quadrature weight.

    Args:
        op: Symmetric operator ``A`` (``D x D``).
        V0: Start vectors ``[D, b]`` (normalised here).
        steps: Number of steps ``m`` (at most ``D``).

    Returns:
        ``(alpha, beta)``: diagonals ``[b, m]`` and off-diagonals ``[b, m - 1]``.
    """
    D, b = V0.shape
    m = min(int(steps), D)
    eps = torch.finfo(V0.dtype).eps
    Q = V0.new_zeros(b, m, D)
    alpha, beta = V0.new_zeros(b, m), V0.new_zeros(b, m)
    q = V0 / V0.norm(dim=0)
    for j in range(m):
        Q[:, j] = q.T
        w = op.matmat(q)
        alpha[:, j] = (q * w).sum(0)
        wnorm = w.norm(dim=0)
        w = w - alpha[:, j] * q  # the three-term recurrence, then the whole basis
        if j > 0:
            w = w - beta[:, j - 1] * Q[:, j - 1].T
        basis = Q[:, : j + 1]
        for _ in range(2):  # a second pass only where the first cancelled (DGKS test)
            before = w.norm(dim=0)
            w = w - _project(basis, w)
            if bool((w.norm(dim=0) >= _DGKS * before).all()):
                break
        bnorm = w.norm(dim=0)
        alive = bnorm > eps**0.5 * wnorm
        beta[:, j] = torch.where(alive, bnorm, torch.zeros_like(bnorm))
        q = _masked_div(w, bnorm, alive)
    return alpha, beta[:, : m - 1]


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """Batched symmetric tridiagonal matrices ``[b, m, m]`` from their diagonals."""
    return torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)


def order_by(theta: Tensor, which: str) -> Tensor:
    """Indices sorting ``theta`` by ``which``: descending, ascending, or by descending magnitude."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def krylov_schur(
    op: CurvatureOperator,
    k: int,
    which: str = "LA",
    ncv: int | None = None,
    tol: float | None = None,
    max_restarts: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    r"""Extreme eigenpairs of a symmetric operator by restarted Lanczos (Krylov-Schur).

    Builds an ``ncv``-dimensional Krylov basis :math:`V` with the relation
    :math:`A V = V T + \beta\, v_{+} e_m^\top`, computes Ritz pairs of
    :math:`T = V^\top A V`, and restarts from the ``p`` best Ritz vectors plus
    :math:`v_+` (:math:`T` becomes diagonal with one coupling row; Stewart
    2001). The residual of a Ritz pair :math:`(\theta_i, V s_i)` is
    :math:`|\beta\, e_m^\top s_i|`; a pair has converged when it is at most
    ``tol`` times the largest Ritz value in magnitude.

    Args:
        op: Symmetric operator ``A``.
        k: Number of eigenpairs (``k < ncv < D``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        ncv: Krylov basis size; default ``min(max(2k + 1, 20), D - 1)``.
        tol: Relative residual tolerance; default :math:`\sqrt{\epsilon}` of the dtype.
        max_restarts: Restarts before giving up (with a warning).
        generator: Random generator of the start vector (on the operator's device).

    Returns:
        ``(values [k], vectors [D, k], ritz_residuals [k], restarts, converged)``,
        ordered by ``which``.

    Raises:
        ConfigError: If ``which`` is unknown or ``k``/``ncv`` do not fit ``D``.
    """
    if which not in WHICH:
        raise ConfigError(f"krylov_schur: which={which!r} is not one of {WHICH}.")
    D = op.dim
    m = min(max(2 * k + 1, 20), D - 1) if ncv is None else int(ncv)
    if not 0 < k < m < D:
        raise ConfigError(f"krylov_schur: need 0 < k < ncv < D, got k={k}, ncv={m}, D={D}.")
    eps = torch.finfo(op.dtype).eps
    tol = eps**0.5 if tol is None else float(tol)
    dev, dt = op.device, op.dtype

    def random_vector(V_used: Tensor | None) -> Tensor:
        v = torch.randn(D, 1, generator=generator, dtype=dt, device=dev)
        if V_used is not None:
            v = _orthogonalise(v, V_used)[0]
        return v[:, 0] / v.norm()

    V = torch.zeros(D, m + 1, dtype=dt, device=dev)
    H = torch.zeros(m + 1, m, dtype=dt, device=dev)
    V[:, 0] = random_vector(None)
    p, restarts, converged = 0, 0, False
    while True:
        for j in range(p, m):
            w = op.matmat(V[:, j : j + 1])
            wnorm = w.norm()
            w, h = _orthogonalise(w, V[:, : j + 1])
            H[: j + 1, j] = h[:, 0]
            bnorm = w.norm()
            if bnorm > eps**0.5 * wnorm:
                H[j + 1, j] = bnorm
                V[:, j + 1] = w[:, 0] / bnorm
            else:  # invariant subspace found: continue with a fresh direction
                H[j + 1, j] = 0
                V[:, j + 1] = random_vector(V[:, : j + 1])
        T = H[:m, :m]
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        order = order_by(theta, which)
        theta, S = theta[order], S[:, order]
        residuals = (H[m, m - 1] * S[m - 1]).abs()
        scale = theta.abs().max().clamp_min(torch.finfo(dt).tiny)
        converged = bool((residuals[:k] <= tol * scale).all())
        if converged or restarts >= max_restarts:
            break
        restarts += 1
        p = min(k + (m - k) // 2, m - 1)
        V[:, :p] = V[:, :m] @ S[:, :p]
        V[:, p] = V[:, m]
        coupling = H[m, m - 1] * S[m - 1, :p]
        H.zero_()
        H[:p, :p] = torch.diag(theta[:p])
        H[p, :p] = coupling
        H[:p, p] = coupling
    if not converged:
        warnings.warn(
            f"krylov_schur: {k} Ritz pairs not converged to tol={tol:.1e} after {restarts} "
            "restarts; increase max_restarts or ncv.",
            stacklevel=2,
        )
    return theta[:k], V[:, :m] @ S[:, :k], residuals[:k], restarts, converged
