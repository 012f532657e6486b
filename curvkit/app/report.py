r"""The ``curvkit report`` job: every comparison of one problem on one self-contained page.

:func:`build_report` (command line) and :func:`report` (a model, a loss and
data from a script) compute, on a subset of the training data, the exact
Hessian, GGN, Monte Carlo Fisher and empirical Fisher beside K-FAC (Monte
Carlo), KFLR, KFRA, EKFAC, the diagonal GGN and tri-diagonal KFLR, compare every
one with the GGN, and write ``DIR/index.html`` (figures embedded, tables,
command line, versions, timings), ``DIR/metrics.csv`` (the comparison table),
``DIR/results.json`` (every number) and ``DIR/figures/*.png`` with a PDF of
each figure.

Two regimes, chosen by ``max_dense``:

- ``D <= max_dense`` (dense): every matrix is formed, from batched products —
  per-example Jacobians :math:`J` for the Gauss-Newton forms (GGN, Fisher,
  empirical Fisher: :math:`\sum_n J_n^\top\Lambda_n J_n`, one forward-mode pass
  per block of identity columns) and vectorised Hessian-vector products for the
  Hessian — then compared exactly (:func:`curvkit.diagnostics.metrics.compare`),
  with all eigenvalues, Lanczos checked against them and exact traces.
- ``D > max_dense`` (matrix-free): no ``D x D`` matrix is ever held. Top
  eigenvalues by restarted Lanczos (with residuals), spectral densities by
  stochastic Lanczos quadrature, traces by Hutchinson and Hutch++ with standard
  errors, and the comparison from block products: Rademacher probes supported on
  one layer block at a time give unbiased estimates of
  :math:`\|A - G\|_F^2`, :math:`\|G\|_F^2` and :math:`\operatorname{tr}(AG)` for the
  whole matrix and for every diagonal block at once (standard errors by the
  delta method), the top eigenspace overlap and directional curvatures come
  from the Lanczos vectors.

Every operator and phase runs on its own: an approximation the model does not
support (a curvkit error, e.g. KFRA on a CNN) is listed as "not available" with
the reason, any other failure as "failed" with its message; the report goes
on. ``results.json`` is rewritten after each phase, ``metrics.csv`` and the
figures as soon as they exist, so a late failure keeps what finished; the page
lists what failed.

Example:
    .. code-block:: console

        $ curvkit report --out report/                      # default problem
        $ curvkit report --problem digits_cnn --operators ggn,kflr,ekfac --out r/
        $ curvkit report --model my_model.py:build --max-dense 0 --out r/   # matrix-free

    ``my_model.py:build`` names a function returning ``(model, loss_func, (X, y))``.
    From Python:

    .. code-block:: python

        import curvkit as ck
        ck.report(model, torch.nn.CrossEntropyLoss(), (X, y), out="report/")
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shlex
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from curvkit.errors import ConfigError, CurvkitError, ShapeError
from curvkit.operators.base import CurvatureOperator, DenseOperator
from curvkit.timing import Clock

__all__ = [
    "DEFAULT_PROBLEM", "MAX_DENSE", "OPERATORS", "add_arguments", "build_report",
    "digits_mlp_small", "report", "run",
]  # fmt: skip

#: Problem of ``curvkit report`` without ``--problem``: digits, MLP 64-12-12-10 (1,066 params).
DEFAULT_PROBLEM = "digits_mlp_small"
#: Default largest ``D`` with dense ``D x D`` matrices; above it the report is matrix-free.
MAX_DENSE = 4000
REFERENCE = "GGN"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Errors that mark an approximation "not available" (unsupported) rather than "failed".
_UNAVAILABLE = (CurvkitError, NotImplementedError, ImportError)
#: The exact matrices: never ranked as approximations of the GGN.
EXACT = ("GGN", "Hessian", "Fisher (MC)", "EF")
#: ``--operators`` keys and the names in the report, in report order.
OPERATORS = {
    "ggn": "GGN", "hessian": "Hessian", "fisher": "Fisher (MC)", "ef": "EF", "kfac": "KFAC",
    "kflr": "KFLR", "kfra": "KFRA", "ekfac": "EKFAC", "diag_ggn": "diag GGN",
    "tridiag_kflr": "tri-diag KFLR",
}  # fmt: skip
#: Entries of the largest Jacobian ``[D, N, C]`` the dense Gauss-Newton path forms at once.
_JACOBIAN_ENTRIES = 2**25


# -- problem ------------------------------------------------------------------------------
def digits_mlp_small(seed: int = 0, dtype=torch.float64, device="cpu"):
    """Digits MLP 64-12-12-10 (tanh), cross-entropy: the data of ``digits_mlp``, a narrower net.

    Small enough (``D = 1066``) for every dense matrix of the report.
    """
    from curvkit.problems import Problem, get_problem

    base = get_problem("digits_mlp", seed=seed, dtype=dtype, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        widths = (64, 12, 12, 10)
        layers = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(d_in, d_out)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
        model = nn.Sequential(*layers).to(device=device, dtype=dtype)
    return Problem(
        "digits_mlp_small", model, base.loss_func, base.train, base.test,
        "MLP 64-12-12-10 (tanh) on sklearn digits, cross-entropy", "classification", seed,
    )  # fmt: skip


def _load_model(spec: str):
    """``(name, description, model, loss_func, (X, y))`` from ``"path.py:function"``."""
    path, sep, fn = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not fn.isidentifier():
        raise ConfigError(f"--model {spec!r}: expected 'path/to/file.py:function'.")
    if not Path(path).is_file():
        raise ConfigError(f"--model {spec!r}: no file {path!r}.")
    module_spec = importlib.util.spec_from_file_location(f"_curvkit_model_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, fn, None)):
        raise ConfigError(f"--model {spec!r}: {path} defines no function {fn!r}.")
    out = getattr(module, fn)()
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], nn.Module)):
        raise ConfigError(f"--model {spec!r}: {fn}() must return (model, loss_func, (X, y)).")
    model, loss_func, (X, y) = out
    return Path(path).name + ":" + fn, f"{type(model).__name__} from {spec}", model, loss_func, X, y


def _to(model, X, y, device, dtype):
    model = model.to(device=device, dtype=dtype)
    X = X.to(device=device, dtype=dtype if X.is_floating_point() else X.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    return model, X, y


def parse_operators(operators) -> list[str]:
    """Report names of ``operators`` (keys of :data:`OPERATORS` or names), GGN first.

    Args:
        operators: ``None`` (all), a comma-separated string or a sequence of keys
            (``"ggn"``, ``"kflr"``, ...) or report names (``"tri-diag KFLR"``),
            case-insensitive. The GGN, the reference, is always included.

    Returns:
        The report names in :data:`OPERATORS` order.

    Raises:
        ConfigError: For an unknown name.
    """
    if operators is None:
        return list(OPERATORS.values())
    if isinstance(operators, str):
        operators = [s for s in operators.split(",")]
    lookup = {k: v for k, v in OPERATORS.items()} | {v.lower(): v for v in OPERATORS.values()}
    chosen = {REFERENCE}
    for item in operators:
        key = str(item).strip().lower()
        if key not in lookup:
            raise ConfigError(
                f"report: operators: unknown operator {item!r}; supported: "
                f"{', '.join(OPERATORS)} (the GGN, the reference, is always computed)."
            )
        chosen.add(lookup[key])
    return [v for v in OPERATORS.values() if v in chosen]


def _check_out(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable before any computation."""
    probe = out_dir / ".curvkit-write-test"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"report: out_dir {str(out_dir)!r} is not a writable folder: {e}"
        ) from None


# -- bookkeeping --------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import curvkit

    out = {"python": platform.python_version(), "curvkit": curvkit.__version__}
    for label, dist in (
        ("torch", "torch"), ("backpack", "backpack-for-pytorch"),
        ("curvlinops", "curvlinops-for-pytorch"), ("numpy", "numpy"), ("scipy", "scipy"),
        ("pandas", "pandas"), ("matplotlib", "matplotlib"),
    ):  # fmt: skip
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = "not installed"
    return out


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _train(model, loss_func, X, y, steps: int, seed: int, tracker=None, batch_size: int = 64):
    """A short seeded Adam run (lr 1e-2) so the analysis is not at initialisation.

    ``tracker`` (a :class:`~curvkit.diagnostics.tracking.CurvatureTracker`) records
    on its own fixed batch at its steps and after the last step.
    """
    if steps <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        if tracker:
            tracker.maybe_record(step, *tracker.report_batch)
        idx = torch.randint(0, X.shape[0], (min(batch_size, X.shape[0]),), generator=gen)
        idx = idx.to(X.device)
        opt.zero_grad(set_to_none=True)
        loss = loss_func(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if tracker is not None:
        tracker.record(steps, *tracker.report_batch)
    for p in model.parameters():
        p.grad = None
    return losses


def _builders(seed: int) -> dict[str, tuple]:
    """Report name -> ``(builder(model, loss_func, data), description)``."""
    import curvkit as ck

    return {
        "GGN": (lambda m, lf, d: ck.ggn(m, lf, d), "exact generalised Gauss-Newton (reference)"),
        "Hessian": (lambda m, lf, d: ck.hessian(m, lf, d), "exact Hessian"),
        "Fisher (MC)": (
            lambda m, lf, d: ck.fisher(m, lf, d, mc_samples=1, seed=seed),
            "Monte Carlo Fisher, one sampled label per example",
        ),
        "EF": (lambda m, lf, d: ck.empirical_fisher(m, lf, d), "empirical Fisher (true labels)"),
        "KFAC": (
            lambda m, lf, d: ck.kfac(m, lf, d, kind="kfac", mc_samples=1, seed=seed),
            "block-diagonal K-FAC, Monte Carlo G (one sample)",
        ),
        "KFLR": (lambda m, lf, d: ck.kfac(m, lf, d, kind="kflr"), "block-diagonal K-FAC, exact G"),
        "KFRA": (
            lambda m, lf, d: ck.kfac(m, lf, d, kind="kfra"),
            "block-diagonal K-FAC, recursive G",
        ),
        "EKFAC": (lambda m, lf, d: ck.ekfac(m, lf, d), "eigenvalue-corrected K-FAC (empirical)"),
        "diag GGN": (lambda m, lf, d: ck.diag_ggn(m, lf, d), "exact diagonal of the GGN"),
        "tri-diag KFLR": (
            lambda m, lf, d: ck.kfac(m, lf, d, kind="kflr", structure="tridiagonal"),
            "block-tri-diagonal K-FAC (M&G 2015, §4.3), exact G",
        ),
    }


# -- dense matrices from batched products ---------------------------------------------------
def _identity_chunks(op, chunk: int):
    for start in range(0, op.dim, chunk):
        stop = min(start + chunk, op.dim)
        E = torch.zeros(op.dim, stop - start, dtype=op.dtype, device=op.device)
        E[torch.arange(start, stop, device=op.device), torch.arange(stop - start)] = 1
        yield E


def _per_example_jacobian(op, X: torch.Tensor) -> torch.Tensor:
    """``[D, N, *out]``: the model's Jacobian per example, by reverse mode (``torch.func``).

    One vectorised backward pass per output coordinate over the whole batch
    (``vmap`` of ``jacrev`` over examples); the model must treat examples
    independently (evaluation mode).
    """
    from torch.func import functional_call, jacrev, vmap

    params = {n: p.detach() for n, p in zip(op.param_names, op.params)}

    def single(ps, x):
        return functional_call(op.model, ps, (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, X)
    N = X.shape[0]
    parts = [jac[n].reshape(N, -1, p.numel()) for n, p in zip(op.param_names, op.params)]
    out_shape = jac[op.param_names[0]].shape[1 : jac[op.param_names[0]].ndim - op.params[0].ndim]
    J = torch.cat(parts, dim=2)  # [N, C, D]
    return J.permute(2, 0, 1).reshape(op.dim, N, *out_shape)


def _gauss_newton_dense(op, cache: dict | None = None):
    r""":math:`\sum_n J_n^\top\Lambda_n J_n` from the per-example Jacobians of each batch.

    ``J`` (``[D, N, C]``) from :func:`_per_example_jacobian`; one ``D x NC`` by
    ``NC x D`` product forms the matrix, with the operator's own output
    curvature :math:`\Lambda` (the same Monte Carlo samples as its products).
    Returns ``(matrix, root)``: ``root`` is ``R`` with ``matrix = R Rᵀ`` where
    :math:`\Lambda` comes as a thin square-root factor (Monte Carlo and
    empirical Fisher), else ``None``; ``(None, None)`` when a batch's Jacobian
    would exceed :data:`_JACOBIAN_ENTRIES`.

    ``cache`` (a dict owned by the caller) keeps each batch's output and
    Jacobian for the next Gauss-Newton form of the same model, parameters and
    data (the GGN, Fisher and empirical Fisher differ only in :math:`\Lambda`);
    the key holds the batches' and parameters' identities and versions, so a
    changed parameter or batch is recomputed.
    """
    from curvkit.operators._autodiff import forward_context

    D = op.dim
    total, roots = None, []
    op._reset()
    with forward_context(op.model):
        for Xb, yb, scale in op._data():
            key = (id(op.model), id(Xb), Xb._version, *((id(p), p._version) for p in op.params))
            if cache is not None and key in cache:
                f, J = cache[key]
            else:
                with torch.no_grad():
                    f = op.model(Xb)
                if D * f.numel() > _JACOBIAN_ENTRIES:
                    return None, None
                J = _per_example_jacobian(op, Xb)
                if cache is not None:
                    cache[key] = (f, J)
            lam = op._output_curvature(f.detach(), yb, scale)
            root = getattr(lam, "root", None)
            if root is not None:  # Λ = R Rᵀ of low rank (Monte Carlo / empirical Fisher)
                R = root(J).reshape(D, -1)
                roots.append(R)
                term = R @ R.T
            else:
                roots.append(None)
                term = J.reshape(D, -1) @ lam(J).reshape(D, -1).T
            total = term if total is None else total + term
    op.matvecs += D
    factored = bool(roots) and all(R is not None for R in roots)
    return total, (torch.cat(roots, dim=1) if factored else None)


def _hessian_dense(op, chunk: int = 32):
    r"""The Hessian from vectorised forward-over-reverse products, one parameter at a time.

    For the columns of parameter :math:`j` only the rows of parameters
    :math:`i \ge j` (flat order) are formed: ``vmap`` over identity tangents of
    :math:`\theta_j` of ``jvp(grad)``, with the gradient taken with respect to
    :math:`\theta_j, \dots, \theta_P` alone and every earlier parameter held
    constant. The tangents then enter the graph at the module that uses
    :math:`\theta_j`, and the reverse pass stops at the first module using one of
    the differentiated parameters, so the columns of a late layer cost little
    more than that layer; the rows :math:`i < j` follow by symmetry,
    :math:`H_{ij} = H_{ji}^\top`. Exact for any ordering of the parameters
    (only the saving depends on it). ``chunk`` columns share one ``vmap``: 32 ran
    faster than 64 on ``digits_cnn`` (float64 convolutions; 1.6-1.9 times alone,
    6-20 % inside the report), with the same matrix to the last bit.
    """
    from torch.func import functional_call, grad, jvp, vmap

    from curvkit.operators._autodiff import forward_context

    params = [p.detach() for p in op.params]
    names, P = op.param_names, len(op.params)
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    batches = list(op._data())
    H = torch.zeros(op.dim, op.dim, dtype=op.dtype, device=op.device)

    def loss_from(j):
        def loss(*later):
            tensors = dict(zip(names, params[:j] + list(later)))
            return sum(
                scale * op.loss_func(functional_call(op.model, tensors, (Xb,)), yb)
                for Xb, yb, scale in batches
            )

        return grad(loss, argnums=tuple(range(P - j)))

    with forward_context(op.model):
        for j, pj in enumerate(params):
            gradient = loss_from(j)

            def column(tangent, gradient=gradient, j=j):
                return jvp(lambda x: gradient(x, *params[j + 1 :]), (params[j],), (tangent,))[1]

            n = pj.numel()
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                T = torch.zeros(stop - start, n, dtype=op.dtype, device=op.device)
                T[torch.arange(stop - start), torch.arange(start, stop)] = 1
                parts = vmap(column)(T.reshape(stop - start, *pj.shape))
                rows = torch.cat([q.reshape(stop - start, -1) for q in parts], dim=1).T
                H[offsets[j] :, offsets[j] + start : offsets[j] + stop] = rows
    for j in range(P):  # the rows above parameter j's diagonal block, by symmetry
        cols = slice(offsets[j], offsets[j + 1])
        H[: offsets[j], cols] = H[cols, : offsets[j]].T
    op.matvecs += op.dim
    return H


def _dense_matrix(op, cache: dict | None = None) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """``(matrix in float64, method, root)``: batched Jacobians/HVPs where they apply.

    Column-by-column products elsewhere.

    ``root``: a thin ``R`` with ``matrix = R Rᵀ`` (see :func:`_gauss_newton_dense`), or ``None``.
    ``cache``: shared Jacobians of the Gauss-Newton forms.
    """
    from curvkit.operators.exact import HessianOperator, _GaussNewtonForm

    M, method, R = None, "products", None
    try:
        if isinstance(op, _GaussNewtonForm):
            (M, R), method = _gauss_newton_dense(op, cache), "jacobian"
        elif isinstance(op, HessianOperator):
            M, method = _hessian_dense(op), "vmap-hvp"
    except RuntimeError:  # e.g. a model torch.func cannot transform: plain products
        M, R = None, None
    if M is None:
        method = "products"
        M = op.to_dense(chunk_size=min(op.dim, 256))
    M = M.to(torch.float64)
    return (M + M.T) / 2, method, None if R is None else R.to(torch.float64)


def _dense_op(M, ref, factor=None):
    """``M`` as an operator with ``ref``'s blocks (products through a ``factor``, if given)."""
    blocks = {"block_sizes": ref.block_sizes, "block_names": ref.block_names}
    if isinstance(factor, _LowRank):
        return _FactorOperator(factor, ref.param_shapes, M.dtype, M.device, **blocks)
    return DenseOperator(M, ref.param_shapes, **blocks)


class _Tridiagonal:
    r"""One Householder reduction :math:`M = Q T Q^\top` of a dense symmetric matrix.

    LAPACK ``sytrd`` (Golub & Van Loan 2013, §8.3.1) costs about as much as the
    eigenvalues alone and then serves every later question about ``M`` in
    :math:`O(D^2)` or less: all eigenvalues (``sterf`` on ``T``), the top-``k``
    eigenpairs (bisection and inverse iteration on ``T``, then :math:`Q`),
    shifted solves :math:`(M + \lambda I)^{-1} g = Q (T + \lambda I)^{-1} Q^\top g`,
    and Lanczos runs: from the start vectors :math:`Q^\top V_0` on ``T`` they give
    the coefficients of the runs from :math:`V_0` on ``M`` (up to rounding).

    ``blocks`` (contiguous slices covering ``0..D``): ``M`` is block-diagonal
    with these blocks, each reduced alone; ``Q`` is then block-diagonal and
    ``T`` has zero couplings between the blocks.
    """

    def __init__(self, M: torch.Tensor, blocks=None):
        import numpy as np
        from scipy.linalg import lapack

        D = M.shape[0]
        self.like, self.dim = M, D
        blocks = [slice(0, D)] if blocks is None else list(blocks)
        A = M.detach().to("cpu", torch.float64).numpy()
        d, e, self.reflectors = np.zeros(D), np.zeros(max(D - 1, 0)), []
        for s in blocks:
            n = s.stop - s.start
            # diagonal (NaN/Inf on it counts as off-diagonal, for sytrd's check): T = M, Q = I
            if not np.count_nonzero(A[s, s] - np.diag(np.diag(A[s, s]))):
                d[s] = np.diag(A[s, s])
                continue
            a = np.array(A[s, s], order="F")
            lwork = int(lapack.dsytrd_lwork(n, lower=1)[0])
            c, d_s, e_s, tau, info = lapack.dsytrd(a, lower=1, lwork=max(lwork, 1), overwrite_a=1)
            if info != 0 or not (np.isfinite(d_s).all() and np.isfinite(e_s).all()):
                raise torch.linalg.LinAlgError(
                    f"Householder tridiagonalisation failed (info={info})"
                )
            d[s], e[s.start : s.stop - 1] = d_s, e_s
            # Q_s = H_0 ... H_{n-2} acts on the block's rows 1..n-1: the reflectors of a QR
            # factorisation below the diagonal of c[1:, :n-1] (what LAPACK's ormtr hands ormqr)
            if n > 1:
                reflectors = np.asfortranarray(c[1:, : n - 1])
                self.reflectors.append((s.start + 1, s.stop, reflectors, tau))
        self.d, self.e = d, e

    def _apply(self, X: torch.Tensor, trans: bytes) -> torch.Tensor:
        import numpy as np
        from scipy.linalg import lapack

        Y = np.array(X.detach().to("cpu", torch.float64).numpy(), dtype=np.float64)
        vector = Y.ndim == 1
        Y = Y.reshape(self.dim, -1)
        for lo, hi, reflectors, tau in self.reflectors:  # blocked Householder products
            C = np.asfortranarray(Y[lo:hi])
            query = lapack.dormqr(b"L", trans, reflectors, tau, C, -1)
            lwork = max(int(query[1][0]), C.shape[1], 1)
            C, _, info = lapack.dormqr(b"L", trans, reflectors, tau, C, lwork)
            if info != 0:
                raise torch.linalg.LinAlgError(f"Householder product failed (info={info})")
            Y[lo:hi] = C
        Y = Y[:, 0] if vector else Y
        return torch.from_numpy(np.ascontiguousarray(Y)).to(self.like)

    def qt(self, X: torch.Tensor) -> torch.Tensor:
        r""":math:`Q^\top X`."""
        return self._apply(X, b"T")

    def q(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`Q Y`."""
        return self._apply(Y, b"N")

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues, ascending (``sterf``)."""
        from scipy.linalg import lapack

        w, info = lapack.dsterf(self.d.copy(), self.e.copy())
        if info != 0:
            raise torch.linalg.LinAlgError(f"tridiagonal eigenvalues failed (info={info})")
        return torch.from_numpy(w).to(self.like)

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest eigenvalues (descending) and their eigenvectors ``[D, k]``."""
        from scipy.linalg import eigh_tridiagonal

        w, S = eigh_tridiagonal(
            self.d, self.e, select="i", select_range=(self.dim - k, self.dim - 1)
        )
        w, S = w[::-1].copy(), S[:, ::-1].copy()
        return torch.from_numpy(w).to(self.like), self.q(torch.from_numpy(S))

    def solve(self, g: torch.Tensor, lambdas) -> torch.Tensor:
        r""":math:`(M + \lambda I)^{-1} g` for every :math:`\lambda`, ``[D, len(lambdas)]``."""
        import numpy as np
        from scipy.linalg import lapack

        b = self.qt(g).to("cpu", torch.float64).numpy()
        cols = []
        for lam in lambdas:
            *_, x, info = lapack.dgtsv(self.e, self.d + float(lam), self.e, b)
            if info != 0:
                raise torch.linalg.LinAlgError(f"singular shifted system (lambda={lam})")
            cols.append(x)
        return self.q(torch.from_numpy(np.stack(cols, axis=1)))

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``T X`` in :math:`O(D)` per column."""
        d, e = (torch.from_numpy(a).to(X) for a in (self.d, self.e))
        Y = d[:, None] * X
        Y[:-1] += e[:, None] * X[1:]
        Y[1:] += e[:, None] * X[:-1]
        return Y


class _LowRank:
    r"""A positive semi-definite :math:`M = R R^\top` from a thin ``R`` (``[D, r]``).

    The thin SVD :math:`R = U \Sigma V^\top` (:math:`O(Dr^2)`) gives every
    eigenpair: :math:`\Sigma^2` on :math:`U`, zero on its complement. So all
    eigenvalues, the top-``k`` eigenpairs (``k <= r``), damped solves
    :math:`(M + \lambda I)^{-1} g = U(\Sigma^2 + \lambda)^{-1}U^\top g +
    (g - UU^\top g)/\lambda` and products :math:`R(R^\top X)` (:math:`O(Dr)`,
    for Lanczos runs on ``M`` itself: ``qt`` is the identity) cost far less
    than a reduction of the dense matrix. The interface of :class:`_Tridiagonal`.
    """

    def __init__(self, R: torch.Tensor, like: torch.Tensor):
        self.like, self.dim = like, R.shape[0]
        self.R = R.to(like)
        U, S, _ = torch.linalg.svd(self.R, full_matrices=False)
        self.U, self.values = U, S**2  # descending

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues, ascending (``D - r`` exact zeros first)."""
        return torch.cat(
            [self.values.new_zeros(self.dim - self.values.numel()), self.values.flip(0)]
        )

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k <= r`` largest eigenvalues (descending) and their eigenvectors ``[D, k]``."""
        return self.values[:k], self.U[:, :k]

    def solve(self, g: torch.Tensor, lambdas) -> torch.Tensor:
        r""":math:`(M + \lambda I)^{-1} g` for every :math:`\lambda > 0`, ``[D, len(lambdas)]``."""
        c = self.U.T @ g
        rest = g - self.U @ c
        cols = []
        for lam in lambdas:
            if not lam > 0:
                raise torch.linalg.LinAlgError(f"singular shifted system (lambda={lam})")
            cols.append(self.U @ (c / (self.values + lam)) + rest / lam)
        return torch.stack(cols, dim=1)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``M X`` as ``R (Rᵀ X)``."""
        return self.R @ (self.R.T @ X)

    def qt(self, X: torch.Tensor) -> torch.Tensor:
        return X


class _FactorOperator(CurvatureOperator):
    """A factorisation's products as an operator.

    ``M X`` of a :class:`_LowRank`, ``T X`` of a :class:`_Tridiagonal`.
    """

    def __init__(self, factor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def _matmat(self, X):
        return self.factor.matmat(X)


def _low_rank(roots: dict, dense: dict, k: int) -> dict:
    """Name -> :class:`_LowRank` of the matrices whose root has ``k`` to ``D/2`` columns."""
    out = {}
    for name, R in roots.items():
        D, r = R.shape
        if name in dense and k <= r and 2 * r <= D:
            out[name] = _LowRank(R, dense[name])
    return out


def _tridiagonal_density(tri: _Tridiagonal, ref, log: bool, seed: int, steps: int = 80):
    r"""``ck.spectral_density(M, num_probes=10, lanczos_steps=steps)`` from ``M = Q T Q^T``.

    The same Rademacher probes, rotated by :math:`Q^\top`, run Lanczos on ``T``
    (:math:`O(D)` per product instead of :math:`O(D^2)`); nodes and weights are
    those of the runs on ``M`` up to rounding, and so is the density.
    """
    from curvkit.diagnostics.spectral import _probe_quadrature, _smoothed

    op = _FactorOperator(tri, ref.param_shapes, tri.like.dtype, tri.like.device)
    m = min(steps, tri.dim)
    nodes, weights = _probe_quadrature(op, 10, m, seed, rotate=tri.qt)
    return _smoothed(nodes, weights, 10, op.matvecs, 1024, None, log, None)


def _eigvalsh(M: torch.Tensor, slices) -> torch.Tensor:
    """All eigenvalues; block by block when every off-diagonal block is exactly zero."""
    if _block_diagonal(M, slices):
        return torch.cat([torch.linalg.eigvalsh(M[s, s]) for _, s in slices])
    return torch.linalg.eigvalsh(M)


def _effective_rank(lam: torch.Tensor) -> float:
    r"""Entropy effective rank :math:`\exp(-\sum_i p_i\log p_i)` (Roy & Vetterli 2007)."""
    p = lam.clamp_min(0)
    p = p / p.sum()
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def _delta(mean: torch.Tensor, cov: torch.Tensor, f) -> tuple[float, float]:
    r"""``f(mean)`` and its delta-method standard error :math:`\sqrt{\nabla f^\top C\nabla f}`."""
    grad = torch.autograd.functional.jacobian(f, mean)
    return float(f(mean)), float((grad @ cov @ grad).clamp_min(0).sqrt())


def _block_probes(slices, dim, probes: int, gen, dtype, device):
    """Per block ``[D, probes]`` Rademacher columns supported on that block only."""
    out = []
    for _, s in slices:
        Z = torch.zeros(dim, probes, dtype=dtype, device=device)
        signs = torch.randint(0, 2, (s.stop - s.start, probes), generator=gen)
        Z[s] = (2 * signs - 1).to(dtype=dtype, device=device)
        out.append(Z)
    return out


def compare_matrix_free(ops, reference, top, g, probes: int = 8, seed: int = 0, bar=None):
    r"""Compare operators with the reference through block products (no ``D x D`` matrix).

    For a Rademacher probe :math:`z` supported on block :math:`l`,
    :math:`\mathbb E\|Mz\|^2 = \|M_{:,l}\|_F^2` and :math:`\mathbb E\|(Mz)_l\|^2 = \|M_{ll}\|_F^2`
    (Hutchinson 1990), so ``probes`` products per block estimate, with the
    same products, the whole-matrix sums :math:`\|A-G\|_F^2`, :math:`\|G\|_F^2`,
    :math:`\|A\|_F^2`, :math:`\operatorname{tr}(AG)` (sums over the blocks) and
    those of every diagonal block. ``frobenius`` and ``cosine`` are ratios of
    these means, with delta-method standard errors from the samples' covariance.
    ``overlap`` uses the top-``k`` Lanczos vectors of both operators and
    ``directional`` the reference's (and the gradient), as in
    :func:`curvkit.diagnostics.metrics.compare`.

    Args:
        ops: Name -> approximation (the reference excluded).
        reference: The reference operator ``G``.
        top: Name -> ``(values, vectors)`` of the top eigenpairs (reference included,
            under :data:`REFERENCE`).
        g: The flat gradient, or ``None``.
        probes: Probes per block.
        seed: Seed of the probes.
        bar: Progress wrapper ``bar(iterable, desc)``.

    Returns:
        Rows with the columns of :data:`curvkit.diagnostics.metrics.COLUMNS`.
    """
    bar = bar or (lambda it, desc: it)
    slices = reference.block_slices()
    gen = torch.Generator().manual_seed(seed)
    Zs = _block_probes(slices, reference.dim, probes, gen, reference.dtype, reference.device)
    BZ = [reference.matmat(Z) for Z in Zs]
    ref_top = top.get(REFERENCE)
    if ref_top is not None:
        VB = ref_top[1]
        BV = reference.matmat(VB)
    G = None if g is None else g.to(device=reference.device, dtype=reference.dtype)[:, None]
    gBg = None if G is None else float((G * reference.matmat(G)).sum())
    rows = []

    def add(name, block, metric, value, stderr=0.0, method="block-hutchinson", **extra):
        rows.append(
            {"approx": name, "reference": REFERENCE, "block": block, "metric": metric,
             "value": value, "stderr": stderr, "method": method, **extra}
        )  # fmt: skip

    def frob(m):
        return (m[0] / m[2]).sqrt()

    def cosine(m):
        return m[3] / (m[1] * m[2]).sqrt()

    for name, A in bar(list(ops.items()), desc="compare"):
        whole_mean = torch.zeros(4, dtype=torch.float64)
        whole_cov = torch.zeros(4, 4, dtype=torch.float64)
        per_block = []
        for (block, s), Z, Bz in zip(slices, Zs, BZ):
            Az = A.matmat(Z)
            samples = []
            for rows_of in (slice(None), s):
                a, b = Az[rows_of].double(), Bz[rows_of].double()
                samples.append(
                    torch.stack([((a - b) ** 2).sum(0), (a**2).sum(0), (b**2).sum(0),
                                 (a * b).sum(0)], dim=1)
                )  # fmt: skip
            full, diag = samples
            whole_mean += full.mean(0)
            whole_cov += torch.cov(full.T) / probes
            per_block.append((block, diag.mean(0), torch.cov(diag.T) / probes))
        add(name, "all", "frobenius", *_delta(whole_mean, whole_cov, frob))
        add(name, "all", "cosine", *_delta(whole_mean, whole_cov, cosine))
        if ref_top is not None and name in top:
            k = min(VB.shape[1], top[name][1].shape[1])
            overlap = float((top[name][1][:, :k].T @ VB[:, :k]).pow(2).sum() / k)
            add(name, "all", "overlap", overlap, method="lanczos", k=k)
        if ref_top is not None:
            AV = A.matmat(VB)
            ratios = (VB * AV).sum(0) / (VB * BV).sum(0)
            for i, r in enumerate(ratios.tolist()):
                add(name, "all", "directional", r, method="lanczos", k=VB.shape[1],
                    direction=f"eigvec_{i + 1}")  # fmt: skip
        if G is not None and gBg:
            add(name, "all", "directional", float((G * A.matmat(G)).sum()) / gBg,
                method="exact", direction="gradient")  # fmt: skip
        for block, mean, cov in per_block:
            add(name, block, "frobenius", *_delta(mean, cov, frob))
            add(name, block, "cosine", *_delta(mean, cov, cosine))
    return rows


class _Run:
    """State of one report: results so far, failures, and the files written as they are ready."""

    def __init__(self, out_dir: Path, progress: bool, device: torch.device):
        from tqdm.auto import tqdm

        self.out_dir, self.progress = out_dir, progress
        self.clock = Clock(device)
        self.started = time.perf_counter()
        self.results: dict = {"failures": []}
        self.figures: dict = {}
        self._tqdm = tqdm

    def bar(self, iterable, desc):
        return self._tqdm(
            iterable, desc=desc, leave=False, disable=not self.progress, file=sys.stderr
        )

    def fail(self, phase: str, e: BaseException) -> None:
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        self.results["failures"].append({"phase": phase, "error": _message(e), "where": where})
        self.save()

    @contextmanager
    def phase(self, name: str):
        """Time ``name``; an exception is recorded as a failure of the phase, not raised."""
        try:
            with self.clock(name):
                yield
        except Exception as e:  # noqa: BLE001 - every failure is recorded on the page
            self.fail(name, e)
        else:
            self.save()

    def save(self) -> None:
        """Rewrite ``results.json`` with everything computed so far."""
        self.results["timings_s"] = {
            **self.clock.phases, "total": time.perf_counter() - self.started
        }  # fmt: skip
        text = json.dumps(_jsonable(self.results), indent=1) + "\n"
        tmp = self.out_dir / "results.json.tmp"
        tmp.write_text(text)
        tmp.replace(self.out_dir / "results.json")


# -- the phases ---------------------------------------------------------------------------
def _build_operators(run, names, model, loss_func, data, seed, dense_mode):
    """Build each operator (and, in the dense regime, its matrix); failures become rows.

    Returns ``(ops, dense, roots, rows)``; ``roots``: name -> thin ``R`` with
    ``dense[name] = R Rᵀ`` where the matrix came in that form.
    """
    builders = _builders(seed)
    ops, dense, roots, rows = {}, {}, {}, []
    jacobians: dict = {}  # one per-example Jacobian for the GGN, Fisher and empirical Fisher
    for name in run.bar(names, desc="operators"):
        build, description = builders[name]
        row = {"name": name, "description": description, "status": "ok", "notes": ""}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                op = build(model, loss_func, data)
                row["build_s"] = time.perf_counter() - start
                if dense_mode:
                    start = time.perf_counter()
                    dense[name], row["dense_method"], root = _dense_matrix(op, jacobians)
                    if root is not None:
                        roots[name] = root
                    row["dense_s"] = time.perf_counter() - start
            ops[name] = op
            row["matvecs"] = op.matvecs
            notes = {
                str(w.message)
                for w in caught
                if "curvkit" in str(w.filename)
                and not issubclass(w.category, (DeprecationWarning, FutureWarning))
            }
            row["notes"] = " ".join(sorted(notes))
        except _UNAVAILABLE as e:
            row["status"] = f"not available: {_message(e)}"
            dense.pop(name, None)
            roots.pop(name, None)
        except Exception as e:  # noqa: BLE001 - recorded, the report goes on
            row["status"] = f"failed: {_message(e)}"
            dense.pop(name, None)
            roots.pop(name, None)
            run.fail(f"operator {name}", e)
        rows.append(row)
        run.results["operators"] = rows
    return ops, dense, roots, rows


#: Largest ``D`` at which the dense comparison uses full eigendecompositions of every matrix.
_EIGH_ALL = 600


def _block_diagonal(M: torch.Tensor, slices) -> bool:
    """Whether every entry outside the diagonal blocks ``slices`` is exactly zero.

    Row block by row block, on views (a boolean mask of ``M`` copied the matrix).
    """
    if len(slices) < 2:
        return False
    return not any(bool(M[s, : s.start].any() or M[s, s.stop :].any()) for _, s in slices)


def _top_and_solve(M, slices, k, g, lambdas, seed, tri=None):
    """Top-``k`` eigenvectors of ``M`` and ``(M + λI)^{-1} g`` for every λ.

    From ``tri`` where given (a :class:`_Tridiagonal` or :class:`_LowRank`
    already computed); else exact eigendecompositions for small ``M``; on the
    CPU otherwise one Householder reduction ``M = Q T Q^T`` (block by block for
    a block-diagonal ``M``) for the exact top eigenvectors and the solves;
    elsewhere per-block eigendecompositions of a block-diagonal ``M``, else
    Lanczos on the dense matrix (residual-checked) and one linear solve per λ.
    """
    import curvkit as ck

    D = M.shape[0]
    if tri is not None or (D > _EIGH_ALL and M.device.type == "cpu"):
        if tri is None:
            tri = _Tridiagonal(M, [s for _, s in slices] if _block_diagonal(M, slices) else None)
        return tri.top(k)[1], tri.solve(g, lambdas.tolist()), "dense"
    if D <= _EIGH_ALL or _block_diagonal(M, slices):
        parts = [slice(0, D)] if D <= _EIGH_ALL else [s for _, s in slices]
        d = M.new_zeros(D, len(lambdas))
        pairs = []
        for s in parts:
            v, U = torch.linalg.eigh(M[s, s])
            d[s] = U @ ((U.T @ g[s])[:, None] / (v[:, None] + lambdas[None, :]))
            pairs.append((s, v, U))
        values = torch.cat([v for _, v, _ in pairs])
        owner = [(s, U, i) for s, v, U in pairs for i in range(v.numel())]
        V = M.new_zeros(D, k)
        for col, idx in enumerate(torch.argsort(values, descending=True)[:k].tolist()):
            s, U, i = owner[idx]
            V[s, col] = U[:, i]
        return V, d, "dense"
    op = ck.DenseOperator(M)
    _, V, _ = ck.eigenvectors(op, k=k, method="lanczos", tol=1e-10, seed=seed)
    eye = torch.eye(D, dtype=M.dtype, device=M.device)
    d = torch.stack([torch.linalg.solve(M + float(lam) * eye, g) for lam in lambdas], dim=1)
    return V, d, "lanczos"


def _compare_dense(dense, ref_op, g, grid, k, seed, tridiagonal=None):
    r"""Every dense matrix against the GGN: the rows of :func:`curvkit.compare`, cheaply.

    The metrics and formulas of :func:`curvkit.diagnostics.metrics.compare`
    (whole matrix: ``frobenius``, ``cosine``, ``spectral``, ``overlap``,
    ``directional``, ``precond_cosine``, ``precond_reduction``; per layer block:
    ``frobenius`` and ``cosine``), exact except where ``D > 600`` and the matrix
    is not block-diagonal: there :math:`\|A - G\|_2` comes from Lanczos on the
    dense matrix (tolerance ``1e-10``, ``method="lanczos"``), and the top-``k``
    eigenvectors and damped solves from one Householder reduction per matrix
    (:class:`_Tridiagonal`, per block where the matrix is block-diagonal; reused
    from ``tridiagonal``, name -> reduction, where the spectra made one) instead
    of ``D^3`` eigendecompositions of every matrix.
    Off the CPU, Lanczos gives the eigenvectors and dense solves the steps.
    """
    import pandas as pd

    import curvkit as ck
    from curvkit.diagnostics.metrics import COLUMNS

    B = dense[REFERENCE]
    D = B.shape[0]
    slices = ref_op.block_slices()
    k = min(k, D)
    tri = {} if tridiagonal is None else tridiagonal
    lambdas = torch.as_tensor(grid, dtype=B.dtype)
    g = g.to(B)
    if D > _EIGH_ALL and B.device.type == "cpu":
        if REFERENCE not in tri:
            tri[REFERENCE] = _Tridiagonal(B)
        norm_B = float(tri[REFERENCE].eigenvalues().abs().max())
        VB = tri[REFERENCE].top(k)[1]
        dB = tri[REFERENCE].solve(g, lambdas.tolist())
    else:
        lamB, UB = torch.linalg.eigh(B)
        VB = UB[:, torch.argsort(lamB, descending=True)[:k]]
        norm_B = float(lamB.abs().max())
        dB = UB @ ((UB.T @ g)[:, None] / (lamB[:, None] + lambdas[None, :]))
    BVB = (VB * (B @ VB)).sum(0)
    rows = []

    def add(name, block, metric, value, method="dense", **extra):
        rows.append({"approx": name, "reference": REFERENCE, "block": block, "metric": metric,
                     "value": float(value), "stderr": 0.0, "method": method, **extra})  # fmt: skip

    for name, A in dense.items():
        if name == REFERENCE:
            continue
        nB = torch.linalg.matrix_norm(B)
        add(name, "all", "frobenius", torch.linalg.matrix_norm(A - B) / nB)
        add(name, "all", "cosine", (A * B).sum() / (torch.linalg.matrix_norm(A) * nB))
        if D <= _EIGH_ALL:
            spectral, how = float(torch.linalg.eigvalsh(A - B).abs().max()), "dense"
        else:
            value = ck.eigenvalues(ck.DenseOperator(A - B), k=1, which="LM", method="lanczos",
                                   tol=1e-10, seed=seed)[0]  # fmt: skip
            spectral, how = float(value.abs()[0]), "lanczos"
        add(name, "all", "spectral", spectral / norm_B, method=how)
        VA, dA, how = _top_and_solve(A, slices, k, g, lambdas, seed, tri.get(name))
        add(name, "all", "overlap", (VA.T @ VB).pow(2).sum() / k, method=how, k=k)
        for i, r in enumerate(((VB * (A @ VB)).sum(0) / BVB).tolist()):
            add(name, "all", "directional", r, k=k, direction=f"eigvec_{i + 1}")
        add(name, "all", "directional", (g @ A @ g) / (g @ B @ g), direction="gradient")
        cos = (dA * dB).sum(0) / (dA.norm(dim=0) * dB.norm(dim=0))
        quad_A = -(g @ dA) + 0.5 * (dA * (B @ dA + lambdas * dA)).sum(0)
        quad_opt = -0.5 * (g @ dB)
        for lam, c, r in zip(lambdas.tolist(), cos.tolist(), (quad_A / quad_opt).tolist()):
            add(name, "all", "precond_cosine", c, damping=lam)
            add(name, "all", "precond_reduction", r, damping=lam)
        if len(slices) > 1:
            for block, s in slices:
                Ab, Bb = A[s, s], B[s, s]
                nb = torch.linalg.matrix_norm(Bb)
                add(name, block, "frobenius", torch.linalg.matrix_norm(Ab - Bb) / nb)
                add(name, block, "cosine", (Ab * Bb).sum() / (torch.linalg.matrix_norm(Ab) * nb))
    return pd.DataFrame(rows, columns=COLUMNS) if rows else None


def _same(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether two matrices are equal entry for entry (diagonals first, the cheap test)."""
    return torch.equal(A.diagonal(), B.diagonal()) and torch.equal(A, B)


def _spectra_dense(run, dense, ref_op, seed, k, tridiagonal=None):
    """Dense eigenvalues, Lanczos checked against them, SLQ densities, a summary per matrix.

    ``tridiagonal``: name -> factorisation, used where given (a
    :class:`_LowRank`); it receives the Householder reduction
    (:class:`_Tridiagonal`, block by block for a block-diagonal matrix) of every
    other matrix on the CPU, for the comparison.
    """
    import curvkit as ck

    slices = ref_op.block_slices()
    tri = {} if tridiagonal is None else tridiagonal
    eigs, summary, lanczos, densities, top = {}, [], [], {}, {}
    for name, M in run.bar(dense.items(), desc="eigenvalues"):
        same = next((n for n in eigs if _same(dense[n], M)), None)
        if same is not None:  # e.g. block-tri-diagonal K-FAC without off-diagonal blocks
            if same in tri:
                tri[name] = tri[same]
            lam = eigs[same]
        elif name in tri:
            lam = tri[name].eigenvalues()
        elif M.device.type == "cpu":
            blocks = [s for _, s in slices] if _block_diagonal(M, slices) else None
            tri[name] = _Tridiagonal(M, blocks)
            lam = tri[name].eigenvalues()
        else:
            lam = _eigvalsh(M, slices)
        eigs[name] = lam
        top_value = float(lam.max())
        summary.append(
            {
                "name": name, "lambda_max": top_value, "lambda_min": float(lam.min()),
                "trace": float(lam.sum()),
                "negative": int((lam < -1e-10 * max(abs(top_value), 1e-300)).sum()),
                "effective_rank": _effective_rank(lam), "method": "dense",
            }
        )  # fmt: skip
    D = ref_op.dim
    k_lanczos = min(k, max(1, (D - 2) // 3))
    for name in run.bar([n for n in ("Hessian", REFERENCE, "EF") if n in dense], desc="lanczos"):
        op = _dense_op(dense[name], ref_op, tri.get(name))
        vals, vecs, info = ck.eigenvectors(op, k=k_lanczos, method="lanczos", seed=seed)
        top[name] = (vals, vecs)
        exact = torch.sort(eigs[name], descending=True).values[:k_lanczos]
        for i, (v, r, e) in enumerate(zip(vals.tolist(), info.residuals.tolist(), exact.tolist())):
            lanczos.append(
                {
                    "name": name, "index": i + 1, "lanczos": v, "dense": e,
                    "abs_diff": abs(v - e), "residual": r, "matvecs": info.matvecs,
                    "restarts": info.restarts, "converged": bool(info.converged),
                }
            )  # fmt: skip
    names = (REFERENCE, "Fisher (MC)", "EF", "KFLR", "tri-diag KFLR", "Hessian")
    for name in run.bar([n for n in names if n in dense], desc="densities"):
        log = name != "Hessian"
        if log and float(eigs[name].max()) <= 0:
            continue
        same = next((n for n in densities if _same(dense[n], dense[name])), None)
        if same is not None and densities[same].log == log:  # the same matrix, seed and probes
            densities[name] = densities[same]
            continue
        if dense[name].device.type == "cpu" or name in tri:
            if name not in tri:
                tri[name] = _Tridiagonal(dense[name])
            densities[name] = _tridiagonal_density(tri[name], ref_op, log, seed)
            continue
        densities[name] = ck.spectral_density(
            _dense_op(dense[name], ref_op), num_probes=10, lanczos_steps=min(80, D), log=log,
            seed=seed,
        )  # fmt: skip
    return eigs, summary, lanczos, densities, top


def _spectra_matrix_free(run, ops, seed, k, probes, steps):
    """Top-``k`` Lanczos eigenpairs of every operator, SLQ densities of the exact matrices."""
    import curvkit as ck

    eigs, summary, lanczos, densities, top = {}, [], [], {}, {}
    for name, op in run.bar(list(ops.items()), desc="lanczos"):
        try:
            vals, vecs, info = ck.eigenvectors(op, k=k, method="lanczos", seed=seed)
        except Exception as e:  # noqa: BLE001
            run.fail(f"spectra {name}", e)
            continue
        top[name], eigs[name] = (vals, vecs), vals
        summary.append({"name": name, "lambda_max": float(vals[0]), "method": "lanczos"})
        for i, (v, r) in enumerate(zip(vals.tolist(), info.residuals.tolist())):
            lanczos.append(
                {
                    "name": name, "index": i + 1, "lanczos": v, "residual": r,
                    "matvecs": info.matvecs, "restarts": info.restarts,
                    "converged": bool(info.converged),
                }
            )  # fmt: skip
    for name in run.bar([n for n in (REFERENCE, "Hessian") if n in top], desc="densities"):
        log = name != "Hessian"
        if log and float(top[name][0][0]) <= 0:
            continue
        try:
            densities[name] = ck.spectral_density(
                ops[name], num_probes=probes, lanczos_steps=min(steps, ops[name].dim), log=log,
                seed=seed,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            run.fail(f"density {name}", e)
    return eigs, summary, lanczos, densities, top


def _traces(run, ops, dense, ref_op, seed, budget, factors=None):
    """Trace estimates with standard errors (against the exact trace in the dense regime).

    ``factors``: name -> :class:`_LowRank` of a dense matrix, whose products go through it.
    """
    import curvkit as ck

    factors = factors or {}
    rows, errors = [], []
    for name in run.bar([n for n in EXACT if n in ops], desc="traces"):
        op = _dense_op(dense[name], ref_op, factors.get(name)) if name in dense else ops[name]
        exact = float(torch.trace(dense[name])) if name in dense else None
        for method in ("hutchinson", "hutch++") + (("xtrace",) if name in dense else ()):
            try:
                est = ck.trace(op, method=method, num_matvecs=budget, seed=seed)
            except _UNAVAILABLE as e:
                rows.append({"name": name, "method": method, "exact": exact, "note": _message(e)})
                continue
            row = {"name": name, "method": method, "estimate": est.value, "stderr": est.stderr,
                   "exact": exact, "matvecs": est.matvecs}  # fmt: skip
            if exact is not None:
                tiny = 1e-10 * max(abs(exact), 1e-300)
                row["z"] = (est.value - exact) / est.stderr if est.stderr > tiny else None
            rows.append(row)
    if REFERENCE in dense:
        op = _dense_op(dense[REFERENCE], ref_op, factors.get(REFERENCE))
        exact = float(torch.trace(dense[REFERENCE]))
        for method in ("hutchinson", "hutch++", "xtrace"):
            for n in (8, 16, 32, 64, 128):
                for s in range(5):
                    try:
                        est = ck.trace(op, method=method, num_matvecs=n, seed=seed + s)
                    except ShapeError:  # xtrace needs n / 2 < D
                        break
                    err = abs(est.value - exact) / abs(exact) if exact else abs(est.value)
                    errors.append({"method": method, "matvecs": n, "seed": seed + s, "error": err})
    return rows, errors


def _directions(top, lam_max, dim, g, seed):
    """Top-3 Hessian (else GGN) eigenvectors (Lanczos), the gradient and three random directions."""
    source = "Hessian" if "Hessian" in top else REFERENCE
    short = "H" if source == "Hessian" else source
    vecs = top[source][1] if source in top else None
    dirs = (
        {}
        if vecs is None
        else {f"{short} eigvec {i + 1}": vecs[:, i] for i in range(min(3, vecs.shape[1]))}
    )
    if g is not None:
        dirs["gradient"] = g
    gen = torch.Generator().manual_seed(seed)
    for i in range(3):
        dirs[f"random {i + 1}"] = torch.randn(dim, generator=gen, dtype=torch.float64)
    lam = lam_max.get(source)
    span = 2.0 / math.sqrt(lam) if lam is not None and lam > 0 else 1.0
    return dirs, span


def _damped_inverses(G: torch.Tensor, ops: dict, damping: float) -> dict:
    """``(GGN + λI)⁻¹`` and the damped inverses of KFLR (factored, M&G §6.3) and tri-diag KFLR."""
    from curvkit.app.report_html import EXACT_INVERSE

    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    out = {
        EXACT_INVERSE: torch.cholesky_inverse(torch.linalg.cholesky((G + G.T) / 2 + damping * eye))
    }
    for name, label, kwargs in (
        ("KFLR", "KFLR inverse", {"damping_mode": "factored"}),
        ("tri-diag KFLR", "tri-diag KFLR inverse", {}),
    ):
        if name in ops:
            try:
                out[label] = ops[name].inverse(damping=damping, **kwargs).to_dense().to(G)
            except (NotImplementedError, CurvkitError):
                pass
    return out


def _memory(model):
    import curvkit as ck

    df = ck.memory_report(model, dtype=torch.float32)
    wide = df.pivot(index="layer", columns="structure", values="bytes")
    order = list(dict.fromkeys(df["layer"]))
    return df, wide.reindex(order)[list(dict.fromkeys(df["structure"]))]


def _module_types(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


# -- the job --------------------------------------------------------------------------------
def _analyse(run, *, name, description, model, loss_func, X_all, y_all, n_samples, seed,
             train_steps, max_dense, names, command, dtype, figures=True):  # fmt: skip
    """Every phase of the report on a validated problem; writes the files and returns the page."""
    import curvkit as ck
    from curvkit.app import report_html as _html
    from curvkit.operators.exact import loss_and_gradient

    results = run.results
    data = (X_all[:n_samples], y_all[:n_samples])
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense_mode = D <= max_dense
    types = _module_types(model)
    results["problem"] = {
        "name": name, "description": description, "num_params": D,
        "n_samples": int(data[0].shape[0]), "loss_func": type(loss_func).__name__,
        "train_steps": train_steps, "model_type": type(model).__name__,
    }  # fmt: skip
    k = min(10, D) if dense_mode else min(5, max(1, (D - 2) // 3))
    results["settings"] = {
        "seed": seed, "device": str(next(model.parameters()).device), "dtype": dtype,
        "k": k, "reference": REFERENCE, "max_dense": max_dense,
        "mode": "dense" if dense_mode else "matrix-free", "operators": names,
        "model_mode": "eval",
    }  # fmt: skip
    results["command"] = command
    results["versions"] = _versions()
    run.save()
    state = {"model": model, "loss_func": loss_func, "data": data, "dense_mode": dense_mode}

    with run.phase("train"):
        tracker = None
        if train_steps > 0:
            tracker = ck.CurvatureTracker(
                model, loss_func, every=max(1, math.ceil(train_steps / 2)), k=3,
                quantities=("top_eigenvalues", "trace"), trace_method="hutch++",
                num_matvecs=18, seed=seed,
            )  # fmt: skip
            tracker.report_batch = (data[0][:32], data[1][:32])
        losses = _train(
            model, loss_func, X_all, y_all, train_steps, seed, _SafeTracker(run, tracker)
        )
        results["problem"]["train_loss_first"] = losses[0] if losses else None
        results["problem"]["train_loss_last"] = losses[-1] if losses else None
        if tracker is not None and tracker.records:
            results["tracking"] = tracker.records
    model.eval()  # the analysis uses running statistics (BatchNorm) and no dropout
    ops, dense, roots, ref_op, g = {}, {}, {}, None, None
    with run.phase("operators"):
        ops, dense, roots, _ = _build_operators(
            run, names, model, loss_func, data, seed, dense_mode
        )
        ref_op = ops.get(REFERENCE)
        blocks_of = ref_op or next(iter(ops.values()), None)
        if blocks_of is not None:
            results["problem"]["blocks"] = [
                {"name": b, "type": types.get(b, "?"), "size": s}
                for b, s in zip(blocks_of.block_names, blocks_of.block_sizes)
            ]
        loss, g = loss_and_gradient(model, loss_func, data)
        g = g.to(torch.float64)
        results["problem"]["loss"] = float(loss)
        results["problem"]["gradient_norm"] = float(g.norm())
    state.update(ops=ops, dense=dense, ref_op=ref_op, g=g)
    eigs, top, lam_max = {}, {}, {}
    # factorisations of the dense matrices (thin square roots, Householder reductions),
    # spectra -> compare -> traces
    tridiagonal: dict = _low_rank(roots, dense, k) if dense_mode else {}
    with run.phase("spectra"):
        if dense_mode:
            if dense:
                eigs, summary, lanczos, densities, top = _spectra_dense(
                    run, dense, ref_op, seed, k, tridiagonal
                )
            else:
                summary, lanczos, densities = [], [], {}
        else:
            eigs, summary, lanczos, densities, top = _spectra_matrix_free(
                run, ops, seed, k, probes=3, steps=20
            )
        lam_max = {r["name"]: r["lambda_max"] for r in summary}
        results["spectra"], results["lanczos"] = summary, lanczos
        if dense_mode:
            results["eigenvalues"] = {n: v for n, v in eigs.items()}
        else:
            results["top_eigenvalues"] = {n: v for n, v in eigs.items()}
        results["densities"] = {
            n: {"grid": sd.grid, "density": sd.density, "log": sd.log, "matvecs": sd.matvecs,
                "mass_below_cutoff": sd.mass_below_cutoff}
            for n, sd in densities.items()
        }  # fmt: skip
        state.update(eigs=eigs, densities=densities, top=top)
    grid = None
    with run.phase("compare"):
        if ref_op is None:
            raise CurvkitError(f"the reference {REFERENCE} is not available: nothing to compare.")
        if dense_mode:
            lam = max(lam_max.get(REFERENCE, 0.0), 1e-12)
            grid = [lam * 10.0**e for e in (-5, -4, -3, -2, -1, 0)]
            results["settings"]["damping_grid"] = grid
            table = _compare_dense(dense, ref_op, g, grid, k, seed, tridiagonal)
        else:
            import pandas as pd

            from curvkit.diagnostics.metrics import COLUMNS

            others = {n: op for n, op in ops.items() if n != REFERENCE}
            probes = max(2, 32 // len(ref_op.block_sizes))
            results["settings"]["probes_per_block"] = probes
            rows = compare_matrix_free(others, ref_op, top, g, probes, seed=seed, bar=run.bar)
            table = pd.DataFrame(rows, columns=COLUMNS)
        if table is not None:
            table.to_csv(run.out_dir / "metrics.csv", index=False)
            results["comparison"] = table.to_dict(orient="records")
            state["table"] = table
    with run.phase("traces"):
        budget = 99 if dense_mode else 18
        results["traces"], results["trace_estimator_error"] = _traces(
            run, ops, dense, ref_op, seed, budget, tridiagonal
        )
        state["error_rows"] = results["trace_estimator_error"]
    with run.phase("landscape"):
        from curvkit.diagnostics.landscape import loss_along_directions

        dim = ref_op.dim if ref_op is not None else D
        state["directions"], state["span"] = _directions(top, lam_max, dim, g, seed)
        alphas = torch.linspace(-state["span"], state["span"], 41, dtype=torch.float64)
        state["landscape"] = loss_along_directions(
            model, loss_func, data, state["directions"], alphas
        )
        results["loss_landscape"] = state["landscape"].to_dict(orient="records")
    lam = lam_max.get(REFERENCE)
    state["damping"] = 1e-3 * lam if lam and lam > 0 else 1e-3
    results["settings"]["damping_inverse"] = state["damping"]
    if dense_mode and REFERENCE in dense:
        with run.phase("inverses"):
            state["inverses"] = _damped_inverses(dense[REFERENCE], ops, state["damping"])
    memory_wide = None
    with run.phase("memory"):
        memory_long, memory_wide = _memory(model)
        results["memory"] = memory_long.to_dict(orient="records")
    with run.phase("figures"):
        labels = {b["name"]: _html.layer_label(b) for b in results["problem"].get("blocks", [])}
        state["labels"] = labels
        if figures:
            _html.make_figures(run, run.out_dir / "figures", state)
    for row in results.get("operators", []):  # products of the whole report, per operator
        if row["name"] in ops:
            row["matvecs"] = ops[row["name"]].matvecs
    with run.clock("write"):
        page = run.out_dir / "index.html"
        try:
            text = _html.render(run.results, run.figures, memory_wide)
        except Exception as e:  # noqa: BLE001 - the page must exist, even a plain one
            run.fail("page", e)
            text = _html.fallback(run.results)
        page.write_text(text, encoding="utf-8")
    run.save()
    return page


class _SafeTracker:
    """Forwards to a tracker; its first failure is recorded and tracking stops."""

    def __init__(self, run, tracker):
        self.run, self.tracker = run, tracker
        self.report_batch = getattr(tracker, "report_batch", None)

    def __bool__(self):
        return self.tracker is not None

    def _call(self, method, *args):
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as e:  # noqa: BLE001
            self.run.fail("tracking", e)
            self.tracker = None

    def maybe_record(self, *args):
        self._call("maybe_record", *args)

    def record(self, *args):
        self._call("record", *args)


def _check_common(n_samples, seed, train_steps, max_dense, dtype=None):
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"report: dtype={dtype!r} is not one of {tuple(_DTYPES)}.")
    for label, value, low in (("n_samples", n_samples, 2), ("train_steps", train_steps, 0),
                              ("max_dense", max_dense, 0)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):  # fmt: skip
            raise ConfigError(f"report: {label} must be an int >= {low}, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"report: seed must be an int, got {seed!r}.")


def build_report(
    problem: str = DEFAULT_PROBLEM,
    out_dir: str | Path = "curvkit-report",
    model_path: str | None = None,
    n_samples: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    train_steps: int = 100,
    dtype: str = "float64",
    max_dense: int = MAX_DENSE,
    operators=None,
    figures: bool = True,
) -> Path:
    r"""Compute every comparison on a built-in problem or a model file; write the report.

    Args:
        problem: A built-in problem (:func:`curvkit.problems.list_problems`) or
            ``"digits_mlp_small"`` (:func:`digits_mlp_small`, the default).
        out_dir: Output folder (created; checked writable before any computation).
        model_path: ``"path/to/file.py:function"``; the function takes no
            argument and returns ``(model, loss_func, (X, y))``. Replaces ``problem``.
        n_samples: Examples of the training data the curvature is computed on.
        seed: Seed of the model, Monte Carlo samples, probes and directions.
        device: Device of every computation.
        progress: Show tqdm progress bars on stderr.
        train_steps: Seeded Adam steps (learning rate ``1e-2``, batches of 64)
            on the training data before the analysis, with the GGN's top
            eigenvalues and trace tracked (:class:`~curvkit.CurvatureTracker`);
            0 analyses the model as built.
        dtype: ``"float64"`` (default) or ``"float32"``.
        max_dense: Largest number of parameters ``D`` with dense ``D x D``
            matrices; above it the report is matrix-free.
        operators: Operators to compute (see :func:`parse_operators`); default all.
        figures: Draw the figures (PNG and PDF); ``False`` writes tables only.

    Returns:
        The path of ``index.html``.

    Raises:
        ConfigError: For an unknown problem or operator, a bad ``model_path``,
            ``n_samples < 2``, a negative ``max_dense`` or ``train_steps``, or an
            unwritable ``out_dir``. Failures after the setup are recorded in
            the report, not raised.
    """
    import curvkit as ck

    started = time.perf_counter()
    _check_common(n_samples, seed, train_steps, max_dense, dtype)
    names = parse_operators(operators)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"report: device={device!r} is not a device: {e}") from None
    out_dir = Path(out_dir)
    if model_path is not None and not Path(model_path.rpartition(":")[0]).is_file():
        _load_model(model_path)  # raises the ShapeError naming the problem
    _check_out(out_dir)
    if model_path is not None:
        name, description, model, loss_func, X_all, y_all = _load_model(model_path)
    else:
        kwargs = {"seed": seed, "dtype": _DTYPES[dtype], "device": device}
        if problem == DEFAULT_PROBLEM:
            prob = digits_mlp_small(**kwargs)
        else:
            prob = ck.problems.get_problem(problem, **kwargs)
        name, description = prob.name, prob.description
        model, loss_func = prob.model, prob.loss_func
        X_all, y_all = prob.train
    model, X_all, y_all = _to(model, X_all, y_all, device, _DTYPES[dtype])
    args = ["curvkit", "report"]
    args += ["--model", model_path] if model_path else ["--problem", problem]
    args += ["--out", str(out_dir), "--device", str(device), "--seed", str(seed)]
    args += ["--n-samples", str(n_samples), "--train-steps", str(train_steps), "--dtype", dtype]
    args += ["--max-dense", str(max_dense)]
    if not figures:
        args += ["--no-figures"]
    if operators is not None:
        args += ["--operators", ",".join(k for k, v in OPERATORS.items() if v in names)]
    run = _Run(out_dir, progress, device)
    run.clock.phases["setup"] = time.perf_counter() - started
    return _analyse(
        run, name=name, description=description, model=model, loss_func=loss_func,
        X_all=X_all, y_all=y_all, n_samples=n_samples, seed=seed, train_steps=train_steps,
        max_dense=max_dense, names=names, command=shlex.join(args), dtype=dtype, figures=figures,
    )  # fmt: skip


def report(
    model: nn.Module,
    loss_func,
    data,
    out: str | Path = "curvkit-report",
    max_dense: int = MAX_DENSE,
    operators=None,
    n_samples: int | None = None,
    train_steps: int = 0,
    seed: int = 0,
    name: str | None = None,
    progress: bool = False,
    figures: bool = True,
) -> Path:
    r"""The ``curvkit report`` page for a model, a loss and data, in one call.

    The model is analysed where it lives (device and dtype unchanged), in
    evaluation mode (it is left there). ``D <= max_dense`` gives dense matrices
    and exact comparisons, a larger ``D`` the matrix-free report (see
    :mod:`curvkit.app.report`).

    Args:
        model: The network.
        loss_func: Its loss, e.g. ``torch.nn.CrossEntropyLoss()`` (``reduction``
            ``"mean"`` or ``"sum"``).
        data: ``(X, y)`` tensors; the curvature uses the first ``n_samples`` examples.
        out: Output folder (created; checked writable before any computation).
        max_dense: Largest ``D`` with dense ``D x D`` matrices.
        operators: Operators to compute (see :func:`parse_operators`); default all.
        n_samples: Examples of the curvature (default: all of ``data``).
        train_steps: Seeded Adam steps on ``data`` before the analysis (default 0:
            the model as it is); when positive the GGN's top eigenvalues and trace
            are tracked over them.
        seed: Seed of Monte Carlo samples, probes and directions.
        name: Title of the report (default: the model's class name).
        progress: Show progress bars on stderr.
        figures: Draw the figures (PNG and PDF); ``False`` writes tables only.

    Returns:
        The path of ``index.html`` (``results.json``, ``metrics.csv`` and
        ``figures/`` beside it).

    Raises:
        ShapeError: For a bad argument, an unknown operator or an unwritable
            ``out``, before any computation.

    Example:
        >>> import json, tempfile, torch, curvkit as ck
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
        ...                             torch.nn.Linear(3, 2)).double()
        >>> X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> page = ck.report(model, torch.nn.CrossEntropyLoss(), (X, y), out=tempfile.mkdtemp(),
        ...                  operators="kflr,hessian", figures=False)
        >>> results = json.loads((page.parent / "results.json").read_text())
        >>> page.name, results["settings"]["mode"], results["failures"]
        ('index.html', 'dense', [])
        >>> [r["name"] for r in results["operators"]]
        ['GGN', 'Hessian', 'KFLR']
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"report: model must be an nn.Module, got {type(model).__name__}.")
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):  # fmt: skip
        raise ConfigError("report: data must be a pair (X, y) of tensors.")
    X, y = data
    if X.shape[0] != y.shape[0]:
        raise ShapeError(f"report: X has {X.shape[0]} examples, y {y.shape[0]}.")
    n = X.shape[0] if n_samples is None else n_samples
    _check_common(n, seed, train_steps, max_dense)
    names = parse_operators(operators)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("report: the model has no trainable parameter.")
    out = Path(out)
    _check_out(out)
    dtype = str(params[0].dtype).removeprefix("torch.")
    title = type(model).__name__ if name is None else str(name)
    command = (
        f"curvkit.report(model, {type(loss_func).__name__}(), data, out={str(out)!r}, "
        f"max_dense={max_dense}, operators={operators!r}, n_samples={n}, "
        f"train_steps={train_steps}, seed={seed})"
    )
    run = _Run(out, progress, params[0].device)
    return _analyse(
        run, name=title, description=f"{type(model).__name__} (Python API)", model=model,
        loss_func=loss_func, X_all=X, y_all=y, n_samples=n, seed=seed, train_steps=train_steps,
        max_dense=max_dense, names=names, command=command, dtype=dtype, figures=figures,
    )  # fmt: skip


def _jsonable(value):
    """Plain JSON values: tensors and arrays to lists, non-finite floats to ``null``."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:  # pandas missing values
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


# -- command line -------------------------------------------------------------------------
HELP = "compare every curvature approximation on one problem and write an HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``curvkit report`` options to ``parser``."""
    parser.add_argument(
        "--problem", default=DEFAULT_PROBLEM,
        help=f"built-in problem or {DEFAULT_PROBLEM} (default; D=1066)",
    )  # fmt: skip
    parser.add_argument("--model", metavar="FILE.py:FN", help="FN() returns (model, loss, (X, y))")
    parser.add_argument("--out", type=Path, default=Path("curvkit-report"), help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0, help="model, sampling and probe seed")
    parser.add_argument("--n-samples", type=int, default=256, help="examples of the curvature")
    parser.add_argument(
        "--train-steps", type=int, default=100, help="Adam steps before the analysis (0: none)"
    )
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float64")
    parser.add_argument(
        "--max-dense", type=int, default=MAX_DENSE, metavar="D",
        help=f"largest parameter count with dense D x D matrices; above: matrix-free "
        f"(default {MAX_DENSE})",
    )  # fmt: skip
    parser.add_argument(
        "--operators", metavar="NAME,...",
        help=f"operators to compute, from: {','.join(OPERATORS)} (default: all; ggn always)",
    )  # fmt: skip
    parser.add_argument("--no-figures", action="store_true", help="tables only, no figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``curvkit report`` with parsed arguments; prints the page's path.

    Returns:
        0 on success, 1 when a curvkit error stops the report (message on stderr).
    """
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print("curvkit report: error: CUDA is not available on this machine.", file=sys.stderr)
        return 1
    try:
        page = build_report(
            problem=args.problem, out_dir=args.out, model_path=args.model,
            n_samples=args.n_samples, seed=args.seed, device=args.device,
            progress=not args.quiet, train_steps=args.train_steps, dtype=args.dtype,
            max_dense=args.max_dense, operators=args.operators, figures=not args.no_figures,
        )  # fmt: skip
    except CurvkitError as e:
        print(f"curvkit report: error: {e}", file=sys.stderr)
        return 1
    print(page)
    return 0
