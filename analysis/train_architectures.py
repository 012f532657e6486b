"""K-FAC against SGD and Adam on a ResNet with BatchNorm and a character transformer.

Questions:

a. ResNet with BatchNorm (``digits_resnet``: three stages of BasicBlock, 2,965
   parameters, scikit-learn's digits, 1500 training images): how many steps and
   seconds do ``ck.optim.KFAC`` (fixed learning rate, momentum 0.9), SGD with
   Nesterov momentum and Adam need to reach Adam's final training loss, and what
   test accuracy do they end with?
b. Decoder-only character transformer (``char_transformer``: 2 blocks, d = 64,
   context 64, 117,479 parameters, 512 training sequences of
   ``pydoc_data.topics``): training loss of K-FAC-expand, K-FAC-reduce and Adam
   against steps and seconds.

Protocol: every method sees the same mini-batches (``Problem.loader`` seeded
per run). Learning rates are tuned on seed 0 over a small grid (``GRIDS``, and
for K-FAC every lr with each damping of ``DAMPINGS``; the lowest final
training loss wins, ties to the smaller value), then every method
runs with its tuned value on ``--seeds`` seeds. The training loss is evaluated
on the whole training split every ``--eval-every`` steps, outside the timed
region (the models are in training mode: BatchNorm normalises with the
statistics of the whole split there); the time axis counts ``opt.step`` only.
Test accuracy (ResNet) and test loss are measured at the end in eval mode
(BatchNorm with its running statistics).

K-FAC runs only where ``ck.optim.KFAC`` can step the model: each K-FAC variant
is first tried for one step on a copy of the model; if that raises a curvkit
error, the variant is left out and the reason is written to ``missing.csv`` and
printed. The BatchNorm / LayerNorm / Embedding parameters, which have no
Kronecker factors, follow the optimiser's ``fallback`` rule (Adam).

Outputs in ``--out`` (default ``results/train_architectures``):
``<problem>_curves.csv``, ``<problem>_tuning.csv`` (the curves of the grid runs),
``<problem>_grid.csv`` (final loss per learning rate), ``<problem>_summary.csv``,
``<problem>_missing.csv`` and the figure ``arch_<problem>_curves.png/.pdf``;
``--docs DIR`` also copies summary, grid, missing (prefixed ``arch_``) and the
figures there.

Usage::

    python analysis/train_architectures.py [--problems resnet transformer] [--quick]
        [--seeds 3] [--steps N] [--threads 1] [--out DIR] [--docs docs/figures]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit import plotting
from curvkit.app import train as T
from curvkit.errors import CurvkitError

NAME = "train_architectures"

#: Learning-rate grids (tuned on seed 0).
GRIDS = {
    "resnet": {
        "sgd": (0.03, 0.1, 0.3, 1.0),
        "adam": (1e-3, 3e-3, 1e-2, 3e-2),
        "kfac-expand": (0.01, 0.03, 0.1),
        "kfac-reduce": (0.01, 0.03, 0.1),
    },
    "transformer": {
        "adam": (3e-3, 1e-2, 3e-2),
        "kfac-expand": (0.01, 0.03, 0.1),
        "kfac-reduce": (0.01, 0.03, 0.1),
    },
}
#: Steps, batch size and evaluation interval per problem (full, --quick).
SIZES = {
    "resnet": {"steps": 300, "batch": 128, "eval_every": 10},
    "transformer": {"steps": 250, "batch": 32, "eval_every": 25},
}
QUICK = {"steps": 6, "eval_every": 3}
#: Damping values tried with every K-FAC learning rate (fixed, no adaptation).
DAMPINGS = (1e-2, 1e-1)
LABELS = {
    "sgd": "SGD (Nesterov 0.9)",
    "adam": "Adam",
    "kfac-expand": "K-FAC-expand (lr + momentum 0.9)",
    "kfac-reduce": "K-FAC-reduce (lr + momentum 0.9)",
}


def build_problem(key: str, seed: int, quick: bool):
    """The built-in problem (small sizes for ``--quick``)."""
    if key == "resnet":
        if quick:
            return ck.problems.digits_resnet(seed=seed, width=2, n_train=128, n_test=64)
        return ck.problems.digits_resnet(seed=seed)
    if quick:
        return ck.problems.char_transformer(
            seed=seed, context=8, d_model=16, n_layers=1, n_heads=2, n_train=64, n_test=32
        )
    return ck.problems.char_transformer(seed=seed, n_train=512, n_test=256)


class Captured:
    """Method builders that keep the model each run trains, for the final test metrics."""

    def __init__(self):
        self.model = None

    def method(self, name: str, damping: float | None = None) -> T.Method:
        """A :class:`curvkit.app.train.Method` for ``name`` that records its model."""

        def build(model, loss_func, lr):
            self.model = model
            if name == "sgd":
                return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
            if name == "adam":
                return torch.optim.Adam(model.parameters(), lr=lr)
            return ck.optim.KFAC(model, loss_func, **kfac_options(name, lr, damping))

        return T.Method(LABELS[name], build, first_order=not name.startswith("kfac"))


def kfac_options(name: str, lr: float, damping: float | None = None) -> dict:
    """Keyword arguments of ``ck.optim.KFAC`` for ``kfac-expand`` or ``kfac-reduce``."""
    damping = DAMPINGS[0] if damping is None else damping
    return {"lr": lr, "momentum": 0.9, "damping": damping, "kfac_approx": name.split("-", 1)[1]}


def kfac_missing(problem, name: str) -> str | None:
    """``None`` if one step of the K-FAC variant runs on a copy of the model, else why not."""
    model = copy.deepcopy(problem.model)
    X, y = problem.train[0][:8], problem.train[1][:8]
    try:
        opt = ck.optim.KFAC(model, problem.loss_func, **kfac_options(name, 0.01))
        opt.step(lambda: problem.loss_func(model(X), y))
    except (CurvkitError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@torch.no_grad()
def test_metrics(model, problem) -> dict:
    """Test loss and (classification) accuracy in eval mode."""
    was = model.training
    model.eval()
    X, y = problem.test
    out = model(X)
    # classes on dim 1 for both: [N, C] images, [N, V, T] next-character logits
    res = {
        "test_loss": float(problem.loss_func(out, y)),
        "test_accuracy": float((out.argmax(1) == y).float().mean()),
    }
    model.train(was)
    return res


def run_problem(key: str, args, out: Path) -> dict[str, Path]:
    """Tune, train and summarise every method on one problem; returns the written files."""
    sizes = dict(SIZES[key], **(QUICK if args.quick else {}))
    if args.steps:
        sizes["steps"] = args.steps
    problem = build_problem(key, 0, args.quick)
    names, missing = [], []
    for name in GRIDS[key]:
        why = kfac_missing(problem, name) if name.startswith("kfac") else None
        if why is None:
            names.append(name)
        else:
            missing.append({"problem": key, "method": name, "reason": why})
            print(f"[{key}] {name} left out: {why[:300]}")
    tuning, finals_rows, best = [], [], {}
    for name in names:
        lrs = GRIDS[key][name][:2] if args.quick else GRIDS[key][name]
        dampings = (None,) if not name.startswith("kfac") else DAMPINGS[: 1 if args.quick else None]
        grid = [(lr, d) for lr in lrs for d in dampings]
        cap = Captured()
        finals = {}
        for lr, damping in grid:
            rows = T.train_run(
                problem, name, lr, sizes["steps"], sizes["batch"], 0, sizes["eval_every"],
                method=cap.method(name, damping),
            )  # fmt: skip
            finals[lr, damping] = T.final_loss(rows)
            finals_rows.append(
                {
                    "optimizer": name,
                    "lr": lr,
                    "damping": damping,
                    "final_train_loss": finals[lr, damping],
                }
            )
            tuning += rows
        best[name] = min(grid, key=lambda g: (finals[g], g[0], g[1] or 0.0))
        print(f"[{key}] {name}: final loss per (lr, damping) {finals} -> {best[name]}", flush=True)
    curves, tests = [], []
    for seed in range(args.seeds):
        problem = build_problem(key, seed, args.quick)
        for name in names:
            cap = Captured()
            t0 = time.perf_counter()
            rows = T.train_run(
                problem, name, best[name][0], sizes["steps"], sizes["batch"], seed,
                sizes["eval_every"], method=cap.method(name, best[name][1]),
            )  # fmt: skip
            curves += rows
            tests.append({"optimizer": name, "seed": seed, **test_metrics(cap.model, problem)})
            print(
                f"[{key}] seed {seed} {name}: final {T.final_loss(rows):.4g} "
                f"({time.perf_counter() - t0:.1f} s wall) {tests[-1]}",
                flush=True,
            )
    summary = T.summarize(curves, reference="adam")
    tests = pd.DataFrame(tests)
    agg = tests.groupby("optimizer", sort=False).agg(
        test_accuracy=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", lambda s: float(s.std(ddof=0))),
        test_loss=("test_loss", "mean"),
    )
    summary = summary.join(agg, on="optimizer")
    summary.insert(2, "damping", [best[n][1] for n in summary["optimizer"]])
    files = {
        "curves": out / f"{key}_curves.csv",
        "tuning": out / f"{key}_tuning.csv",
        "grid": out / f"{key}_grid.csv",
        "summary": out / f"{key}_summary.csv",
        "missing": out / f"{key}_missing.csv",
    }
    pd.DataFrame(curves).to_csv(files["curves"], index=False)
    pd.DataFrame(tuning).to_csv(files["tuning"], index=False)
    pd.DataFrame(finals_rows).to_csv(files["grid"], index=False)
    summary.to_csv(files["summary"], index=False)
    pd.DataFrame(missing, columns=["problem", "method", "reason"]).to_csv(
        files["missing"], index=False
    )
    title = {
        "resnet": f"{problem.name}: ResNet with BatchNorm ({problem.num_params:,} parameters)",
        "transformer": f"char_transformer ({problem.num_params:,} parameters)",
    }[key]
    fig = T.plot_curves(curves, title=title, labels=LABELS)
    from matplotlib.ticker import NullFormatter

    fig.axes[1].xaxis.set_minor_formatter(NullFormatter())  # overlapping minor labels
    files["figure"] = out / f"arch_{key}_curves.png"
    plotting.save(fig, files["figure"])
    print(summary.to_string(index=False))
    return files


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", default=["resnet", "transformer"], choices=list(GRIDS)
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="override the steps per run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", default=f"results/{NAME}")
    parser.add_argument("--docs", default=None, help="copy summaries and figures here")
    args = parser.parse_args(argv)
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds and --steps must be positive")
    return args


def main(argv=None) -> dict[str, dict[str, Path]]:
    """Run the comparison; returns the files written per problem."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    out = T.check_out_dir(Path(args.out))
    written = {}
    for key in args.problems:
        written[key] = run_problem(key, args, out)
        if args.docs:
            docs = T.check_out_dir(Path(args.docs), "--docs")
            for kind in ("summary", "grid", "missing"):
                shutil.copy(written[key][kind], docs / f"arch_{written[key][kind].name}")
            for ext in (".png", ".pdf"):
                src = written[key]["figure"].with_suffix(ext)
                shutil.copy(src, docs / src.name)
    return written


if __name__ == "__main__":
    main()
