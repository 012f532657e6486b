"""Experiment 3: how wide is the good region of each optimiser's main knob?

Question: over a grid of learning rates (SGD with Nesterov momentum, Adam) and
of damping values (K-FAC), for which values does a run end near the best
training loss, and how wide (in decades) is that region?

Problem: ``digits_cnn`` by default (1,898 parameters, cross-entropy; cheap
enough for 3 seeds of every grid point on two CPU cores); ``--problem``
selects another built-in problem (e.g. ``mnist_autoencoder_half``, where
M&G's sparse initialisation is used).

Grids (half-decade spacing for learning rates, one decade for damping):
- SGD (Nesterov 0.9): learning rate 1e-3 ... 3;
- Adam: learning rate 1e-4 ... 0.3;
- K-FAC block-diagonal, automatic step with Levenberg–Marquardt adaptation
  (M&G §6–7): initial damping 1e-5 ... 10;
- K-FAC block-diagonal, fixed learning rate ``--kfac-lr`` with momentum 0.9, no
  adaptation: damping 1e-5 ... 10; and the same with KL clipping (Ba et al.
  2017, ``kl_clip=1e-3``).
Every run has the same budget (``--steps`` steps of ``--batch-size`` examples).

Two notions of a good value, both applied to the final training loss (mean
over seeds; a diverged run counts as infinitely bad):
- *relative*: at most ``--tolerance`` (default 2) times the best final loss
  the same method reached on its grid;
- *absolute*: at most ``--bar`` (default 2) times the best final loss of the
  reference method ``--reference`` (default tuned SGD): "as good as
  well-tuned SGD, up to a factor 2".
The *width* of a region is log10(largest / smallest good value) of the
contiguous good run around the method's best value (0: a single grid value;
empty when even the best value misses the bar).

Outputs in ``--out`` (default ``results/stability``): ``runs.csv`` (every run's
final loss), ``stability.csv`` / ``stability.md`` (good region per method),
``stability.png`` and ``stability.pdf``; ``--docs [DIR]`` copies them to ``DIR``.

Usage:
    python analysis/stability.py [--quick] [--problem digits_cnn] [--seeds 3] [--steps 100]
        [--batch-size 250] [--docs [DIR]]
"""

from __future__ import annotations

import argparse
import inspect
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import curvkit as ck
from curvkit.app import train as T


def _decades(lo: float, hi: float, step: float) -> tuple[float, ...]:
    n = round((math.log10(hi) - math.log10(lo)) / step)
    return tuple(float(f"{10 ** (math.log10(lo) + i * step):.3g}") for i in range(n + 1))


def sweeps(kfac_lr: float) -> dict:
    """``name -> (label, knob, grid, build(model, loss_func, value))``."""

    def kfac_auto(model, loss_func, damping):
        return ck.optim.KFAC(model, loss_func, damping=damping)

    def kfac_fixed(model, loss_func, damping):
        return ck.optim.KFAC(model, loss_func, lr=kfac_lr, momentum=0.9, damping=damping)

    def kfac_kl(model, loss_func, damping):
        return ck.optim.KFAC(
            model, loss_func, lr=kfac_lr, momentum=0.9, damping=damping, kl_clip=1e-3
        )

    dampings = _decades(1e-5, 10.0, 1.0)
    return {
        "sgd": ("SGD (Nesterov 0.9)", "learning rate", _decades(1e-3, 3.0, 0.5), None),
        "adam": ("Adam", "learning rate", _decades(1e-4, 0.3, 0.5), None),
        "kfac": ("K-FAC (auto, LM)", "initial damping", dampings, kfac_auto),
        "kfac-lr": (f"K-FAC (lr {kfac_lr:g})", "damping", dampings, kfac_fixed),
        "kfac-kl": (f"K-FAC (lr {kfac_lr:g}, KL clip)", "damping", dampings, kfac_kl),
    }


def good_region(values, losses, threshold: float) -> dict:
    """The contiguous run of grid values around the best whose loss is at most ``threshold``.

    Args:
        values: Grid values, increasing.
        losses: Mean final loss per value (``inf`` for diverged runs).
        threshold: Largest acceptable loss.

    Returns:
        ``lo``, ``hi``, ``width`` (decades) and ``good`` (count of grid values in
        the run); ``lo``, ``hi`` and ``width`` are ``nan`` when even the best value
        misses the threshold.
    """
    losses = np.asarray(losses, dtype=float)
    i = int(np.argmin(losses))
    if not losses[i] <= threshold:
        return {"lo": math.nan, "hi": math.nan, "width": math.nan, "good": f"0/{len(values)}"}
    ok = losses <= threshold
    lo = hi = i
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(values) - 1 and ok[hi + 1]:
        hi += 1
    return {
        "lo": values[lo],
        "hi": values[hi],
        "width": math.log10(values[hi] / values[lo]),
        "good": f"{hi - lo + 1}/{len(values)}",
    }


def regions_table(runs: pd.DataFrame, table: dict, tolerance: float, bar: float, reference: str):
    """Per method: best value, relative and absolute good regions (see the module docstring)."""
    means = {
        name: part.groupby("value")["final_loss"].mean()
        for name, part in runs.groupby("method", sort=False)
    }
    ref = reference if reference in means else next(iter(means))
    threshold = bar * float(means[ref].min())
    out = []
    for name, mean in means.items():
        values, losses = list(mean.index), list(mean.values)
        rel = good_region(values, losses, tolerance * float(mean.min()))
        absolute = good_region(values, losses, threshold)
        out.append(
            {
                "method": name,
                "label": table[name][0],
                "knob": table[name][1],
                "best": values[int(np.argmin(losses))],
                "best_loss": float(mean.min()),
                **{f"rel_{k}": v for k, v in rel.items()},
                "bar": threshold,
                **{f"abs_{k}": v for k, v in absolute.items()},
            }
        )
    return pd.DataFrame(out)


def plot(runs: pd.DataFrame, regions: pd.DataFrame, table: dict, path: Path, caption="") -> None:
    """Final loss against each method's knob (mean, min–max over seeds), good region shaded."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    from curvkit import plotting

    names = list(regions["method"])
    with mpl.rc_context(plotting.STYLE):
        fig = Figure(figsize=(2.6 * len(names), 3.0), layout="constrained")
        axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
        cap = 10 * runs.loc[np.isfinite(runs["final_loss"]), "final_loss"].max()
        for ax, name, color in zip(axes, names, plotting.PALETTE):
            label, knob, _, _ = table[name]
            part = runs[runs["method"] == name].copy()
            part["final_loss"] = part["final_loss"].clip(upper=cap)
            stats = part.groupby("value")["final_loss"]
            mean, lo, hi = stats.mean(), stats.min(), stats.max()
            ax.errorbar(mean.index, mean, yerr=[mean - lo, hi - mean], fmt="o-", color=color)
            region = regions.set_index("method").loc[name]
            if np.isfinite(region["abs_lo"]):
                lo, hi = region["abs_lo"] * 0.85, region["abs_hi"] / 0.85
                ax.axvspan(lo, hi, color=color, alpha=0.15, lw=0)
            ax.axhline(region["bar"], color="0.4", ls="--", lw=0.8)
            ax.set(xscale="log", yscale="log", xlabel=knob, title=label)
        axes[0].set_ylabel("final training loss (diverged: top)")
        if caption:
            fig.suptitle(caption, fontsize=8)
        plotting.save(fig, path)  # PNG and vector PDF


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="digits_cnn")
    parser.add_argument("--methods", default="sgd,adam,kfac,kfac-lr,kfac-kl")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--kfac-lr", type=float, default=0.03, help="lr of the fixed-lr K-FAC")
    parser.add_argument("--tolerance", type=float, default=2.0, help="relative: x own best")
    parser.add_argument("--bar", type=float, default=2.0, help="absolute: x reference's best")
    parser.add_argument("--reference", default="sgd", help="method whose best sets the bar")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 steps, 3-point grids")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/stability"))
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
        args.seeds, args.steps = 1, 5
    table = sweeps(args.kfac_lr)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    options = {"device": args.device}
    if "init" in inspect.signature(ck.problems.PROBLEMS[args.problem]).parameters:
        options["init"] = "sparse"
    problems = [ck.problems.get_problem(args.problem, seed=s, **options) for s in range(args.seeds)]
    print(f"{problems[0].description}: {problems[0].num_params:,} parameters")
    start = time.perf_counter()
    runs = []
    for name in names:
        label, knob, grid, build = table[name]
        if args.quick:
            grid = grid[:: max(1, len(grid) // 3)][:3]
        method = T.METHODS[name] if build is None else T.Method(label, build, False)
        for value in grid:
            for problem in problems:
                rows = T.train_run(
                    problem, name, value, args.steps, args.batch_size, problem.seed,
                    eval_every=args.steps, method=method,
                )  # fmt: skip
                final, seconds = T.final_loss(rows), rows[-1]["seconds"]
                runs.append(
                    dict(method=name, knob=knob, value=value, seed=problem.seed,
                         final_loss=final, seconds=seconds)
                )  # fmt: skip
            mean = np.mean([r["final_loss"] for r in runs[-len(problems) :]])
            print(f"{name:8s} {knob} {value:<8g} mean final loss {mean:.4g}", flush=True)
    runs = pd.DataFrame(runs)
    regions = regions_table(runs, table, args.tolerance, args.bar, args.reference)
    args.out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out / "runs.csv", index=False)
    regions.to_csv(args.out / "stability.csv", index=False)
    (args.out / "stability.md").write_text(T.markdown_table(regions.to_dict("records")) + "\n")
    ref = table[args.reference][0] if args.reference in table else args.reference
    caption = f"dashed: {args.bar:g} x the best final loss of {ref}; shaded: the good region"
    plot(runs, regions, table, args.out / "stability", caption)
    print(f"\ntotal {time.perf_counter() - start:.0f} s\n")
    print(T.markdown_table(regions.to_dict("records")))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for suffix in (".png", ".pdf"):
            shutil.copy(args.out / f"stability{suffix}", docs / f"stability{suffix}")
    return {"runs": runs, "regions": regions}


if __name__ == "__main__":
    main()
    sys.exit(0)
