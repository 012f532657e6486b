r"""Spectra of curvature operators: eigenpairs, spectral densities and scalars.

Everything works on any :class:`~curvkit.operators.base.CurvatureOperator`
through matrix-vector products on the operator's device; small operators
(``D <= DENSE_MAX_DIM``) are densified and solved exactly by default.

- :func:`eigenvalues` / :func:`eigenvectors`: extreme eigenpairs by restarted
  Lanczos (:func:`curvkit.diagnostics.krylov.krylov_schur`), dense ``eigh``, or SciPy's
  ``eigsh``, with residual norms :math:`\|Av - \lambda v\|` and product counts.
- :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan &
  Xiao 2019, arXiv:1901.10159; log-scale variant of Papyan 2020, arXiv:2008.11865).
- Scalars: :func:`lambda_max`, :func:`lambda_min`, :func:`condition_number`,
  :func:`effective_rank`, :func:`logdet`.

Trace and diagonal estimators live in :mod:`curvkit.diagnostics.estimators` and are
re-exported here (:func:`trace`, :func:`diagonal`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.diagnostics.estimators import Estimate, diagonal, trace
from curvkit.diagnostics.krylov import (
    WHICH,
    krylov_schur,
    lanczos,
    make_generator,
    order_by,
    rademacher,
    tridiagonal,
)
from curvkit.errors import ConfigError, CurvkitError, NonFiniteError, ShapeError
from curvkit.operators.base import CurvatureOperator

__all__ = [
    "DENSE_MAX_DIM",
    "EigenInfo",
    "Estimate",
    "SpectralDensity",
    "condition_number",
    "diagonal",
    "effective_rank",
    "eigenvalues",
    "eigenvectors",
    "lambda_max",
    "lambda_min",
    "logdet",
    "spectral_density",
    "trace",
]

#: Largest ``D`` that ``method="auto"`` densifies (``D`` products and an ``eigh``).
DENSE_MAX_DIM = 2000
_METHODS = ("auto", "lanczos", "dense", "scipy")


@dataclass
class EigenInfo:
    r"""How eigenpairs were computed.

    Attributes:
        residuals: :math:`\|A v_i - \lambda_i v_i\|` of each returned pair (unit ``v_i``).
        matvecs: Matrix-vector products spent (residual check included).
        method: ``"dense"``, ``"lanczos"`` or ``"scipy"``.
        which: Ordering of the returned values (``"LA"``, ``"SA"``, ``"LM"``).
        converged: Whether the iterative method met its tolerance (``True`` for dense).
        restarts: Lanczos restarts (0 for the other methods).
        tol: Relative residual tolerance of the iterative method.
    """

    residuals: Tensor
    matvecs: int
    method: str
    which: str
    converged: bool = True
    restarts: int = 0
    tol: float = 0.0


def _check_operator(op, where: str) -> None:
    if not isinstance(op, CurvatureOperator):
        raise ConfigError(
            f"{where}: expected a curvkit CurvatureOperator, got {type(op).__name__}."
        )


def _dense_symmetric(op: CurvatureOperator) -> Tensor:
    M = op.to_dense()
    return (M + M.T) / 2


def eigenvectors(
    op: CurvatureOperator,
    k: int = 20,
    which: str = "LA",
    method: str = "auto",
    tol: float | None = None,
    ncv: int | None = None,
    max_restarts: int = 100,
    seed: int = 0,
) -> tuple[Tensor, Tensor, EigenInfo]:
    r"""``k`` extreme eigenpairs of a symmetric operator.

    ``method="lanczos"`` runs Krylov-Schur restarted Lanczos with full
    re-orthogonalisation on the operator's device. Its default Krylov size
    ``ncv = max(2k + 1, 20)`` is larger than ARPACK-style wrappers such as
    hessian-eigenthings use, because the top eigenvalues of curvature
    matrices are clustered; restarts continue until every requested Ritz pair
    has residual :math:`\le \text{tol}\cdot\max_i|\theta_i|`.

    Args:
        op: Symmetric operator.
        k: Number of eigenpairs (``1 <= k <= D``).
        which: ``"LA"`` largest algebraic (returned descending), ``"SA"``
            smallest algebraic (ascending), ``"LM"`` largest magnitude
            (descending magnitude).
        method: ``"auto"`` (dense when ``D <= DENSE_MAX_DIM`` or when the
            Krylov basis would reach ``D``, else Lanczos),
            ``"lanczos"``, ``"dense"`` (``D`` products and ``torch.linalg.eigh``),
            or ``"scipy"`` (``scipy.sparse.linalg.eigsh`` through ``op.to_scipy()``,
            a host round trip per product).
        tol: Relative residual tolerance (iterative methods); default
            :math:`\sqrt{\epsilon}` of the operator's dtype.
        ncv: Krylov basis size; default ``max(2k + 1, 20)`` (capped at ``D - 1``).
        max_restarts: Restart cap of the Lanczos method.
        seed: Seed of the random start vector.

    Returns:
        ``(values [k], vectors [D, k], info)`` with unit-norm eigenvectors as
        columns and an :class:`EigenInfo`.

    Raises:
        ConfigError: If ``op`` is not an operator, or ``k``, ``which`` or
            ``method`` is not supported.
        NonFiniteError: If Lanczos fails on an operator whose products hold NaN or
            Inf (the dense method returns NaN eigenvalues instead).

    Example:
        >>> import torch, curvkit as ck
        >>> op = ck.DenseOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
        >>> vals, vecs, info = ck.eigenvectors(op, k=3, method="lanczos")
        >>> vals.round(decimals=6).tolist(), info.method, bool(info.residuals.max() < 1e-6)
        ([100.0, 99.0, 98.0], 'lanczos', True)
    """
    _check_operator(op, "eigenvectors")
    if which not in WHICH:
        raise ConfigError(f"eigenvectors: which={which!r} is not one of {WHICH}.")
    if method not in _METHODS:
        raise ConfigError(f"eigenvectors: method={method!r} is not one of {_METHODS}.")
    D = op.dim
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= D:
        raise ConfigError(f"eigenvectors: k={k!r} must be an integer in [1, D={D}].")
    k = int(k)
    wanted = max(2 * k + 1, 20) if ncv is None else int(ncv)
    m = min(wanted, D - 1)
    if method == "auto":
        method = "dense" if D <= DENSE_MAX_DIM or wanted >= D else "lanczos"
    start = op.matvecs
    restarts, converged, tol_used = 0, True, 0.0
    if method == "dense":
        M = _dense_symmetric(op)
        evals, evecs = torch.linalg.eigh(M)
        order = order_by(evals, which)[:k]
        values, vectors = evals[order], evecs[:, order]
        residuals = (M @ vectors - vectors * values).norm(dim=0)
    else:
        if method == "lanczos":
            try:
                values, vectors, _, restarts, converged = krylov_schur(
                    op,
                    k,
                    which,
                    ncv=m,
                    tol=tol,
                    max_restarts=max_restarts,
                    generator=make_generator(seed, op.device),
                )
            except torch.linalg.LinAlgError as err:
                probe = torch.ones(D, dtype=op.dtype, device=op.device)
                if not bool(torch.isfinite(op.matmat(probe[:, None])).all()):
                    raise NonFiniteError(
                        "eigenvectors: the operator's products are not finite (NaN or Inf, "
                        "e.g. from NaN/Inf in the data or the parameters); Lanczos cannot run."
                    ) from err
                raise
            tol_used = torch.finfo(op.dtype).eps ** 0.5 if tol is None else float(tol)
        else:
            values, vectors, tol_used = _eigsh(op, k, which, tol, m, seed)
        order = order_by(values, which)
        values, vectors = values[order], vectors[:, order]
        residuals = (op.matmat(vectors) - vectors * values).norm(dim=0)
    info = EigenInfo(residuals, op.matvecs - start, method, which, converged, restarts, tol_used)
    return values, vectors, info


def _eigsh(op: CurvatureOperator, k: int, which: str, tol: float | None, ncv: int, seed: int):
    import numpy as np
    from scipy.sparse.linalg import eigsh

    v0 = np.random.default_rng(seed).standard_normal(op.dim)
    tol = 0.0 if tol is None else float(tol)
    vals, vecs = eigsh(op.to_scipy(), k=k, which=which, tol=tol, ncv=ncv, v0=v0)
    as_torch = lambda a: torch.as_tensor(a, dtype=op.dtype, device=op.device)  # noqa: E731
    return as_torch(vals), as_torch(vecs), tol


def eigenvalues(
    op: CurvatureOperator, k: int = 20, which: str = "LA", **kwargs
) -> tuple[Tensor, EigenInfo]:
    """``k`` extreme eigenvalues of a symmetric operator.

    Args:
        op: Symmetric operator.
        k: Number of eigenvalues.
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (see :func:`eigenvectors`).
        **kwargs: ``method``, ``tol``, ``ncv``, ``max_restarts``, ``seed`` of
            :func:`eigenvectors`.

    Returns:
        ``(values [k], info)``, ordered as in :func:`eigenvectors`.

    Example:
        >>> import torch, curvkit as ck
        >>> op = ck.DenseOperator(torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64)))
        >>> ck.eigenvalues(op, k=2, which="LM")[0].tolist()
        [-5.0, 3.0]
    """
    values, _, info = eigenvectors(op, k, which, **kwargs)
    return values, info


def lambda_max(op: CurvatureOperator, **kwargs) -> float:
    """Largest eigenvalue (``which="LA"``); ``kwargs`` go to :func:`eigenvectors`."""
    return float(eigenvalues(op, k=1, which="LA", **kwargs)[0][0])


def lambda_min(op: CurvatureOperator, **kwargs) -> float:
    """Smallest eigenvalue (``which="SA"``); ``kwargs`` go to :func:`eigenvectors`."""
    return float(eigenvalues(op, k=1, which="SA", **kwargs)[0][0])


def condition_number(op: CurvatureOperator, damping: float = 0.0, **kwargs) -> float:
    r"""Condition number :math:`(\lambda_{\max} + \delta) / (\lambda_{\min} + \delta)`.

    Meant for positive semi-definite curvature (GGN, Fisher, K-FAC) with
    damping :math:`\delta`. The operator counts as singular, and ``inf`` is
    returned, when

    .. math::
        \lambda_{\min} + \delta \le D\,\epsilon\,|\lambda_{\max} + \delta|,

    with :math:`\epsilon` the machine epsilon of the operator's dtype and
    :math:`D` its dimension: an eigenvalue below that level is indistinguishable
    from round-off of the eigen-solver (the rank threshold of NumPy's
    ``matrix_rank``; Golub & Van Loan 2013, §5.4.1), so a computed ratio above
    :math:`1/(D\epsilon)` would only report round-off. Negative
    :math:`\lambda_{\min} + \delta` (an indefinite operator) also gives ``inf``.
    Lanczos converges slowly to a :math:`\lambda_{\min}` inside a cluster near
    zero; for large operators consider ``max_restarts`` and ``ncv``.

    Args:
        op: Symmetric operator.
        damping: :math:`\delta \ge 0` added to every eigenvalue.
        **kwargs: Passed to :func:`eigenvectors`.

    Returns:
        The condition number, ``inf`` for a singular (by the rule above) or
        indefinite operator, ``nan`` when an extreme eigenvalue is ``nan`` (an
        operator with NaN products).

    Raises:
        ConfigError: If ``op`` is not an operator or ``damping`` is negative or
            not finite.
    """
    _check_operator(op, "condition_number")
    if not (math.isfinite(float(damping)) and float(damping) >= 0):
        raise ConfigError(f"condition_number: damping={damping} must be a finite number >= 0.")
    lo = lambda_min(op, **kwargs) + damping
    hi = lambda_max(op, **kwargs) + damping
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    threshold = op.dim * torch.finfo(op.dtype).eps * abs(hi)
    return hi / lo if lo > threshold else math.inf


def effective_rank(op: CurvatureOperator, method: str = "entropy", **kwargs) -> float:
    r"""Effective rank of a positive semi-definite operator.

    - ``"entropy"`` (Roy & Vetterli 2007, EUSIPCO): :math:`\exp(-\sum_i p_i \log p_i)`
      with :math:`p_i = \lambda_i^+ / \sum_j \lambda_j^+` (negative eigenvalues,
      round-off or indefiniteness, are clipped to zero). Needs every
      eigenvalue: dense (``D`` products and an ``eigh``).
    - ``"intrinsic"`` (intrinsic dimension, Tropp 2015, *An Introduction to
      Matrix Concentration Inequalities*, §7.1): :math:`\operatorname{tr}(A)/\lambda_{\max}`,
      with the exact trace (``op.trace()`` where the operator has one, else
      ``D`` products of the diagonal) and :math:`\lambda_{\max}` from
      :func:`lambda_max`; suits large structured operators.

    Both equal ``r`` for an orthogonal projector of rank ``r``.

    Args:
        op: Symmetric positive semi-definite operator.
        method: ``"entropy"`` or ``"intrinsic"``.
        **kwargs: Passed to :func:`eigenvectors` for ``"intrinsic"``.

    Returns:
        The effective rank (between 1 and ``D`` for a non-zero operator).

    Raises:
        ConfigError: If ``method`` is unknown.
    """
    _check_operator(op, "effective_rank")
    if method == "entropy":
        lam = torch.linalg.eigvalsh(_dense_symmetric(op)).clamp_min(0)
        p = lam / lam.sum()
        return float(torch.exp(-torch.special.xlogy(p, p).sum()))
    if method == "intrinsic":
        return float(trace(op, method="exact").value) / lambda_max(op, **kwargs)
    raise ConfigError(f"effective_rank: method={method!r} is not one of ('entropy', 'intrinsic').")


@dataclass
class SpectralDensity:
    r"""A smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: Points where the density is evaluated (eigenvalue units; positive
            when ``log``).
        density: The density at ``grid``: per unit eigenvalue, or per unit of
            :math:`\log_{10}` eigenvalue when ``log`` (then it integrates to one
            over ``log10(grid)``).
        nodes: Gauss quadrature nodes (Ritz values), ``[num_probes, m]``.
        weights: Quadrature weights, ``[num_probes, m]``; each row sums to one.
        matvecs: Matrix-vector products spent.
        kernel_width: Standard deviation of the Gaussian kernel (in the units
            of the density's variable).
        log: Whether the density is over :math:`\log_{10}\lambda`.
        cutoff: Lower cutoff of the log scale (``None`` for a linear density).
        mass_below_cutoff: Quadrature mass at or below ``cutoff`` (placed at it).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    matvecs: int
    kernel_width: float
    log: bool = False
    cutoff: float | None = None
    mass_below_cutoff: float = 0.0

    def moment(self, power: int = 1) -> Estimate:
        r"""Estimate of the spectral moment :math:`\frac1D\operatorname{tr}(A^p)`.

        Per probe :math:`\sum_j \tau_j \theta_j^p = v^\top A^p v` exactly for
        :math:`p \le 2m - 1` (Gauss quadrature), an unbiased Hutchinson sample;
        the standard error is the probes' sample std over :math:`\sqrt{n}`.
        """
        samples = (self.weights * self.nodes**power).sum(1)
        n = samples.numel()
        stderr = float(samples.std() / math.sqrt(n)) if n > 1 else math.nan
        return Estimate(float(samples.mean()), stderr, self.matvecs, "slq")


def _probe_quadrature(op, num_probes, lanczos_steps, seed, rotate=None) -> tuple[Tensor, Tensor]:
    r"""Nodes and weights ``[num_probes, m]`` of one Lanczos run per Rademacher probe.

    ``rotate``: an orthogonal map applied to the probes first, for ``op`` given in
    another orthonormal basis (:math:`Q^\top A Q` with ``rotate`` :math:`= Q^\top`).
    """
    D = op.dim
    m = min(int(lanczos_steps), D)
    gen = make_generator(seed, op.device)
    chunk = max(1, min(num_probes, 2**27 // (D * (m + 1))))  # bounds the stored bases
    nodes, weights = [], []
    for start in range(0, num_probes, chunk):
        V0 = rademacher(D, min(chunk, num_probes - start), gen, op.dtype, op.device)
        V0 = V0 if rotate is None else rotate(V0)
        theta, S = torch.linalg.eigh(tridiagonal(*lanczos(op, V0, m)))
        nodes.append(theta)
        weights.append(S[:, 0, :] ** 2)
    return torch.cat(nodes), torch.cat(weights)


def spectral_density(
    op: CurvatureOperator,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: int | Tensor = 1024,
    kernel_width: float | None = None,
    log: bool = False,
    cutoff: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    r"""Spectral density by stochastic Lanczos quadrature (SLQ).

    For each Rademacher probe :math:`v = z/\sqrt D`, ``m`` Lanczos steps give
    :math:`T = S\,\mathrm{diag}(\theta)\,S^\top`; nodes :math:`\theta_j` and
    weights :math:`\tau_j = S_{1j}^2` form a Gauss quadrature of the spectral
    measure seen by :math:`v`, so that
    :math:`\phi(t) = \frac1{n}\sum_{i,j}\tau^{(i)}_j\,g_\sigma(t - \theta^{(i)}_j)`
    estimates the Gaussian-smoothed density of eigenvalues (Ghorbani et al.
    2019; Lin, Saad & Yang 2016, SIAM Review 58(1)).

    ``log=True`` smooths over :math:`u = \log_{10}\max(\theta, c)` instead
    (Papyan 2020, for positive spectra spanning many decades): nodes at
    or below the cutoff :math:`c` are placed at it and their mass is reported.

    Args:
        op: Symmetric operator.
        num_probes: Number of probe vectors ``n``.
        lanczos_steps: Lanczos steps ``m`` per probe (at most ``D``).
        grid: Number of evaluation points (spanning the nodes plus five kernel
            widths on each side), or a 1-D tensor of points (positive when ``log``).
        kernel_width: :math:`\sigma`; default 1/200 of the node span (in
            :math:`\log_{10}` units when ``log``).
        log: Density over :math:`\log_{10}\lambda`.
        cutoff: Lower cutoff :math:`c > 0` of the log scale; default
            :math:`10^{-6}\max_j|\theta_j|`.
        seed: Seed of the probes.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ShapeError: If ``op`` is not an operator or an argument is out of range
            (``num_probes`` or ``lanczos_steps`` below 1, ``kernel_width <= 0``,
            a grid of fewer than two points, a non-positive ``cutoff`` or grid
            point with ``log=True``); checked before any product.

    Example:
        >>> import torch, curvkit as ck
        >>> op = ck.DenseOperator(torch.diag(torch.linspace(0, 1, 50, dtype=torch.float64)))
        >>> sd = ck.spectral_density(op, num_probes=4, lanczos_steps=20)
        >>> round(float(torch.trapezoid(sd.density, sd.grid)), 3)
        1.0
    """
    _check_operator(op, "spectral_density")
    if num_probes < 1 or lanczos_steps < 1:
        raise ConfigError(
            f"spectral_density: num_probes={num_probes} and lanczos_steps={lanczos_steps} "
            "must be positive."
        )
    if kernel_width is not None and not (
        math.isfinite(float(kernel_width)) and float(kernel_width) > 0
    ):
        raise ConfigError(
            f"spectral_density: kernel_width={kernel_width} must be a finite number > 0 "
            "(or None for 1/200 of the node span)."
        )
    if isinstance(grid, Tensor):
        if grid.ndim != 1 or grid.numel() < 1:
            raise ShapeError(
                "spectral_density: a grid tensor must be 1-D and non-empty, "
                f"got shape {tuple(grid.shape)}."
            )
        if log and bool((grid <= 0).any()):
            raise ConfigError("spectral_density: grid points must be positive for log=True.")
    elif isinstance(grid, bool) or int(grid) < 2:
        raise ShapeError(f"spectral_density: grid={grid!r} must be at least 2 points.")
    if log and cutoff is not None and not float(cutoff) > 0:
        raise ConfigError(f"spectral_density: cutoff must be positive for log=True, got {cutoff}.")
    start = op.matvecs
    nodes, weights = _probe_quadrature(op, num_probes, lanczos_steps, seed)
    return _smoothed(
        nodes, weights, num_probes, op.matvecs - start, grid, kernel_width, log, cutoff
    )


def _smoothed(nodes, weights, num_probes, matvecs, grid, kernel_width, log, cutoff):
    """The :class:`SpectralDensity` of SLQ nodes and weights (see :func:`spectral_density`)."""
    u, mass_below = nodes, 0.0
    if log:
        cut = 1e-6 * float(nodes.abs().max()) if cutoff is None else float(cutoff)
        if not cut > 0:
            raise ConfigError(f"spectral_density: cutoff must be positive for log=True, got {cut}.")
        below = nodes <= cut
        mass_below = float((weights * below).sum() / num_probes)
        u = torch.log10(nodes.clamp_min(cut))
        cutoff = cut
    else:
        cutoff = None
    span = float(u.max() - u.min()) or max(float(u.abs().max()), 1.0)
    sigma = span / 200 if kernel_width is None else float(kernel_width)
    if isinstance(grid, Tensor):
        points = grid.to(device=nodes.device, dtype=nodes.dtype)
        x = torch.log10(points) if log else points
    else:
        x = torch.linspace(
            float(u.min()) - 5 * sigma,
            float(u.max()) + 5 * sigma,
            int(grid),
            dtype=nodes.dtype,
            device=nodes.device,
        )
        points = 10**x if log else x
    z = (x[:, None] - u.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights.reshape(-1) / num_probes
    return SpectralDensity(points, density, nodes, weights, matvecs, sigma, log, cutoff, mass_below)


def logdet(
    op: CurvatureOperator,
    damping: float = 0.0,
    method: str = "auto",
    num_probes: int = 10,
    lanczos_steps: int = 80,
    seed: int = 0,
) -> Estimate:
    r"""Log-determinant :math:`\log\det(A + \delta I) = \sum_i \log(\lambda_i + \delta)`.

    - ``"structured"``: the operator's own ``logdet(damping)``, in its damping
      convention: exact :math:`\log\det(G\otimes A + \delta I)` from factor
      eigenvalues for block-diagonal K-FAC (also EKFAC, diagonals); M&G's
      factored damping for tri-diagonal K-FAC, exact there only at ``damping=0``.
    - ``"exact"``: dense eigenvalues (``D`` products).
    - ``"slq"``: :math:`D\cdot\frac1n\sum_i\sum_j\tau^{(i)}_j\log(\theta^{(i)}_j+\delta)`
      by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017, SIAM J. Matrix
      Anal. Appl. 38(4)), with the probes' standard error.
    - ``"auto"``: structured if available, else exact when ``D <= DENSE_MAX_DIM``,
      else SLQ.

    Args:
        op: Symmetric operator with :math:`A + \delta I` positive definite.
        damping: :math:`\delta`.
        method: ``"auto"``, ``"structured"``, ``"exact"`` or ``"slq"``.
        num_probes: SLQ probes.
        lanczos_steps: SLQ Lanczos steps per probe.
        seed: SLQ seed.

    Returns:
        An :class:`~curvkit.diagnostics.estimators.Estimate` (standard error 0 unless SLQ).

    Raises:
        ConfigError: If ``method`` is unknown or unavailable for ``op``.
        CurvkitError: If :math:`A + \delta I` is not positive definite.
    """
    _check_operator(op, "logdet")
    methods = ("auto", "structured", "exact", "slq")
    if method not in methods:
        raise ConfigError(f"logdet: method={method!r} is not one of {methods}.")
    has_own = callable(getattr(op, "logdet", None))
    if method == "auto":
        method = "structured" if has_own else "exact" if op.dim <= DENSE_MAX_DIM else "slq"
    start = op.matvecs
    if method == "structured":
        if not has_own:
            raise ConfigError(
                f"logdet: {type(op).__name__} has no structured logdet; use 'exact' or 'slq'."
            )
        return Estimate(float(op.logdet(damping)), 0.0, op.matvecs - start, "structured")
    if method == "exact":
        lam = torch.linalg.eigvalsh(_dense_symmetric(op)) + damping
        if float(lam.min()) <= 0:
            raise CurvkitError(
                f"logdet: A + {damping}·I is not positive definite "
                f"(min eigenvalue {float(lam.min()):.3e})."
            )
        return Estimate(float(torch.log(lam).sum()), 0.0, op.matvecs - start, "exact")
    nodes, weights = _probe_quadrature(op, num_probes, lanczos_steps, seed)
    shifted = nodes + damping
    if bool(((shifted <= 0) & (weights > 1e-10)).any()):
        raise CurvkitError(
            f"logdet: A + {damping}·I has Ritz values <= 0; it is not positive definite."
        )
    samples = op.dim * (weights * torch.log(shifted.clamp_min(torch.finfo(op.dtype).tiny))).sum(1)
    stderr = float(samples.std() / math.sqrt(num_probes)) if num_probes > 1 else math.nan
    return Estimate(float(samples.mean()), stderr, op.matvecs - start, "slq")
