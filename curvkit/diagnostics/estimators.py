r"""Randomised trace and diagonal estimators with standard errors.

All estimators use Rademacher probes on the operator's device and report the
number of matrix-vector products they spent.

- Hutchinson (1990, *Commun. Stat. Simul. Comput.* 19(2)):
  :math:`\operatorname{tr}A \approx \frac1n\sum_i z_i^\top A z_i`.
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021, SOSA, Alg. 1): exact trace on a
  sketched range :math:`Q`, Hutchinson on the deflated rest.
- XTrace (Epperly, Tropp & Webber 2024, SIAM J. Matrix Anal. Appl. 45(1)):
  the exchangeable variant of Hutch++ using every probe for both roles, with
  its leave-one-out error estimate.
- Diagonal (Bekas, Kokiopoulou & Saad 2007, *Appl. Numer. Math.* 57(11)):
  :math:`\operatorname{diag}A \approx \frac1n\sum_i z_i\odot A z_i`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.diagnostics.krylov import make_generator, rademacher
from curvkit.errors import ConfigError
from curvkit.operators.base import CurvatureOperator

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "exact")
#: Smallest ``num_matvecs`` of each trace method.
TRACE_MIN_MATVECS = {"hutchinson": 2, "hutch++": 6, "xtrace": 4, "exact": 0}
DIAGONAL_METHODS = ("hutchinson", "exact")
#: Columns per product when probing (bounds memory to ``D x PROBE_CHUNK``).
PROBE_CHUNK = 32


@dataclass
class Estimate:
    """A (possibly stochastic) estimate.

    Attributes:
        value: The estimate (a float, or a tensor for diagonals).
        stderr: Its standard error (0 for exact computations; same type as ``value``).
        matvecs: Matrix-vector products spent.
        method: How it was computed.
    """

    value: float | Tensor
    stderr: float | Tensor
    matvecs: int
    method: str

    def __float__(self) -> float:
        return float(self.value)


def _check(op, where: str, method: str, methods: tuple[str, ...]) -> None:
    if not isinstance(op, CurvatureOperator):
        raise ConfigError(
            f"{where}: expected a curvkit CurvatureOperator, got {type(op).__name__}."
        )
    if method not in methods:
        raise ConfigError(f"{where}: method={method!r} is not one of {methods}.")


def probe_samples(op: CurvatureOperator, num: int, generator: torch.Generator, fn) -> Tensor:
    """Stack ``fn(Z, A Z)`` over ``num`` Rademacher probes, ``PROBE_CHUNK`` columns at a time.

    ``fn`` maps ``[D, c]`` probes and products to ``[c, ...]`` samples.
    """
    out = []
    for start in range(0, num, PROBE_CHUNK):
        Z = rademacher(op.dim, min(PROBE_CHUNK, num - start), generator, op.dtype, op.device)
        out.append(fn(Z, op.matmat(Z)))
    return torch.cat(out)


def exact_diagonal(op: CurvatureOperator, chunk_size: int = 512) -> Tensor:
    """The diagonal from ``D`` unit-vector products, ``chunk_size`` at a time (no ``D²`` memory)."""
    out = []
    for start in range(0, op.dim, chunk_size):
        stop = min(start + chunk_size, op.dim)
        idx = torch.arange(start, stop, device=op.device)
        E = torch.zeros(op.dim, stop - start, dtype=op.dtype, device=op.device)
        E[idx, idx - start] = 1
        out.append(op.matmat(E)[idx, idx - start])
    return torch.cat(out)


def _mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    n = samples.shape[0]
    return samples.mean(0), samples.std(0) / math.sqrt(n)


def trace(
    op: CurvatureOperator, method: str = "hutchinson", num_matvecs: int = 100, seed: int = 0
) -> Estimate:
    r"""Estimate :math:`\operatorname{tr}A` with a standard error.

    - ``"hutchinson"``: ``n = num_matvecs`` probes; standard error
      :math:`s/\sqrt n` with :math:`s` the sample std of :math:`z_i^\top A z_i`.
    - ``"hutch++"``: ``s = n//3`` sketch probes give :math:`Q = \operatorname{orth}(AS)`,
      the estimate is :math:`\operatorname{tr}(Q^\top A Q) + \frac1g\sum_i
      g_i^\top (I-QQ^\top)A(I-QQ^\top) g_i` with ``g = n - 2s`` probes; the
      standard error is that of the second (Hutchinson) term given ``Q``.
    - ``"xtrace"``: ``n//2`` probes; the estimate is the mean of the ``n/2``
      exchangeable leave-one-out estimates :math:`t_i`, the error estimate
      :math:`\operatorname{std}(t_i)/\sqrt{n/2}` (Epperly et al. 2024).
    - ``"exact"``: ``op.trace()`` where the operator has one, else the sum of
      the exact diagonal (``D`` products).

    Hutch++ and XTrace are exact when ``rank(A)`` is below the sketch size and
    have far lower variance than Hutchinson on the decaying spectra of
    curvature matrices.

    Args:
        op: Square operator.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"exact"``.
        num_matvecs: Budget of products (ignored by ``"exact"``).
        seed: Seed of the probes.

    Returns:
        An :class:`Estimate` with float ``value`` and ``stderr``.

    Raises:
        ConfigError: If ``method`` is unknown or ``num_matvecs`` too small
            (hutchinson: 2, hutch++: 6, xtrace: 4 and ``num_matvecs/2 < D``).

    Example:
        >>> import torch, curvkit as ck
        >>> op = ck.DenseOperator(torch.eye(50, dtype=torch.float64))
        >>> est = ck.trace(op, method="hutchinson", num_matvecs=10)
        >>> est.value, est.stderr, est.matvecs
        (50.0, 0.0, 10)
    """
    _check(op, "trace", method, TRACE_METHODS)
    start = op.matvecs
    n = int(num_matvecs)
    gen = make_generator(seed, op.device)
    minimum = TRACE_MIN_MATVECS[method]
    if n < minimum:
        raise ConfigError(f"trace: method={method!r} needs num_matvecs >= {minimum}, got {n}.")
    if method == "exact":
        own = getattr(op, "trace", None)
        value = float(own()) if callable(own) else float(exact_diagonal(op).sum())
        return Estimate(value, 0.0, op.matvecs - start, method)
    if method == "hutchinson":
        samples = probe_samples(op, n, gen, lambda Z, AZ: (Z * AZ).sum(0))
        mean, se = _mean_stderr(samples)
        return Estimate(float(mean), float(se), op.matvecs - start, method)
    if method == "hutch++":
        value, se = _hutchpp(op, n, gen)
    else:
        value, se = _xtrace(op, n, gen)
    return Estimate(value, se, op.matvecs - start, method)


def _hutchpp(op: CurvatureOperator, n: int, gen: torch.Generator) -> tuple[float, float]:
    s = n // 3
    S = rademacher(op.dim, s, gen, op.dtype, op.device)
    Q = torch.linalg.qr(op.matmat(S)).Q
    exact_part = (Q * op.matmat(Q)).sum()
    # Hutchinson on the deflated matrix: g^T (I - QQ^T) A (I - QQ^T) g
    G = rademacher(op.dim, n - 2 * s, gen, op.dtype, op.device)
    P = G - Q @ (Q.T @ G)
    AP = op.matmat(P)
    samples = (P * (AP - Q @ (Q.T @ AP))).sum(0)
    mean, se = _mean_stderr(samples)
    return float(exact_part + mean), float(se)


def _xtrace(op: CurvatureOperator, n: int, gen: torch.Generator) -> tuple[float, float]:
    m = n // 2
    if m >= op.dim:
        raise ConfigError(f"trace: xtrace needs num_matvecs/2 < D={op.dim}; use method='exact'.")
    W = rademacher(op.dim, m, gen, op.dtype, op.device)
    AW = op.matmat(W)
    Q, R = torch.linalg.qr(AW)
    AQ = op.matmat(Q)
    # S_i: normalised columns of R^{-T}; Q_i Q_i^T = Q (I - s_i s_i^T) Q^T spans AW without column i
    S = torch.linalg.inv(R.T)
    S = S / S.norm(dim=0)
    QtAQ = Q.T @ AQ
    traces = QtAQ.trace() - (S * (QtAQ @ S)).sum(0)

    def deflate(X: Tensor) -> Tensor:  # column i: (I - s_i s_i^T) x_i
        return X - S * (S * X).sum(0)

    AP_W = AW - AQ @ deflate(Q.T @ W)
    PtAPW = AP_W - Q @ deflate(Q.T @ AP_W)
    traces = traces + (W * PtAPW).sum(0)
    mean, se = _mean_stderr(traces)
    return float(mean), float(se)


def diagonal(
    op: CurvatureOperator, method: str = "hutchinson", num_matvecs: int = 100, seed: int = 0
) -> Estimate:
    r"""Estimate :math:`\operatorname{diag}A` with elementwise standard errors.

    ``"hutchinson"``: :math:`\frac1n\sum_i z_i\odot Az_i` (Bekas et al. 2007;
    Rademacher probes make their denominator :math:`\sum_i z_i\odot z_i` equal
    ``n``), with elementwise standard error :math:`s/\sqrt n`. ``"exact"``:
    ``op.diagonal()`` where the operator has one, else ``D`` unit-vector products.

    Args:
        op: Square operator.
        method: ``"hutchinson"`` or ``"exact"``.
        num_matvecs: Probes (``>= 2``) for ``"hutchinson"``.
        seed: Seed of the probes.

    Returns:
        An :class:`Estimate` with ``[D]`` tensors as ``value`` and ``stderr``.

    Raises:
        ConfigError: If ``method`` is unknown or ``num_matvecs < 2``.
    """
    _check(op, "diagonal", method, DIAGONAL_METHODS)
    start = op.matvecs
    if method == "exact":
        own = getattr(op, "diagonal", None)
        value = own() if callable(own) else exact_diagonal(op)
        value = value.to(device=op.device, dtype=op.dtype).reshape(-1)
        return Estimate(value, torch.zeros_like(value), op.matvecs - start, method)
    if num_matvecs < 2:
        raise ConfigError(f"diagonal: num_matvecs must be >= 2, got {num_matvecs}.")
    samples = probe_samples(
        op, int(num_matvecs), make_generator(seed, op.device), lambda Z, AZ: (Z * AZ).T
    )
    mean, se = _mean_stderr(samples)
    return Estimate(mean, se, op.matvecs - start, method)
