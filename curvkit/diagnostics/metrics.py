r"""Comparison of a curvature approximation ``A`` with a reference ``B``.

:func:`compare` returns a tidy :class:`pandas.DataFrame`, one row per metric,
block and (where it applies) direction, damping or ``k``. Small problems
(``D <= exact_threshold``) are densified and compared exactly; larger ones are
compared through matrix-vector products (Hutchinson-type estimates with
standard errors, Lanczos, conjugate gradients).

Metrics (``B`` is the reference, ``g`` a gradient, :math:`\lambda` a damping):

- ``frobenius``: :math:`\|A - B\|_F / \|B\|_F`.
- ``cosine``: :math:`\operatorname{tr}(AB) / (\|A\|_F \|B\|_F)`, the cosine of
  the two matrices as vectors.
- ``spectral``: :math:`\|A - B\|_2 / \|B\|_2`.
- ``overlap``: :math:`\|V_A^\top V_B\|_F^2 / k` of the top-``k`` eigenvectors
  (Gur-Ari, Roberts & Dyer 2018, arXiv:1812.04754): 1 when the top
  eigenspaces coincide, about ``k/D`` for random ones.
- ``directional``: :math:`v^\top A v / v^\top B v` along each of the
  reference's top-``k`` eigenvectors ``eigvec_i`` and along ``g`` (``gradient``).
- ``preconditioning`` (needs ``g``), for each :math:`\lambda`: with
  :math:`d_A = (A + \lambda I)^{-1} g` and :math:`d_B = (B + \lambda I)^{-1} g`,

  - ``precond_cosine``: :math:`\cos(d_A, d_B)`;
  - ``precond_reduction``: :math:`q(-d_A) / q(-d_B)` for the damped quadratic
    model :math:`q(\delta) = g^\top\delta + \tfrac12\delta^\top(B + \lambda I)\delta`
    (M&G 2015, §6), whose minimum is :math:`q(-d_B) = -\tfrac12 g^\top d_B`:
    the fraction of the optimal model reduction that the approximation's step
    achieves (1 is optimal, negative means the step increases the model).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from curvkit.diagnostics.estimators import probe_samples
from curvkit.diagnostics.krylov import make_generator
from curvkit.diagnostics.spectral import eigenvalues, eigenvectors
from curvkit.errors import ConfigError, ShapeError
from curvkit.operators.base import CurvatureOperator
from curvkit.operators.cg import CGInverse

METRICS = ("frobenius", "cosine", "spectral", "overlap", "directional", "preconditioning")
COLUMNS = [
    "approx", "reference", "block", "metric", "value", "stderr",
    "method", "k", "damping", "direction",
]  # fmt: skip


class BlockView(CurvatureOperator):
    """The diagonal block ``op[s, s]`` of an operator (each product costs one of ``op``)."""

    def __init__(self, op: CurvatureOperator, block: slice, name: str = "block"):
        size = block.stop - block.start
        super().__init__([torch.Size([size])], op.dtype, op.device, [size], [name])
        self.op, self.block = op, block

    def _matmat(self, X: Tensor) -> Tensor:
        full = X.new_zeros(self.op.dim, X.shape[1])
        full[self.block] = X
        return self.op.matmat(full)[self.block]


def _delta_method(samples: Tensor, f) -> tuple[float, float]:
    r"""``f`` of the sample means and its delta-method standard error.

    :math:`\operatorname{se} \approx \sqrt{\nabla f^\top \hat\Sigma \nabla f / n}` with
    :math:`\hat\Sigma` the sample covariance of the ``[n, p]`` samples.
    """
    n = samples.shape[0]
    mean = samples.mean(0)
    cov = torch.atleast_2d(torch.cov(samples.T)) / n
    grad = torch.autograd.functional.jacobian(f, mean)
    return float(f(mean)), float((grad @ cov @ grad).clamp_min(0).sqrt())


class _DensePair:
    """Exact metrics of two dense symmetric matrices."""

    method = solve_method = "dense"

    def __init__(self, A: Tensor, B: Tensor, reference_eig: dict | None = None):
        self.A, self.B = (A + A.T) / 2, (B + B.T) / 2
        self._eig = {}
        # the reference's eigendecomposition, shared by the pairs of all approximations
        self._reference_eig = {} if reference_eig is None else reference_eig

    def eigh(self, which: str):
        cache, key = (self._eig, "A") if which == "A" else (self._reference_eig, "B")
        if key not in cache:
            cache[key] = torch.linalg.eigh(self.A if which == "A" else self.B)
        return cache[key]

    def frobenius_cosine(self) -> dict:
        A, B = self.A, self.B
        nB = torch.linalg.matrix_norm(B)
        frob = torch.linalg.matrix_norm(A - B) / nB
        cos = (A * B).sum() / (torch.linalg.matrix_norm(A) * nB)
        return {"frobenius": (float(frob), 0.0), "cosine": (float(cos), 0.0)}

    def spectral(self) -> float:
        diff = torch.linalg.eigvalsh(self.A - self.B).abs().max()
        return float(diff / self.eigh("B")[0].abs().max())

    def top(self, which: str, k: int) -> Tensor:
        vals, vecs = self.eigh(which)
        return vecs[:, torch.argsort(vals, descending=True)[:k]]

    def apply(self, which: str, X: Tensor) -> Tensor:
        return (self.A if which == "A" else self.B) @ X

    def solve(self, which: str, g: Tensor, lambdas: Tensor) -> Tensor:
        vals, vecs = self.eigh(which)
        return vecs @ ((vecs.T @ g)[:, None] / (vals[:, None] + lambdas[None, :]))


class _OperatorPair:
    """Metrics of two operators through products (estimates where needed)."""

    method = "lanczos"

    solve_method = "cg"

    def __init__(self, A, B, num_probes: int, seed: int):
        self.A, self.B = A, B
        self.num_probes, self.seed = num_probes, seed

    def frobenius_cosine(self) -> dict:
        def per_probe(Z, AZ):  # [c, 4]: |(A-B)z|^2, |Az|^2, |Bz|^2, (Az).(Bz)
            BZ = self.B.matmat(Z)
            cols = ((AZ - BZ) ** 2, AZ**2, BZ**2, AZ * BZ)
            return torch.stack([c.sum(0) for c in cols], dim=1)

        S = probe_samples(
            self.A, self.num_probes, make_generator(self.seed, self.A.device), per_probe
        )
        frob = _delta_method(S[:, [0, 2]], lambda m: (m[0] / m[1]).sqrt())
        cos = _delta_method(S[:, 1:], lambda m: m[2] / (m[0] * m[1]).sqrt())
        return {"frobenius": frob, "cosine": cos, "method": "hutchinson"}

    def spectral(self) -> float:
        diff, info = eigenvalues(self.A - self.B, k=1, which="LM", seed=self.seed)
        ref = eigenvalues(self.B, k=1, which="LM", seed=self.seed)[0]
        self.method = info.method
        return float(diff.abs()[0] / ref.abs()[0])

    def top(self, which: str, k: int) -> Tensor:
        op = self.A if which == "A" else self.B
        _, vecs, info = eigenvectors(op, k=k, which="LA", seed=self.seed)
        self.method = info.method
        return vecs

    def apply(self, which: str, X: Tensor) -> Tensor:
        return (self.A if which == "A" else self.B).matmat(X)

    def solve(self, which: str, g: Tensor, lambdas: Tensor) -> Tensor:
        op = self.A if which == "A" else self.B
        tol = max(1e-10, 100 * torch.finfo(op.dtype).eps)
        maxiter = max(1000, 2 * op.dim)
        return torch.stack([CGInverse(op, float(lam), tol, maxiter) @ g for lam in lambdas], dim=1)


def _own_solve(op: CurvatureOperator, g: Tensor, lambdas: Tensor) -> Tensor:
    """``op.inverse(damping=λ) @ g`` for every λ: the approximation's own damped inverse."""
    g = g.to(device=op.device, dtype=op.dtype)
    return torch.stack([op.inverse(damping=float(lam)) @ g for lam in lambdas], dim=1)


def _pair_rows(pair, metrics, k: int, g: Tensor | None, lambdas: Tensor, own=None) -> list[dict]:
    rows = []

    def add(metric, value, stderr=0.0, method=None, **extra):
        method = method or pair.method
        rows.append({"metric": metric, "value": value, "stderr": stderr, "method": method, **extra})

    if "frobenius" in metrics or "cosine" in metrics:
        fc = pair.frobenius_cosine()
        for name in ("frobenius", "cosine"):
            if name in metrics:
                add(name, *fc[name], method=fc.get("method", "dense"))
    if "spectral" in metrics:
        add("spectral", pair.spectral())
    dim = g.shape[0] if g is not None else pair.A.shape[0]
    k = min(k, dim)
    if "overlap" in metrics or "directional" in metrics:
        VB = pair.top("B", k)
        if "overlap" in metrics:
            add("overlap", float((pair.top("A", k).T @ VB).pow(2).sum() / k), k=k)
        if "directional" in metrics:
            ratios = (VB * pair.apply("A", VB)).sum(0) / (VB * pair.apply("B", VB)).sum(0)
            for i, r in enumerate(ratios.tolist()):
                add("directional", r, k=k, direction=f"eigvec_{i + 1}")
    if g is not None and "directional" in metrics:
        G = g[:, None]
        add(
            "directional",
            float((G * pair.apply("A", G)).sum() / (G * pair.apply("B", G)).sum()),
            direction="gradient",
        )
    if g is not None and "preconditioning" in metrics:
        dA = pair.solve("A", g, lambdas) if own is None else _own_solve(own, g, lambdas).to(g)
        dB = pair.solve("B", g, lambdas)
        method = pair.solve_method if own is None else f"own/{pair.solve_method}"
        cos = (dA * dB).sum(0) / (dA.norm(dim=0) * dB.norm(dim=0))
        quad_A = -(g @ dA) + 0.5 * (dA * (pair.apply("B", dA) + lambdas * dA)).sum(0)
        quad_opt = -0.5 * (g @ dB)
        for lam, c, r in zip(lambdas.tolist(), cos.tolist(), (quad_A / quad_opt).tolist()):
            add("precond_cosine", c, method=method, damping=lam)
            add("precond_reduction", r, method=method, damping=lam)
    return rows


def _flat_gradient(gradient, D: int, like: CurvatureOperator) -> Tensor | None:
    if gradient is None:
        return None
    if isinstance(gradient, (list, tuple)):
        gradient = torch.cat([t.reshape(-1) for t in gradient])
    if not isinstance(gradient, Tensor) or gradient.numel() != D:
        raise ShapeError(
            f"compare: gradient must be a [D={D}] tensor or a list of parameter-shaped tensors."
        )
    return gradient.reshape(-1).to(device=like.device, dtype=like.dtype)


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"compare: {name}={value!r} must be an integer >= {minimum}.")


def compare(
    approx: CurvatureOperator | Mapping[str, CurvatureOperator],
    reference: CurvatureOperator,
    metrics: Sequence[str] = METRICS,
    k: int = 10,
    damping_grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
    gradient: Tensor | Sequence[Tensor] | None = None,
    exact_threshold: int = 4000,
    num_probes: int = 100,
    blocks: bool = True,
    approx_inverse: str = "exact",
    seed: int = 0,
    reference_name: str = "reference",
) -> pd.DataFrame:
    r"""Compare one or more approximations with a reference curvature operator.

    Whole-matrix rows (``block="all"``) come first, then one set of rows per
    diagonal block of ``reference.block_slices()`` (per layer for layered
    operators), comparing the blocks :math:`A_{ll}` and :math:`B_{ll}` (and the
    gradient's block) as matrices of their own.

    Exact versus estimated: when ``D <= exact_threshold`` both operators are
    densified (``D`` products each) and every metric is exact (``method="dense"``,
    ``stderr = 0``). Otherwise ``frobenius`` and ``cosine`` are estimated from
    ``num_probes`` shared Rademacher probes :math:`z`:
    :math:`\|A-B\|_F^2 = \mathbb E\|(A-B)z\|^2`, :math:`\|B\|_F^2 = \mathbb E\|Bz\|^2`,
    :math:`\operatorname{tr}(AB) = \mathbb E (Az)^\top(Bz)` (Hutchinson 1990); the
    ratios' standard errors come from the delta method on the samples'
    covariance (``method="hutchinson"``). ``spectral``, ``overlap`` and
    ``directional`` then use Lanczos (:func:`curvkit.diagnostics.spectral.eigenvectors`,
    ``stderr = 0``: converged to its tolerance) and the damped solves use
    conjugate gradients (:class:`~curvkit.operators.cg.CGInverse`,
    ``method="cg"``). A block larger than ``exact_threshold`` is compared
    through block views (each product costs a full one); smaller blocks are
    densified.

    Args:
        approx: The approximation ``A``, or a mapping ``name -> A`` to compare several.
        reference: The reference ``B`` (same shape).
        metrics: Subset of :data:`METRICS`.
        k: Number of top eigenvectors for ``overlap`` and ``directional``
            (capped at the block size).
        damping_grid: The :math:`\lambda` values of ``preconditioning``; they
            must make :math:`A + \lambda I` and :math:`B + \lambda I` invertible
            (positive definite for conjugate gradients).
        gradient: ``g`` as a flat ``[D]`` tensor or a list of parameter-shaped
            tensors; without it the gradient rows and ``preconditioning`` are skipped.
        exact_threshold: Largest ``D`` (or block size) compared densely.
        num_probes: Probes of the Frobenius and cosine estimates.
        blocks: Whether to add the per-block rows.
        approx_inverse: ``"exact"``: :math:`d_A = (A + \lambda I)^{-1} g` as
            defined above. ``"own"``: :math:`d_A` = ``approx.inverse(damping=λ) @ g``,
            the damped inverse a K-FAC optimiser applies, in the operator's own
            damping convention (exact Tikhonov for block-diagonal K-FAC, EKFAC
            and diagonals; M&G's factored damping for tri-diagonal K-FAC). Whole
            matrix only (``method`` prefixed ``own/``); block rows stay exact.
        seed: Seed of probes and Lanczos start vectors.
        reference_name: Name of the reference in the table.

    Returns:
        A DataFrame with columns :data:`COLUMNS`: ``approx``, ``reference``,
        ``block``, ``metric``, ``value``, ``stderr``, ``method``, ``k``
        (overlap/directional), ``damping`` (preconditioning) and ``direction``
        (directional); inapplicable entries are missing.

    Raises:
        ShapeError: If the operators' shapes differ, a metric or
            ``approx_inverse`` is unknown, ``gradient`` has the wrong size,
            ``k`` or ``num_probes`` is not a positive integer, or ``damping_grid``
            holds a negative or non-finite value.

    Example:
        >>> import torch, curvkit as ck
        >>> B = ck.DenseOperator(torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)))
        >>> A = ck.DenseOperator(torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)))
        >>> df = ck.compare(A, B, metrics=("frobenius", "spectral"))
        >>> df[["metric", "value"]].round(4).values.tolist()
        [['frobenius', 0.2182], ['spectral', 0.25]]
    """
    approxes = dict(approx) if isinstance(approx, Mapping) else {type(approx).__name__: approx}
    if not approxes:
        raise ConfigError("compare: approx is an empty mapping; give at least one operator.")
    for name, A in {**approxes, reference_name: reference}.items():
        if not isinstance(A, CurvatureOperator):
            raise ConfigError(
                f"compare: {name!r} is a {type(A).__name__}, not a CurvatureOperator."
            )
        if A.shape != reference.shape:
            raise ShapeError(
                f"compare: {name!r} has shape {A.shape}, the reference {reference.shape}."
            )
    if approx_inverse not in ("exact", "own"):
        raise ConfigError(f"compare: approx_inverse={approx_inverse!r} is not 'exact' or 'own'.")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ConfigError(f"compare: unknown metrics {sorted(unknown)}; supported: {METRICS}.")
    _check_count("k", k, 1)
    _check_count("num_probes", num_probes, 1)
    _check_count("exact_threshold", exact_threshold, 0)
    grid = [float(lam) for lam in damping_grid]
    if not all(math.isfinite(lam) and lam >= 0 for lam in grid):
        raise ConfigError(
            f"compare: damping_grid={list(damping_grid)} must hold finite values >= 0."
        )
    D = reference.dim
    g = _flat_gradient(gradient, D, reference)
    lambdas = torch.as_tensor(list(damping_grid), dtype=reference.dtype, device=reference.device)
    exact = D <= exact_threshold
    B_dense = reference.to_dense() if exact else None
    slices = reference.block_slices() if blocks and len(reference.block_slices()) > 1 else []

    rows = []
    reference_eig = {}  # per block: the reference is decomposed once, not per approximation
    for name, A in approxes.items():
        A_dense = A.to_dense().to(B_dense) if exact else None
        pairs = [("all", slice(0, D))] + slices
        for i, (block, s) in enumerate(pairs):
            whole = i == 0
            cache = reference_eig.setdefault(block, {})
            if exact:
                pair = _DensePair(A_dense[s, s], B_dense[s, s], cache)
            elif s.stop - s.start <= exact_threshold:
                if "dense" not in cache:
                    cache["dense"] = BlockView(reference, s).to_dense()
                pair = _DensePair(BlockView(A, s).to_dense(), cache["dense"], cache)
            else:
                Av, Bv = (A, reference) if whole else (BlockView(A, s), BlockView(reference, s))
                pair = _OperatorPair(Av, Bv, num_probes, seed)
            g_block = None if g is None else g[s]
            own = A if whole and approx_inverse == "own" else None
            for row in _pair_rows(pair, metrics, k, g_block, lambdas, own):
                rows.append({"approx": name, "reference": reference_name, "block": block, **row})
    return pd.DataFrame(rows, columns=COLUMNS)
