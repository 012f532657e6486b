"""Cost of one K-FAC step next to an SGD step, and where the time goes.

Question: what does a K-FAC step cost, as a multiple of an SGD-with-momentum
step, for the block-diagonal and tri-diagonal inverses and for the automatic
(M&G §7) step with its GGN-vector products; and how does it compare with an
installable PyTorch K-FAC (ASDL, ``pip install asdfghjkl``)?

Problem: the M&G MNIST autoencoder (half width by default: 784-500-250-125-15
and mirror, 1.1M parameters; ``--full`` for 784-1000-500-250-30, 2.8M),
sigmoid, MSE, one batch of 1000 MNIST images, float32.

Settings shared by every K-FAC row: statistics every step (``T_cov=1``), one
MC label per example, inverses rebuilt every 20 steps (``T_inv=20``), factored
Tikhonov damping. The cost is amortised: each timed block is 20 consecutive
steps, so it holds exactly one inverse rebuild. Rows are interleaved (one block
of each row per repetition, so a slow spell of the machine hits all rows
alike) and the table shows the median over repetitions of the time per step.
Each block starts from the weights and optimiser state after the set-up step
(so every block replays the same steps; ASDL's own curvature averages, which
live outside the optimiser, carry over), so that no row trains long enough on
the one batch to diverge.
Every row trains its own copy of the same initial model on the same batch.

Targets: block-diagonal fixed-lr step <= 2.5x SGD; tri-diagonal <= 1.5x
block-diagonal; curvkit's block-diagonal step <= 1.0x ASDL's K-FAC step. One
more row takes the statistics from 1/8 of the batch (``stats_fraction``, a
common choice for large batches; the gradient still uses the whole batch), and
one uses EKFAC's eigenvalue correction (``ekfac=True``) instead of the factors'
eigenvalues.

ASDL 0.1a5 calls ``torch.cuda.nvtx.range`` unconditionally when it rebuilds
inverses, which raises on CPU builds of torch; on CPU this script replaces
that module attribute with a no-op context (the computation is unchanged).

Usage:
    python analysis/bench_optimizer.py [--quick] [--full] [--batch-size 1000] [--reps 5]
        [--block 20] [--device cuda] [--threads 2] [--out results/bench_optimizer]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit.app.train import markdown_table

LR = 1e-3
DAMPING = 1e-2


def _sgd(model, loss_func, X, y):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_func(model(X), y).backward()
        opt.step()

    return step, opt


def _kfac(**kwargs):
    def make(model, loss_func, X, y):
        opt = ck.optim.KFAC(model, loss_func, damping=DAMPING, T_cov=1, T_inv=20, **kwargs)
        return (lambda: opt.step(lambda: loss_func(model(X), y))), opt

    return make


def _asdl(model, loss_func, X, y):
    """ASDL's K-FAC (MC Fisher, one sample) preconditioning SGD with momentum."""
    import asdl.precondition.natural_gradient as asdl_ng
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig

    if not torch.cuda.is_available():  # see the module docstring
        asdl_ng.nvtx = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())
    config = PreconditioningConfig(
        data_size=X.shape[0],
        damping=DAMPING,
        curvature_upd_interval=1,
        preconditioner_upd_interval=20,
        ema_decay=0.05,
    )
    maker = KfacGradientMaker(model, config, fisher_type="fisher_mc", loss_type="mse")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, X)
        maker.setup_loss_call(loss_func, dummy, y)
        maker.forward_and_backward()
        opt.step()

    return step, opt


#: (label, make): ``make(model, loss_func, X, y) -> (step, optimiser or None)``.
#: The first row is the unit of the ratios.
ROWS = [
    ("SGD momentum", _sgd),
    ("K-FAC block-diag, fixed lr", _kfac(lr=LR, momentum=0.9)),
    ("K-FAC tri-diag, fixed lr", _kfac(lr=LR, momentum=0.9, structure="tridiagonal")),
    (
        "K-FAC block-diag, fixed lr, stats 1/8 batch",
        _kfac(lr=LR, momentum=0.9, stats_fraction=1 / 8),
    ),
    ("K-FAC block-diag, automatic (M&G §7)", _kfac()),
    ("EKFAC block-diag, fixed lr", _kfac(lr=LR, momentum=0.9, ekfac=True)),
    ("ASDL K-FAC block-diag, fixed lr", _asdl),
]


#: (what, numerator row, denominator row, bound) of the ratios the benchmark checks.
TARGETS = [
    ("block-diag fixed lr / SGD", "K-FAC block-diag, fixed lr", "SGD momentum", 2.5),
    ("tri-diag / block-diag", "K-FAC tri-diag, fixed lr", "K-FAC block-diag, fixed lr", 1.5),
    (
        "curvkit / ASDL block-diag",
        "K-FAC block-diag, fixed lr",
        "ASDL K-FAC block-diag, fixed lr",
        1.0,
    ),
]


def available(label: str) -> str | None:
    """``None`` when the row can run, else why not."""
    if label.startswith("ASDL"):
        try:
            import asdl.precondition  # noqa: F401
        except ImportError as err:
            return f"ASDL is not installed ({err}); pip install --no-deps asdfghjkl"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-width autoencoder (2.8M)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=None, help="timed blocks (default 5)")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block (>= 20)")
    parser.add_argument("--quick", action="store_true", help="batch 250, 2 blocks of 20 steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("results/bench_optimizer"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook")
    batch = 250 if args.quick else args.batch_size
    reps = args.reps or (2 if args.quick else 5)
    device = torch.device(args.device)
    name = "mnist_autoencoder" if args.full else "mnist_autoencoder_half"
    problem = ck.problems.get_problem(name, seed=0, device=device)
    X, y = problem.batch(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rows = []
    for label, make in ROWS:
        why = available(label)
        if why:
            print(f"skipped: {label}: {why}")
            continue
        model = copy.deepcopy(problem.model)
        step, opt = make(model, problem.loss_func, X, y)
        step()  # set-up, first statistics and first inverse: not timed
        if hasattr(opt, "timers"):
            opt.timers.clear()
        start = copy.deepcopy((model.state_dict(), opt.state_dict()))
        rows.append(
            {"label": label, "step": step, "opt": opt, "times": [], "model": model, "start": start}
        )
    print(
        f"{problem.description}, {problem.num_params:,} params, batch {batch}, {device}, "
        f"{torch.get_num_threads()} threads; {reps} blocks of {args.block} steps per row"
    )
    for _ in range(reps):
        for row in rows:
            # every block replays the same steps from the same weights and optimiser
            # state, so that a long run on one batch cannot drift into divergence
            weights, opt_state = copy.deepcopy(row["start"])
            row["model"].load_state_dict(weights)
            row["opt"].load_state_dict(opt_state)
            sync()
            start = time.perf_counter()
            for _ in range(args.block):
                row["step"]()
            sync()
            row["times"].append((time.perf_counter() - start) / args.block)

    unit = statistics.median(rows[0]["times"])
    bd = next((r for r in rows if r["label"].startswith("K-FAC block-diag, fixed")), None)
    table, phases = [], []
    for row in rows:
        t = statistics.median(row["times"])
        entry = {"step": row["label"], "ms per step": 1e3 * t, "x SGD": t / unit}
        if bd is not None:
            entry["x K-FAC block-diag"] = t / statistics.median(bd["times"])
        table.append(entry)
        if hasattr(row["opt"], "timers"):
            n = reps * args.block
            phases.append(
                {"step": row["label"], **{k: 1e3 * v / n for k, v in row["opt"].timers.items()}}
            )
    print("\nmedian time per step (amortised over blocks of", args.block, "steps)")
    print(markdown_table(table))
    median = {r["label"]: statistics.median(r["times"]) for r in rows}
    targets = []
    for what, num, den, bound in TARGETS:
        if num in median and den in median:
            ratio = median[num] / median[den]
            verdict = "met" if ratio <= bound else "missed"
            targets.append(
                {"ratio": what, "value": ratio, "target": f"<= {bound}", "verdict": verdict}
            )
    print("\ntargets")
    print(markdown_table(targets))
    print("\nper-phase time (ms per step, mean over the timed steps, from opt.timers)")
    print(markdown_table(phases))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_optimizer.md").write_text(
        "\n\n".join(markdown_table(t) for t in (table, targets, phases) if t) + "\n"
    )
    frame = pd.DataFrame(table)
    if phases:
        frame = frame.merge(pd.DataFrame(phases), on="step", how="left")
    frame.to_csv(args.out / "bench_optimizer.csv", index=False)
    print(f"\nwrote {args.out}/bench_optimizer.md and bench_optimizer.csv")
    return {"table": table, "phases": phases, "targets": targets}


if __name__ == "__main__":
    main()
    sys.exit(0)
