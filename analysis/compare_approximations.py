"""How close are K-FAC and its relatives to the exact Fisher, and is its inverse block-tri-diagonal?

Question (Martens & Grosse 2015, §3-§4, Figs. 2-3): on an autoencoder small
enough that the exact Fisher (= GGN for a Gaussian likelihood) is a dense
matrix, how well do the usual approximations reproduce it, at initialisation
and after partial training? Is the damped inverse of the exact Fisher close to
block-tri-diagonal, as M&G's tri-diagonal K-FAC assumes?

Setup: scikit-learn's digits (8x8 images, pixel values / 16), a seeded split of
1500 training images; autoencoder 64-12-10-8-10-12-64 (sigmoid hidden units, a
linear 8-unit code layer and a linear output, as the M&G MNIST autoencoder),
MSE loss, float64, D = 2052 parameters. The MNIST problems of ``curvkit.problems``
(784 inputs) are too large for a dense Fisher, and 8x8 digits need no
down-sampling. Checkpoints: initialisation and after ``--steps`` Adam steps.
Every curvature matrix is computed on the full training set. Approximations:
K-FAC (Monte Carlo, one sample), KFLR (exact G), KFRA, EKFAC (George et al.
2018, empirical eigenvalues), diagonal GGN, tri-diagonal KFLR (M&G §4.3) and
the empirical Fisher; the reference is the exact GGN.

Outputs (in ``--out``): ``metrics.csv`` (every :func:`curvkit.compare` row,
both checkpoints), ``block_errors.csv`` (per-layer-block relative Frobenius
errors), ``block_mass.csv`` (share of the squared off-diagonal entries on the
block-diagonal, the first block off-diagonals and beyond, for each matrix and
damped inverse), ``training.csv``, and the figures ``cmp_*.png`` / ``cmp_*.pdf``
(layers labelled by module name and type, e.g. ``0 (Linear)``).

Usage::

    python analysis/compare_approximations.py [--quick] [--out DIR] [--seed 0]
        [--steps 500] [--threads 1] [--docs [DIR]]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import curvkit as ck
from curvkit import plotting
from curvkit.operators.base import DenseOperator
from curvkit.operators.exact import loss_and_gradient

NAME = "compare_approximations"
#: Figures copied to the documentation with ``--docs`` (each also as PDF).
DOCS_FIGURES = (
    "cmp_heatmaps_trained.png",
    "cmp_heatmaps_middle_trained.png",
    "cmp_inverse_heatmaps_trained.png",
    "cmp_block_errors.png",
    "cmp_frobenius.png",
    "cmp_overlap.png",
    "cmp_preconditioning_trained.png",
)
REFERENCE = "GGN"


def approximations(seed: int) -> dict:
    """Name -> ``builder(model, loss_func, data)`` of each approximation compared."""
    return {
        "KFAC (MC)": lambda m, lf, d: ck.kfac(m, lf, d, kind="kfac", mc_samples=1, seed=seed),
        "KFLR": lambda m, lf, d: ck.kfac(m, lf, d, kind="kflr"),
        "KFRA": lambda m, lf, d: ck.kfac(m, lf, d, kind="kfra"),
        "EKFAC": lambda m, lf, d: ck.ekfac(m, lf, d),
        "diag GGN": lambda m, lf, d: ck.diag_ggn(m, lf, d),
        "tri-diag KFLR": lambda m, lf, d: ck.kfac(m, lf, d, kind="kflr", structure="tridiagonal"),
        "EF": lambda m, lf, d: ck.empirical_fisher(m, lf, d),
    }


# -- problem -------------------------------------------------------------------------------
def digits_images(side: int, n: int, seed: int) -> torch.Tensor:
    """``n`` digits images (seeded order), average-pooled from 8x8 to ``side`` x ``side``, flat."""
    from sklearn.datasets import load_digits

    X = torch.as_tensor(load_digits().data, dtype=torch.float64) / 16.0
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    X = X[order[:n]].reshape(-1, 1, 8, 8)
    if side != 8:
        X = nn.functional.avg_pool2d(X, 8 // side)
    return X.reshape(n, -1)


def autoencoder(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """Linear layers of ``widths``, sigmoid after each hidden layer except the code (middle) one."""
    code = len(widths) // 2 - 1  # index of the layer mapping to the code units
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2 and i != code:
                layers.append(nn.Sigmoid())
    return nn.Sequential(*layers).to(torch.float64)


def train(model, loss_func, X, steps: int, seed: int, lr: float, batch: int) -> list[dict]:
    """``steps`` Adam steps on random mini-batches; returns the full-data loss along the way."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    log = []
    for step in range(steps + 1):
        if step % max(1, steps // 10) == 0 or step == steps:
            with torch.no_grad():
                log.append({"step": step, "loss": float(loss_func(model(X), X))})
        if step == steps:
            break
        idx = torch.randint(0, X.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss_func(model(X[idx]), X[idx]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return log


# -- analysis of one checkpoint ------------------------------------------------------------
def progress(tag: str, what: str, seconds: float) -> None:
    """One line of progress on stderr."""
    print(f"[{tag}] {what}: {seconds:.1f} s", file=sys.stderr, flush=True)


def layer_slices(op) -> list[tuple[str, slice]]:
    """Layer blocks named ``W1..WL`` (weights with their biases)."""
    return [(f"W{i + 1}", s) for i, (_, s) in enumerate(op.block_slices())]


def band_mass(M: np.ndarray, slices) -> dict:
    r"""Shares of the squared off-diagonal entries: block diagonal, first off-diagonal, beyond.

    The main diagonal is left out, so that a damping :math:`\lambda I` (which adds to it
    only) does not make every matrix look block-diagonal.
    """
    M = M.copy()
    np.fill_diagonal(M, 0.0)
    norms = plotting.block_norms(M, slices) ** 2
    L = norms.shape[0]
    dist = np.abs(np.subtract.outer(np.arange(L), np.arange(L)))
    total = norms.sum()
    if total == 0:  # a diagonal matrix
        return dict.fromkeys(("diagonal", "first_off_diagonal", "beyond"), float("nan"))
    return {
        "diagonal": norms[dist == 0].sum() / total,
        "first_off_diagonal": norms[dist == 1].sum() / total,
        "beyond": norms[dist > 1].sum() / total,
    }


def build(model, loss_func, data, seed: int, tag: str):
    """The exact GGN and every approximation: operators, dense matrices, timings."""
    timings, ops, dense = {}, {}, {}
    t0 = time.perf_counter()
    ops[REFERENCE] = ck.ggn(model, loss_func, data)
    G = ops[REFERENCE].to_dense()
    dense[REFERENCE] = (G + G.T) / 2
    timings[REFERENCE] = time.perf_counter() - t0
    progress(tag, "GGN dense", timings[REFERENCE])
    for name, make in approximations(seed).items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # KFRA / tri-diagonal notes
            ops[name] = make(model, loss_func, data)
            dense[name] = ops[name].to_dense()
        timings[name] = time.perf_counter() - t0
        progress(tag, name, timings[name])
    return ops, dense, timings


def compare_all(dense, ref_op, slices, g, grid, seed: int) -> pd.DataFrame:
    """:func:`curvkit.compare` rows of every approximation: whole matrix, layers, middle layers.

    The middle layers (all but the first and last, M&G's Fig. 2 view) get rows
    of their own because the first and last layers dominate the whole-matrix norms.
    """
    G = dense[REFERENCE]
    names = [n for n, _ in slices]
    shapes = dict(param_shapes=ref_op.param_shapes, block_sizes=ref_op.block_sizes)
    middle = slice(slices[1][1].start, slices[-2][1].stop)
    mid_shapes = [torch.Size([middle.stop - middle.start])]
    options = dict(k=10, damping_grid=grid, seed=seed, reference_name=REFERENCE)
    frames = []
    for name, M in dense.items():
        if name == REFERENCE:
            continue
        frames.append(
            ck.compare(
                {name: DenseOperator(M, block_names=names, **shapes)},
                DenseOperator(G, block_names=names, **shapes),
                gradient=g,
                exact_threshold=G.shape[0],
                **options,
            )
        )
        part = ck.compare(
            {name: DenseOperator(M[middle, middle], mid_shapes)},
            DenseOperator(G[middle, middle], mid_shapes),
            gradient=g[middle],
            blocks=False,
            **options,
        )
        frames.append(part.assign(block="middle"))
    return pd.concat(frames, ignore_index=True)


def block_errors(dense, slices, tag: str) -> tuple[dict, list[dict]]:
    """Per-layer-block relative Frobenius errors against the GGN (arrays and tidy rows)."""
    names = [n for n, _ in slices]
    errors, rows = {}, []
    for name, M in dense.items():
        if name == REFERENCE:
            continue
        errors[name] = E = plotting.block_norms(M, slices, reference=dense[REFERENCE])
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                rows.append(
                    {
                        "checkpoint": tag,
                        "approx": name,
                        "row": a,
                        "col": b,
                        "rel_frobenius": E[i, j],
                    }
                )
    return errors, rows


def damped_inverses(ops, G, lam: float) -> dict:
    r"""Exact :math:`(G + \lambda I)^{-1}`, KFLR's (exact Tikhonov), tri-diagonal KFLR's (M&G)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    return {
        "exact (G + λI)⁻¹": torch.linalg.inv(G + lam * eye),
        "KFLR inverse": ops["KFLR"].inverse(damping=lam).to_dense(),
        "tri-diag KFLR inverse": ops["tri-diag KFLR"].inverse(damping=lam).to_dense(),
    }


def figures(tag, dense, inverses, slices, lam, out: Path) -> None:
    """Heatmaps of matrices and inverses (whole and middle layers).

    ``slices`` carry the figure labels of the layers (module name and type).
    Every figure is written as PNG and (vector) PDF.
    """
    show = {"GGN (exact Fisher)": dense[REFERENCE]}
    show.update({k: dense[k] for k in ("KFAC (MC)", "KFLR", "tri-diag KFLR")})
    title = f"Curvature matrices ({tag})"
    plotting.heatmaps(show, slices, title=title, path=out / f"cmp_heatmaps_{tag}")
    middle = slice(slices[1][1].start, slices[-2][1].stop)
    mid = [(n, slice(s.start - middle.start, s.stop - middle.start)) for n, s in slices[1:-1]]
    plotting.heatmaps(
        {k: v[middle, middle] for k, v in show.items()},
        mid,
        title=f"Middle layers ({tag})",
        path=out / f"cmp_heatmaps_middle_{tag}",
    )
    plotting.heatmaps(
        {k: v[middle, middle] for k, v in inverses.items()},
        mid,
        title=f"Damped inverses, middle layers ({tag}, λ = {lam:.2g})",
        path=out / f"cmp_inverse_heatmaps_{tag}",
    )


def analyse(tag, model, loss_func, data, args, out: Path) -> dict:
    """Everything at one checkpoint: dense matrices, comparisons, inverses, figures."""
    ops, dense, timings = build(model, loss_func, data, args.seed, tag)
    G = dense[REFERENCE]
    slices = layer_slices(ops[REFERENCE])
    evals = torch.linalg.eigvalsh(G)
    lam_max, mean_eig = float(evals.max()), float(evals.mean())
    _, g = loss_and_gradient(model, loss_func, data)

    t0 = time.perf_counter()
    grid = [lam_max * r for r in (1e-4, 1e-3, 1e-2, 1e-1)]
    metrics = compare_all(dense, ops[REFERENCE], slices, g, grid, args.seed)
    metrics.insert(0, "checkpoint", tag)
    metrics["damping_rel"] = metrics["damping"] / lam_max
    timings["compare"] = time.perf_counter() - t0
    progress(tag, "compare", timings["compare"])

    errors, block_rows = block_errors(dense, slices, tag)
    lam = args.damping * mean_eig
    inverses = damped_inverses(ops, G, lam)
    mass_rows = []
    for kind, mats in (("matrix", dense), ("inverse", inverses)):
        for name, M in mats.items():
            mass = band_mass(M.numpy(), slices)
            mass_rows.append({"checkpoint": tag, "kind": kind, "name": name, **mass})
    labels = plotting.layer_labels(model)
    labelled = [(label, s) for label, (_, s) in zip(labels, slices)]
    figures(tag, dense, inverses, labelled, lam, out)
    T = dense["tri-diag KFLR"]  # dense in exact arithmetic symmetric PSD: check round-off
    info = {
        "lambda_max": lam_max,
        "mean_eig": mean_eig,
        "damping": lam,
        "D": G.shape[0],
        "tridiag_asymmetry": float((T - T.T).norm() / T.norm()),
        "tridiag_min_eig_rel": float(torch.linalg.eigvalsh((T + T.T) / 2).min()) / lam_max,
    }
    names = [n for n, _ in slices]
    return {
        "metrics": metrics,
        "blocks": block_rows,
        "mass": mass_rows,
        "errors": errors,
        "names": names,
        "labels": labels,
        "timings": timings,
        "info": info,
    }


def table_figures(metrics: pd.DataFrame, out: Path) -> None:
    """Figures drawn from ``metrics.csv`` alone: error and overlap bars, preconditioning curves.

    ``table_figures(pd.read_csv(out / "metrics.csv"), out)`` redraws them without
    recomputing any matrix.
    """
    for metric in ("frobenius", "overlap"):
        rows = metrics[metrics["block"].isin(["all", "middle"]) & (metrics["metric"] == metric)]
        where = rows["block"].map({"all": "whole", "middle": "middle layers"})
        plotting.metric_bars(
            rows.assign(block=rows["checkpoint"] + ", " + where),
            metric=metric,
            block=None,
            title="Approximations against the exact GGN",
            path=out / f"cmp_{metric}",
        )
    for tag in dict.fromkeys(metrics["checkpoint"]):
        plotting.preconditioning_quality(
            metrics[metrics["checkpoint"] == tag],
            title=f"Preconditioned steps vs exact GGN ({tag})",
            path=out / f"cmp_preconditioning_{tag}",
        )


# -- main ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / NAME)
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500, help="Adam steps before checkpoint 2")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument(
        "--damping", type=float, default=0.1, help="damping of the inverses, times tr(G)/D"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--docs", nargs="?", const="docs/figures", default=None, help="copy figures there"
    )
    args = parser.parse_args(argv)
    args.widths = (64, 12, 10, 8, 10, 12, 64)
    if args.quick:
        args.widths, args.n_train, args.steps = (16, 6, 4, 6, 16), 96, 20
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    side = int(round(args.widths[0] ** 0.5))
    X = digits_images(side, args.n_train, args.seed)
    model = autoencoder(args.widths, args.seed)
    loss_func = nn.MSELoss()
    data = (X, X)
    start = time.perf_counter()
    results = {"init": analyse("init", model, loss_func, data, args, out)}
    log = train(model, loss_func, X, args.steps, args.seed, args.lr, args.batch_size)
    results["trained"] = analyse("trained", model, loss_func, data, args, out)
    wall = time.perf_counter() - start

    metrics = pd.concat([r["metrics"] for r in results.values()], ignore_index=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    pd.DataFrame(sum((r["blocks"] for r in results.values()), [])).to_csv(
        out / "block_errors.csv", index=False
    )
    mass = pd.DataFrame(sum((r["mass"] for r in results.values()), []))
    mass.to_csv(out / "block_mass.csv", index=False)
    pd.DataFrame(log).to_csv(out / "training.csv", index=False)
    info = pd.DataFrame(
        [
            {"checkpoint": k, **r["info"], **{f"time {n} [s]": t for n, t in r["timings"].items()}}
            for k, r in results.items()
        ]
    )
    info.to_csv(out / "checkpoints.csv", index=False)

    labels = results["trained"]["labels"]
    panels = {
        f"{n} ({tag})": results[tag]["errors"][n]
        for tag in results
        for n in ("KFLR", "tri-diag KFLR", "KFAC (MC)")
    }
    plotting.block_heatmap(
        panels,
        names=labels,
        ncols=3,
        title="Per-block relative Frobenius error vs the exact GGN",
        path=out / "cmp_block_errors",
    )
    table_figures(metrics, out)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for fig in DOCS_FIGURES:
            for suffix in (".png", ".pdf"):  # raster for the pages, vector for print
                shutil.copy((out / fig).with_suffix(suffix), (docs / fig).with_suffix(suffix))

    summary = _summary(metrics, mass, info, log, args, wall)
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    return {"metrics": metrics, "mass": mass, "info": info, "wall": wall}


def _summary(metrics, mass, info, log, args, wall) -> str:
    w = "-".join(map(str, args.widths))
    D = int(info["D"].iloc[0])
    lines = [
        f"autoencoder {w} (D = {D}) on {args.n_train} digits images, MSE; "
        f"loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f} after {args.steps} Adam steps; "
        f"wall {wall:.0f} s",
        "",
    ]
    whole = metrics[(metrics["block"] == "all") & metrics["metric"].isin(["frobenius", "overlap"])]
    table = whole.pivot_table(index="approx", columns=["metric", "checkpoint"], values="value")
    lines += ["whole-matrix metrics vs the exact GGN:", table.round(3).to_string(), ""]
    pre = metrics[(metrics["block"] == "all") & (metrics["metric"] == "precond_reduction")]
    pre = pre.pivot_table(index="approx", columns=["checkpoint", "damping_rel"], values="value")
    lines += [
        "model reduction ratio of the damped step (damping / lambda_max):",
        pre.round(3).to_string(),
        "",
    ]
    inv = mass[mass["kind"] == "inverse"].set_index(["checkpoint", "name"])
    lines += [
        "share of ||.||_F^2 by block band (middle: first off-diagonal):",
        mass[mass["name"] == "GGN"].set_index(["checkpoint", "name"]).round(4).to_string(),
        inv.round(4).to_string(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
