"""Experiment 2: SGD, exact natural gradient and K-FAC on a small ConvNet.

Question: how much of exact natural-gradient descent's per-iteration progress
does K-FAC keep, and what does each cost in seconds, next to SGD with Nesterov
momentum? The standard picture of the field: loss against iterations and
against elapsed time.

Problem: ``digits_cnn`` (conv8-pool-conv16-pool-linear on scikit-learn's 8x8
digits, 1,898 parameters, cross-entropy, 1500 training images), small enough
for the exact Fisher (the GGN of the cross-entropy loss).

Methods (every one steps ``opt.step(closure)`` on the same batches):
- SGD with Nesterov momentum 0.9, learning rate tuned on a 5-point grid;
- exact NGD (``ck.optim.NaturalGradient``): (F + damping I) delta = gradient,
  solved by conjugate gradients with exact Fisher-vector products on the
  batch (relative tolerance 1e-4, at most 100 iterations), damping 0.1,
  momentum 0.9, learning rate tuned on a 4-point grid;
- K-FAC block-diagonal with the automatic step and Levenberg–Marquardt
  damping of M&G §6–7 (nothing to tune; initial damping 0.1);
- K-FAC block-diagonal with a fixed learning rate (tuned on the same grid as
  NGD), momentum 0.9 and damping 0.1: the same update rule as the NGD row with
  the Kronecker-factored curvature in place of the exact one.
One damping value for all three second-order methods (``--damping``), so that
they precondition with the same damped curvature; 0.1 is where K-FAC trains
on this problem (1e-3 diverges within a few steps: see the stability
experiment).
Tuning: best training loss after the full budget on seed 0; then
``--seeds`` seeds (initialisation, split, batch order).

Outputs in ``--out`` (default ``results/sgd_ngd_kfac``): ``curves.csv``,
``tuning.csv``, ``summary.csv``, ``summary.md``, ``curves.png``;
``--docs [DIR]`` copies the figure to ``DIR/sgd_ngd_kfac.png``.

Usage:
    python analysis/sgd_ngd_kfac.py [--quick] [--seeds 3] [--steps 100]
        [--batch-size 250] [--solver cg|dense] [--docs [DIR]]
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

#: Learning-rate grid shared by exact NGD and fixed-lr K-FAC (same update rule).
LR_GRID = (0.01, 0.03, 0.1, 0.3)


def methods(damping: float, solver: str, cg_tol: float, cg_maxiter: int) -> dict:
    """``name -> (Method, lr grid)`` of this experiment."""

    def ngd(model, loss_func, lr):
        return ck.optim.NaturalGradient(
            model, loss_func, lr=lr, damping=damping, momentum=0.9, solver=solver,
            cg_tol=cg_tol, cg_maxiter=cg_maxiter,
        )  # fmt: skip

    def kfac_lr(model, loss_func, lr):
        return ck.optim.KFAC(model, loss_func, lr=lr, momentum=0.9, damping=damping)

    def kfac_auto(model, loss_func, lr):
        return ck.optim.KFAC(model, loss_func, damping=damping)

    return {
        "sgd": (T.METHODS["sgd"], (0.01, 0.03, 0.1, 0.3, 1.0)),
        "ngd": (T.Method(f"exact NGD ({solver}, momentum)", ngd, False), LR_GRID),
        "kfac": (T.Method("K-FAC block-diag (auto)", kfac_auto, False), ()),
        "kfac-lr": (T.Method("K-FAC block-diag (lr + momentum)", kfac_lr, False), LR_GRID),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="digits_cnn")
    parser.add_argument("--optimizers", default="sgd,ngd,kfac,kfac-lr")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--damping", type=float, default=0.1, help="NGD and K-FAC (initial)")
    parser.add_argument("--solver", choices=("cg", "dense"), default="cg")
    parser.add_argument("--cg-tol", type=float, default=1e-4)
    parser.add_argument("--cg-maxiter", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 steps, batch 100")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/sgd_ngd_kfac"))
    parser.add_argument(
        "--docs", nargs="?", const="docs/figures", default=None, help="copy the figure there"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.eval_every = 1, 10, 100, 2
    table = methods(args.damping, args.solver, args.cg_tol, args.cg_maxiter)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    problems = [
        ck.problems.get_problem(args.problem, seed=s, device=args.device) for s in range(args.seeds)
    ]
    p0 = problems[0]
    print(f"{p0.description}: {p0.num_params:,} parameters, batch {args.batch_size}")
    start = time.perf_counter()
    lrs, tuning, curves = {}, [], []
    for name in names:
        method, grid = table[name]
        if grid:
            lrs[name], rows = T.tune_lr(
                p0, name, grid, args.steps, args.batch_size, args.eval_every, method=method
            )
            tuning += rows
            print(f"tuned {name}: lr {lrs[name]:g} (grid {grid})", flush=True)
        else:
            lrs[name] = None
        for problem in problems:
            if grid and problem is p0:  # the tuning run of the chosen value is this run
                rows = [r for r in tuning if r["optimizer"] == name and r["lr"] == lrs[name]]
            else:
                rows = T.train_run(
                    problem, name, lrs[name], args.steps, args.batch_size, problem.seed,
                    args.eval_every, method=method,
                )  # fmt: skip
            curves += rows
            print(
                f"{name:8s} seed {problem.seed}: final loss {T.final_loss(rows):.4g}, "
                f"{rows[-1]['seconds']:.1f} s in steps",
                flush=True,
            )
    summary = T.summarize(curves, reference="sgd")
    labels = {n: table[n][0].label for n in names}
    T.write_outputs(args.out, curves, summary, tuning, title=p0.description, labels=labels)
    print(f"\ntotal {time.perf_counter() - start:.0f} s\n")
    print(T.markdown_table(summary.to_dict("records")))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.out / "curves.png", docs / "sgd_ngd_kfac.png")
    return {"summary": summary, "curves": pd.DataFrame(curves), "lrs": lrs}


if __name__ == "__main__":
    main()
    sys.exit(0)
