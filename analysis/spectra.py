r"""Spectra of the Hessian, GGN, Monte Carlo Fisher and empirical Fisher of trained classifiers.

Question (Sagun et al. 2017, arXiv:1706.04454; Papyan 2020, arXiv:2008.11865):
after training, do the curvature matrices of a ``C``-class classifier show a
bulk near zero plus about ``C`` outliers? How do the Hessian, the GGN, the
Monte Carlo Fisher (one sampled label per example) and the empirical Fisher
(true labels) differ in their spectra, top eigenvalues and traces? And do
the matrix-free estimates (Lanczos, stochastic Lanczos quadrature, Hutchinson,
Hutch++, XTrace) agree with dense ``eigvalsh`` where the matrix fits in memory?

Problems: ``digits_mlp`` (MLP 64-32-32-10, tanh, D = 3466, the 1500 training
images) and ``mnist1d_mlp`` (MLP 40-100-100-10, ReLU, D = 15,210; curvature on
the first ``--mnist1d-n`` training sequences, default 1000), both float64, each
trained with Adam first (``--steps``). Spectral densities: SLQ over
:math:`\log_{10}\lambda` (10 probes, 80 Lanczos steps, Gaussian kernel of 0.05
decades); the Hessian, which is indefinite, also on a linear axis. Top
eigenvalues: restarted Lanczos (``ck.eigenvalues``, ``k = --k``); the Hessian's
most negative ones too.
Problems with ``D <= --dense-max`` are also densified: exact eigenvalues,
exact traces, and the exact eigenvalues smoothed with the SLQ kernel for
comparison with the SLQ density.

Outputs (in ``--out``): ``eigenvalues.csv`` (Lanczos and dense, with
residuals), ``densities.csv``, ``traces.csv`` (estimate, standard error, exact
value, z-score), ``crosscheck.csv`` (Lanczos vs dense top eigenvalues),
``gaps.csv`` (ratios of consecutive top eigenvalues), ``training.csv``, and
figures ``spec_*.png``.

Usage::

    python analysis/spectra.py [--quick] [--out DIR] [--seed 0] [--problems digits_mlp,mnist1d_mlp]
        [--threads 1] [--docs [DIR]]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit import plotting
from curvkit.diagnostics.spectral import SpectralDensity

NAME = "spectra"
OPERATORS = ("Hessian", "GGN", "Fisher (MC)", "EF")
TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")


def progress(problem: str, what: str, seconds: float) -> None:
    """One line of progress on stderr."""
    print(f"[{problem}] {what}: {seconds:.1f} s", file=sys.stderr, flush=True)


def operators(model, loss_func, data, seed: int) -> dict:
    """The four curvature matrices of the brief, matrix-free."""
    return {
        "Hessian": ck.hessian(model, loss_func, data),
        "GGN": ck.ggn(model, loss_func, data),
        "Fisher (MC)": ck.fisher(model, loss_func, data, mc_samples=1, seed=seed),
        "EF": ck.empirical_fisher(model, loss_func, data),
    }


def train(problem, steps: int, lr: float, seed: int) -> list[dict]:
    """Adam on mini-batches of 128; logs full training loss and test accuracy."""
    model, loss_func = problem.model, problem.loss_func
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = problem.loader(batch_size=128, seed=seed)
    log, step = [], 0

    def record():
        with torch.no_grad():
            X, y = problem.train
            Xt, yt = problem.test
            acc = float((model(Xt).argmax(1) == yt).double().mean())
            log.append({"step": step, "train_loss": float(loss_func(model(X), y)), "test_acc": acc})

    record()
    while step < steps:
        for X, y in loader:
            opt.zero_grad()
            loss_func(model(X), y).backward()
            opt.step()
            step += 1
            if step % max(1, steps // 5) == 0 or step == steps:
                record()
            if step == steps:
                break
    for p in model.parameters():
        p.grad = None
    return log


def exact_traces(model, loss_func, data) -> dict:
    """Exact traces without densifying: diagonals by BackPACK, EF from per-example gradients."""
    X, _ = data
    rec = ck.extract(model, loss_func, *data, quantities=("batch_grad",))
    # batch_grad holds R * grad(l_n) with R = 1/N; tr(EF) = R sum_n |grad l_n|^2
    sq = sum(float((g**2).sum()) for r in rec for g in r.batch_grad)
    return {
        "GGN": float(ck.diag_ggn(model, loss_func, data).trace()),
        "Hessian": float(ck.diag_hessian(model, loss_func, data).trace()),
        "EF": sq * X.shape[0],
    }


def smoothed(values: torch.Tensor, sd) -> torch.Tensor:
    """Exact eigenvalues through the SLQ density's Gaussian kernel (same grid, width, cutoff).

    As in the SLQ estimate, eigenvalues at or below the log-scale cutoff are placed at it.
    """
    x = torch.log10(sd.grid) if sd.log else sd.grid
    lam = values.to(sd.grid)
    u = torch.log10(lam.clamp_min(sd.cutoff)) if sd.log else lam
    z = (x[:, None] - u[None, :]) / sd.kernel_width
    return torch.exp(-0.5 * z**2).sum(1) / (sd.kernel_width * math.sqrt(2 * math.pi) * lam.numel())


def dense_density(values: torch.Tensor, sd) -> SpectralDensity:
    """The exact spectral measure (weights ``1/D``) smoothed exactly as ``sd``."""
    return SpectralDensity(
        grid=sd.grid,
        density=smoothed(values, sd),
        nodes=values[None, :],
        weights=torch.full_like(values, 1.0 / values.numel())[None, :],
        matvecs=0,
        kernel_width=sd.kernel_width,
        log=sd.log,
        cutoff=sd.cutoff,
        mass_below_cutoff=float((values <= sd.cutoff).double().mean()) if sd.log else 0.0,
    )


def figures(name: str, D: int, classes: int, densities, dense_eigs, top, out: Path) -> None:
    """SLQ densities (log scale; the Hessian also linear) and the top-eigenvalue rank plot.

    The figure re-smooths every density with Silverman's kernel width
    (:func:`curvkit.plotting.kernel_width_for`); the dense GGN density shares the
    width of the GGN's SLQ estimate, so that the two are comparable.
    """
    shown = {k[0]: v for k, v in densities.items() if k[1] == "log"}
    colors, widths = {}, {}
    if "GGN" in dense_eigs:
        sd = densities[("GGN", "log")]
        shown["GGN, dense eigvalsh"] = dense_density(dense_eigs["GGN"], sd)
        colors["GGN, dense eigvalsh"] = "#000000"
        width = plotting.kernel_width_for(sd.nodes, sd.weights, log=True, cutoff=sd.cutoff)
        widths = {"GGN": width, "GGN, dense eigvalsh": width}
    shown["Hessian (linear axis)"] = densities[("Hessian", "linear")]
    plotting.spectral_densities(
        shown,
        kernel_width=widths,
        colors=colors,
        title=f"SLQ spectral densities, {name} (D = {D})",
        path=out / f"spec_density_{name}",
    )
    ranks = dict(top)
    if "GGN" in dense_eigs:
        ranks["GGN (dense)"] = torch.flip(dense_eigs["GGN"], (0,))[: 2 * len(top["GGN"])]
    fig = plotting.eigenvalue_ranks(ranks, title=f"Top eigenvalues (Lanczos), {name}")
    ax = fig.axes[0]
    ax.axvline(classes, color="#8c8c8c", ls=":", lw=1.0)
    ax.annotate(
        f"C = {classes}",
        (classes, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -10),
        textcoords="offset points",
        fontsize=8,
    )
    plotting.save(fig, out / f"spec_ranks_{name}")


def analyse_problem(name: str, args, out: Path) -> dict:
    kwargs = {"dtype": torch.float64}
    if name == "tiny_mlp":
        kwargs["n_train"] = 64
    problem = ck.problems.get_problem(name, seed=args.seed, **kwargs)
    log = train(problem, args.steps, args.lr, args.seed)
    X, y = problem.train
    n = args.mnist1d_n if name == "mnist1d_mlp" else X.shape[0]
    data = (X[:n], y[:n])
    model, loss_func = problem.model, problem.loss_func
    D = problem.num_params
    ops = operators(model, loss_func, data, args.seed)
    timing, eig_rows, dens_rows, trace_rows, cross_rows, gap_rows = {}, [], [], [], [], []
    densities, top = {}, {}
    dense_eigs = {}
    if D <= args.dense_max:
        for op_name, op in ops.items():
            t0 = time.perf_counter()
            M = op.to_dense()
            dense_eigs[op_name] = torch.linalg.eigvalsh((M + M.T) / 2)
            timing[f"dense {op_name}"] = time.perf_counter() - t0
            progress(name, f"dense {op_name}", timing[f"dense {op_name}"])
            for i, v in enumerate(torch.flip(dense_eigs[op_name], (0,))[: 3 * args.k].tolist()):
                eig_rows.append(
                    {
                        "operator": op_name,
                        "method": "dense",
                        "which": "LA",
                        "rank": i + 1,
                        "value": v,
                        "residual": 0.0,
                    }
                )
    for op_name, op in ops.items():
        # top eigenvalues by restarted Lanczos (matrix-free even where dense is affordable)
        t0 = time.perf_counter()
        vals, info = ck.eigenvalues(op, k=args.k, which="LA", method="lanczos", seed=args.seed)
        timing[f"lanczos {op_name}"] = time.perf_counter() - t0
        progress(name, f"lanczos {op_name}", timing[f"lanczos {op_name}"])
        top[op_name] = vals
        for i, (v, r) in enumerate(zip(vals.tolist(), info.residuals.tolist())):
            eig_rows.append(
                {
                    "operator": op_name,
                    "method": "lanczos",
                    "which": "LA",
                    "rank": i + 1,
                    "value": v,
                    "residual": r,
                    "matvecs": info.matvecs,
                    "converged": info.converged,
                }
            )
        ratios = (vals[:-1] / vals[1:]).tolist()
        for i, r in enumerate(ratios):
            gap_rows.append({"operator": op_name, "rank": i + 1, "ratio_to_next": r})
        if op_name == "Hessian":
            # the most negative eigenvalues are clustered near zero: a larger Krylov space
            neg, info = ck.eigenvalues(
                op, k=min(5, args.k), which="SA", method="lanczos", ncv=40, seed=args.seed
            )
            for i, (v, r) in enumerate(zip(neg.tolist(), info.residuals.tolist())):
                eig_rows.append(
                    {
                        "operator": op_name,
                        "method": "lanczos",
                        "which": "SA",
                        "rank": i + 1,
                        "value": v,
                        "residual": r,
                        "matvecs": info.matvecs,
                        "converged": info.converged,
                    }
                )
        if op_name in dense_eigs:
            exact = torch.flip(dense_eigs[op_name], (0,))[: args.k]
            for i, (v, e) in enumerate(zip(vals.tolist(), exact.tolist())):
                cross_rows.append(
                    {
                        "operator": op_name,
                        "rank": i + 1,
                        "lanczos": v,
                        "dense": e,
                        "rel_diff": abs(v - e) / abs(e),
                    }
                )
        # spectral densities by SLQ
        t0 = time.perf_counter()
        sds = {
            "log": ck.spectral_density(
                op,
                num_probes=args.probes,
                lanczos_steps=args.steps_slq,
                kernel_width=args.kernel_width,
                log=True,
                seed=args.seed,
            )
        }
        if op_name == "Hessian":
            sds["linear"] = ck.spectral_density(
                op, num_probes=args.probes, lanczos_steps=args.steps_slq, seed=args.seed
            )
        timing[f"slq {op_name}"] = time.perf_counter() - t0
        progress(name, f"slq {op_name}", timing[f"slq {op_name}"])
        for scale, sd in sds.items():
            densities[(op_name, scale)] = sd
            ref = smoothed(dense_eigs[op_name], sd) if op_name in dense_eigs else None
            for j, (x, d) in enumerate(zip(sd.grid.tolist(), sd.density.tolist())):
                dens_rows.append(
                    {
                        "operator": op_name,
                        "scale": scale,
                        "x": x,
                        "density": d,
                        "dense_smoothed": None if ref is None else float(ref[j]),
                        "mass_below_cutoff": sd.mass_below_cutoff,
                        "matvecs": sd.matvecs,
                    }
                )
        # traces with standard errors
        for method in TRACE_METHODS:
            est = ck.trace(op, method=method, num_matvecs=args.trace_matvecs, seed=args.seed)
            trace_rows.append(
                {
                    "operator": op_name,
                    "method": method,
                    "estimate": est.value,
                    "stderr": est.stderr,
                    "matvecs": est.matvecs,
                }
            )
        moment = sds["log"].moment(1)
        trace_rows.append(
            {
                "operator": op_name,
                "method": "slq",
                "estimate": D * moment.value,
                "stderr": D * moment.stderr,
                "matvecs": sds["log"].matvecs,
            }
        )
    exact = {k: float(v.sum()) for k, v in dense_eigs.items()}
    if not exact:
        exact = exact_traces(model, loss_func, data)
    for row in trace_rows:
        e = exact.get(row["operator"], math.nan)
        row["exact"] = e
        row["z"] = (row["estimate"] - e) / row["stderr"] if row["stderr"] > 0 else math.nan

    classes = int(problem.train[1].max()) + 1
    figures(name, D, classes, densities, dense_eigs, top, out)
    tag = {"problem": name}
    return {
        "eig": [{**tag, **r} for r in eig_rows],
        "dens": [{**tag, **r} for r in dens_rows],
        "trace": [{**tag, **r} for r in trace_rows],
        "cross": [{**tag, **r} for r in cross_rows],
        "gaps": [{**tag, **r} for r in gap_rows],
        "train": [{**tag, **r} for r in log],
        "timing": [{**tag, "phase": k, "seconds": v} for k, v in timing.items()],
        "info": {**tag, "D": D, "n_curvature": n, "classes": classes},
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / NAME)
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problems", default="digits_mlp,mnist1d_mlp")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps before the analysis")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mnist1d-n", type=int, default=1000, help="curvature examples, MNIST-1D")
    parser.add_argument("--k", type=int, default=20, help="top eigenvalues by Lanczos")
    parser.add_argument("--probes", type=int, default=10, help="SLQ probes")
    parser.add_argument("--steps-slq", type=int, default=80, help="Lanczos steps per SLQ probe")
    parser.add_argument(
        "--kernel-width", type=float, default=0.05, help="SLQ kernel width in log10 units"
    )
    parser.add_argument("--trace-matvecs", type=int, default=99)
    parser.add_argument("--dense-max", type=int, default=4000, help="densify when D <= this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--docs", nargs="?", const="docs/figures", default=None, help="copy figures there"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.problems, args.steps, args.k = "tiny_mlp", 50, 5
        args.probes, args.steps_slq, args.trace_matvecs = 4, 20, 12
    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parts = [analyse_problem(name, args, out) for name in args.problems]
    wall = time.perf_counter() - start
    tables = {}
    for key, file in (
        ("eig", "eigenvalues"),
        ("dens", "densities"),
        ("trace", "traces"),
        ("cross", "crosscheck"),
        ("gaps", "gaps"),
        ("train", "training"),
        ("timing", "timings"),
    ):
        tables[file] = pd.DataFrame(sum((p[key] for p in parts), []))
        tables[file].to_csv(out / f"{file}.csv", index=False)
    info = pd.DataFrame([p["info"] for p in parts])
    info.to_csv(out / "problems.csv", index=False)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for f in sorted([*out.glob("spec_*.png"), *out.glob("spec_*.pdf")]):
            shutil.copy(f, docs / f.name)
    summary = _summary(tables, info, wall)
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    return {**tables, "info": info, "wall": wall}


def _summary(tables, info, wall) -> str:
    lines = [f"wall {wall:.0f} s", info.to_string(index=False), ""]
    eig = tables["eigenvalues"]
    la = eig[(eig["method"] == "lanczos") & (eig["which"] == "LA")]
    lines += [
        "top eigenvalues (Lanczos):",
        la.pivot_table(index="rank", columns=["problem", "operator"], values="value").to_string(
            float_format="%.4g"
        ),
        "",
    ]
    gaps = tables["gaps"]
    big = gaps.loc[gaps.groupby(["problem", "operator"])["ratio_to_next"].idxmax()]
    lines += ["largest ratio of consecutive top eigenvalues:", big.to_string(index=False), ""]
    if not tables["crosscheck"].empty:
        cc = tables["crosscheck"].groupby(["problem", "operator"])["rel_diff"].max()
        lines += [
            "Lanczos vs dense eigvalsh, max relative difference of the top k:",
            cc.to_string(float_format="%.2e"),
            "",
        ]
    tr = tables["traces"][["problem", "operator", "method", "estimate", "stderr", "exact", "z"]]
    lines += ["traces:", tr.to_string(index=False, float_format="%.4g")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
