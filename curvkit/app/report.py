r"""The ``curvkit report`` job: every comparison of one problem on one self-contained page.

:func:`build_report` computes, on a small subset of a problem's training data,
the exact Hessian, GGN, Monte Carlo Fisher and empirical Fisher as dense
matrices beside K-FAC (Monte Carlo), KFLR, KFRA, EKFAC, the diagonal GGN and
tri-diagonal KFLR; compares every one with the GGN
(:func:`curvkit.diagnostics.metrics.compare`); computes spectra (dense, Lanczos, stochastic
Lanczos quadrature), trace estimates with standard errors, the storage of each
representation and the loss along top eigenvectors against random directions;
and writes ``DIR/index.html`` (figures embedded, tables, command line, versions,
timings), ``DIR/metrics.csv`` (the comparison table), ``DIR/results.json``
(every number) and ``DIR/figures/*.png``.

An approximation that the model does not support (a curvkit error, e.g. KFRA
on a CNN) is listed as "not available" with the reason; the report goes on.

Example:
    .. code-block:: console

        $ curvkit report --out report/              # default problem: ~25 s of CPU time
        $ curvkit report --problem tiny_cnn --out r/ --quiet
        $ curvkit report --model my_model.py:build --out r/

    ``my_model.py:build`` names a function returning ``(model, loss_func, (X, y))``.
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
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from curvkit.errors import CurvkitError, ShapeError

__all__ = [
    "DEFAULT_PROBLEM", "add_arguments", "add_parser", "build_report", "digits_mlp_small", "run",
]  # fmt: skip

#: Problem of ``curvkit report`` without ``--problem``: digits, MLP 64-12-12-10 (1,066 params).
DEFAULT_PROBLEM = "digits_mlp_small"
#: Largest ``D`` the report densifies (every matrix is a dense ``D x D`` one).
MAX_DENSE = 4000
REFERENCE = "GGN"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Errors that mark an approximation "not available" instead of failing the report.
_UNAVAILABLE = (CurvkitError, NotImplementedError, ImportError)


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


def _load_model(spec: str, device, dtype):
    """``(name, description, model, loss_func, (X, y))`` from ``"path.py:function"``."""
    path, sep, fn = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not fn.isidentifier():
        raise ShapeError(f"--model {spec!r}: expected 'path/to/file.py:function'.")
    if not Path(path).is_file():
        raise ShapeError(f"--model {spec!r}: no file {path!r}.")
    module_spec = importlib.util.spec_from_file_location(f"_curvkit_model_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, fn, None)):
        raise ShapeError(f"--model {spec!r}: {path} defines no function {fn!r}.")
    out = getattr(module, fn)()
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], nn.Module)):
        raise ShapeError(f"--model {spec!r}: {fn}() must return (model, loss_func, (X, y)).")
    model, loss_func, (X, y) = out
    model = model.to(device=device, dtype=dtype)
    X = X.to(device=device, dtype=dtype if X.is_floating_point() else X.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    return Path(path).name + ":" + fn, f"{type(model).__name__} from {spec}", model, loss_func, X, y


# -- bookkeeping --------------------------------------------------------------------------
class _Clock:
    """Wall-clock seconds per phase (synchronising CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.phases = device, {}

    @contextmanager
    def __call__(self, name: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *_: None)
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


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


def _command(problem, model_path, out_dir, device, seed, n_samples, train_steps, dtype) -> str:
    args = ["curvkit", "report"]
    args += ["--model", model_path] if model_path else ["--problem", problem]
    args += ["--out", str(out_dir), "--device", str(device), "--seed", str(seed)]
    args += ["--n-samples", str(n_samples), "--train-steps", str(train_steps)]
    return shlex.join(args + ["--dtype", dtype])


def _train(model, loss_func, X, y, steps: int, seed: int, batch_size: int = 64) -> list[float]:
    """A short seeded Adam run (lr 1e-2) so the analysis is not at initialisation."""
    if steps <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (min(batch_size, X.shape[0]),), generator=gen)
        idx = idx.to(X.device)
        opt.zero_grad(set_to_none=True)
        loss = loss_func(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.grad = None
    return losses


def _approximations(seed: int) -> dict[str, tuple]:
    """Name -> ``(builder(model, loss_func, data), description)``; the reference first."""
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


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


# -- the computations ---------------------------------------------------------------------
def _build_operators(model, loss_func, data, seed, bar):
    """Build every operator and its dense matrix; failures become 'not available' rows."""
    ops, dense, rows = {}, {}, []
    for name, (build, description) in bar(_approximations(seed).items(), desc="operators"):
        row = {"name": name, "description": description, "status": "ok", "notes": ""}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                op = build(model, loss_func, data)
                row["build_s"] = time.perf_counter() - start
                dense[name] = op.to_dense().to(torch.float64)
                row["dense_s"] = time.perf_counter() - start - row["build_s"]
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
            if name == REFERENCE:
                raise
            row["status"] = f"not available: {_message(e)}"
        rows.append(row)
    return ops, dense, rows


def _dense_op(M, ref):
    from curvkit.operators.base import DenseOperator

    return DenseOperator(
        M, ref.param_shapes, block_sizes=ref.block_sizes, block_names=ref.block_names
    )


def _compare_all(dense, ref_op, g, grid, k, seed, bar):
    import pandas as pd

    from curvkit.diagnostics.metrics import compare

    reference = _dense_op(dense[REFERENCE], ref_op)
    frames = []
    for name in bar([n for n in dense if n != REFERENCE], desc="compare"):
        frames.append(
            compare(
                {name: _dense_op(dense[name], ref_op)},
                reference,
                k=k,
                damping_grid=grid,
                gradient=g,
                exact_threshold=ref_op.dim,
                seed=seed,
                reference_name=REFERENCE,
            )  # fmt: skip
        )
    return pd.concat(frames, ignore_index=True)


def _effective_rank(lam: torch.Tensor) -> float:
    r"""Entropy effective rank :math:`\exp(-\sum_i p_i\log p_i)` (Roy & Vetterli 2007)."""
    p = lam.clamp_min(0)
    p = p / p.sum()
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def _spectra(dense, ref_op, seed, k, bar):
    """Dense eigenvalues, Lanczos check, SLQ densities and a summary per operator."""
    import curvkit as ck

    eigs, summary, lanczos, densities, top_vectors = {}, [], [], {}, {}
    for name, M in bar(dense.items(), desc="eigenvalues"):
        lam = torch.linalg.eigvalsh((M + M.T) / 2)
        eigs[name] = lam
        top = float(lam.max())
        summary.append(
            {
                "name": name, "lambda_max": top, "lambda_min": float(lam.min()),
                "trace": float(lam.sum()),
                "negative": int((lam < -1e-10 * max(abs(top), 1e-300)).sum()),
                "effective_rank": _effective_rank(lam),
            }
        )  # fmt: skip
    D = ref_op.dim
    k_lanczos = min(k, max(1, (D - 2) // 3))
    for name in bar([n for n in ("Hessian", REFERENCE, "EF") if n in dense], desc="lanczos"):
        op = _dense_op(dense[name], ref_op)
        try:
            vals, vecs, info = ck.eigenvectors(op, k=k_lanczos, method="lanczos", seed=seed)
        except _UNAVAILABLE as e:
            lanczos.append({"name": name, "index": None, "note": _message(e)})
            continue
        top_vectors[name] = vecs
        exact = torch.sort(eigs[name], descending=True).values[:k_lanczos]
        for i, (v, r, e) in enumerate(zip(vals.tolist(), info.residuals.tolist(), exact.tolist())):
            lanczos.append(
                {
                    "name": name, "index": i + 1, "lanczos": v, "dense": e,
                    "abs_diff": abs(v - e), "residual": r, "matvecs": info.matvecs,
                    "restarts": info.restarts, "converged": bool(info.converged),
                }
            )  # fmt: skip
    steps = min(80, D)
    names = (REFERENCE, "Fisher (MC)", "EF", "KFLR", "tri-diag KFLR", "Hessian")
    for name in bar([n for n in names if n in dense], desc="densities"):
        op = _dense_op(dense[name], ref_op)
        log = name != "Hessian"
        if log and float(eigs[name].max()) <= 0:
            continue
        densities[name] = ck.spectral_density(
            op, num_probes=10, lanczos_steps=steps, log=log, seed=seed
        )
    return eigs, summary, lanczos, densities, top_vectors


def _traces(dense, ref_op, seed, bar):
    """Trace estimates with standard errors, and the estimator error against the budget."""
    import curvkit as ck

    rows, errors = [], []
    budget = 99
    for name in bar([n for n in ("Hessian", REFERENCE, "Fisher (MC)", "EF") if n in dense],
                    desc="traces"):  # fmt: skip
        op = _dense_op(dense[name], ref_op)
        exact = float(torch.trace(dense[name]))
        for method in ("hutchinson", "hutch++", "xtrace"):
            try:
                est = ck.trace(op, method=method, num_matvecs=budget, seed=seed)
            except _UNAVAILABLE as e:
                rows.append({"name": name, "method": method, "exact": exact, "note": _message(e)})
                continue
            tiny = 1e-10 * max(abs(exact), 1e-300)
            z = (est.value - exact) / est.stderr if est.stderr > tiny else float("nan")
            rows.append(
                {
                    "name": name, "method": method, "estimate": est.value,
                    "stderr": est.stderr, "exact": exact, "z": z, "matvecs": est.matvecs,
                }
            )  # fmt: skip
    op, exact = _dense_op(dense[REFERENCE], ref_op), float(torch.trace(dense[REFERENCE]))
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


def _directions(eigs, top_vectors, ref_op, g, seed):
    """Top-3 Hessian (else GGN) eigenvectors (Lanczos), the gradient and three random directions."""
    source = "Hessian" if "Hessian" in top_vectors else REFERENCE
    short = "H" if source == "Hessian" else source
    vecs = top_vectors.get(source)
    dirs = (
        {}
        if vecs is None
        else {f"{short} eigvec {i + 1}": vecs[:, i] for i in range(min(3, vecs.shape[1]))}
    )
    dirs["gradient"] = g
    gen = torch.Generator().manual_seed(seed)
    for i in range(3):
        dirs[f"random {i + 1}"] = torch.randn(ref_op.dim, generator=gen, dtype=torch.float64)
    lam_max = float(eigs[source].max())
    span = 2.0 / math.sqrt(lam_max) if lam_max > 0 else 1.0
    return dirs, span


def _memory(model):
    import curvkit as ck

    df = ck.memory_report(model, dtype=torch.float32)
    wide = df.pivot(index="layer", columns="structure", values="bytes")
    order = list(dict.fromkeys(df["layer"]))
    return df, wide.reindex(order)[list(dict.fromkeys(df["structure"]))]


# -- the job --------------------------------------------------------------------------------
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
) -> Path:
    r"""Compute every comparison on one problem and write a self-contained HTML report.

    Args:
        problem: A built-in problem (:func:`curvkit.problems.list_problems`) or
            ``"digits_mlp_small"`` (:func:`digits_mlp_small`, the default).
        out_dir: Output folder (created).
        model_path: ``"path/to/file.py:function"``; the function takes no
            argument and returns ``(model, loss_func, (X, y))``. Replaces ``problem``.
        n_samples: Examples of the training data the curvature is computed on.
        seed: Seed of the model, Monte Carlo samples, probes and directions.
        device: Device of every computation.
        progress: Show tqdm progress bars on stderr.
        train_steps: Seeded Adam steps (learning rate ``1e-2``, batches of 64)
            on the training data before the analysis; 0 analyses the model as built.
        dtype: ``"float64"`` (default) or ``"float32"``.
        max_dense: Largest number of parameters accepted (``D x D`` matrices are formed).

    Returns:
        The path of ``index.html``.

    Raises:
        ShapeError: For an unknown problem, a bad ``model_path``, ``n_samples < 2``
            or ``D > max_dense``.
        CurvkitError: If the reference GGN cannot be computed.
    """
    from tqdm.auto import tqdm

    import curvkit as ck
    from curvkit.app import report_html as _report_html
    from curvkit.operators.exact import loss_and_gradient

    if dtype not in _DTYPES:
        raise ShapeError(f"report: dtype={dtype!r} is not one of {tuple(_DTYPES)}.")
    if n_samples < 2:
        raise ShapeError(f"report: n_samples must be at least 2, got {n_samples}.")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ShapeError(f"report: device={device!r} is not a device: {e}") from None
    out_dir = Path(out_dir)
    clock = _Clock(device)
    started = time.perf_counter()

    def bar(iterable, desc):
        return tqdm(iterable, desc=desc, leave=False, disable=not progress, file=sys.stderr)

    phases = tqdm(total=8, desc="report", disable=not progress, file=sys.stderr)

    def phase(name):
        phases.set_postfix_str(name)
        return clock(name)

    with phase("setup"):
        if model_path is not None:
            name, description, model, loss_func, X_all, y_all = _load_model(
                model_path, device, _DTYPES[dtype]
            )
        else:
            kwargs = {"seed": seed, "dtype": _DTYPES[dtype], "device": device}
            if problem == DEFAULT_PROBLEM:
                prob = digits_mlp_small(**kwargs)
            else:
                prob = ck.problems.get_problem(problem, **kwargs)
            name, description = prob.name, prob.description
            model, loss_func = prob.model, prob.loss_func
            X_all, y_all = prob.train
        D = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if D > max_dense:
            raise ShapeError(
                f"report: the model has D={D} parameters; the report forms dense D x D matrices "
                f"and accepts D <= max_dense={max_dense}. Use a smaller model (--model) or raise "
                "the limit."
            )
        data = (X_all[:n_samples], y_all[:n_samples])
    phases.update()
    with phase("train"):
        train_losses = _train(model, loss_func, X_all, y_all, train_steps, seed)
    phases.update()
    with phase("operators"):
        ops, dense, op_rows = _build_operators(model, loss_func, data, seed, bar)
        ref_op = ops[REFERENCE]
        loss, g = loss_and_gradient(model, loss_func, data)
        g = g.to(torch.float64)
    phases.update()
    with phase("spectra"):
        k = min(10, D)
        eigs, summary, lanczos, densities, top_vectors = _spectra(dense, ref_op, seed, k, bar)
    phases.update()
    with phase("compare"):
        lam_max = max(float(eigs[REFERENCE].max()), 1e-12)
        grid = [lam_max * 10.0**e for e in (-5, -4, -3, -2, -1, 0)]
        table = _compare_all(dense, ref_op, g, grid, k, seed, bar)
    phases.update()
    with phase("traces"):
        trace_rows, error_rows = _traces(dense, ref_op, seed, bar)
    phases.update()
    with phase("landscape"):
        directions, span = _directions(eigs, top_vectors, ref_op, g, seed)
        memory_long, memory_wide = _memory(model)
    phases.update()
    with phase("figures"):
        damping = 1e-3 * lam_max
        figures, block_errors = _report_html.make_figures(
            out_dir / "figures", model, loss_func, data, ops, dense, ref_op, eigs, densities,
            table, error_rows, directions, span, damping, bar,
        )  # fmt: skip
    phases.update()
    phases.close()
    results = {
        "problem": {
            "name": name, "description": description, "num_params": D,
            "n_samples": int(data[0].shape[0]), "loss_func": type(loss_func).__name__,
            "loss": float(loss), "gradient_norm": float(g.norm()), "train_steps": train_steps,
            "train_loss_first": train_losses[0] if train_losses else None,
            "train_loss_last": train_losses[-1] if train_losses else None,
            "blocks": [
                {"name": b, "size": s} for b, s in zip(ref_op.block_names, ref_op.block_sizes)
            ],
        },
        "settings": {
            "seed": seed, "device": str(device), "dtype": dtype, "damping_inverse": damping,
            "damping_grid": grid, "k": k, "reference": REFERENCE,
        },
        "command": _command(
            problem, model_path, out_dir, device, seed, n_samples, train_steps, dtype
        ),
        "versions": _versions(),
        "operators": op_rows,
        "spectra": summary,
        "lanczos": lanczos,
        "eigenvalues": {n: v.tolist() for n, v in eigs.items()},
        "densities": {
            n: {"grid": sd.grid.tolist(), "density": sd.density.tolist(), "log": sd.log,
                "matvecs": sd.matvecs, "mass_below_cutoff": sd.mass_below_cutoff}
            for n, sd in densities.items()
        },
        "comparison": table.to_dict(orient="records"),
        "block_errors": block_errors,
        "traces": trace_rows,
        "trace_estimator_error": error_rows,
        "loss_landscape": figures.pop("_landscape").to_dict(orient="records"),
        "memory": memory_long.to_dict(orient="records"),
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    with clock("write"):
        table.to_csv(out_dir / "metrics.csv", index=False)
        results["timings_s"] = {**clock.phases, "total": time.perf_counter() - started}
        page = _report_html.render(results, figures, memory_wide)
        (out_dir / "index.html").write_text(page, encoding="utf-8")
    results["timings_s"] = {**clock.phases, "total": time.perf_counter() - started}
    (out_dir / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    return out_dir / "index.html"


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
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command to an ``argparse`` sub-parser group.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new sub-parser (its ``func`` default is :func:`run`).
    """
    parser = subparsers.add_parser("report", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


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
        )  # fmt: skip
    except CurvkitError as e:
        print(f"curvkit report: error: {e}", file=sys.stderr)
        return 1
    print(page)
    return 0
