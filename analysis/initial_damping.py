"""Which initial damping should the automatic K-FAC step start from?

Question: with M&G's automatic step (§7) and Levenberg–Marquardt adaptation
(§6.5), which initial damping ``λ₀`` trains every built-in problem, and which
diverges? The LM rule changes ``λ`` by at most ``(19/20)`` per step, so a start
that is far too small is not caught in time, and one that is too large is
paid for with slow early progress.

Problems: the built-in classification problems (``digits_mlp``,
``digits_cnn``, ``mnist1d_mlp``, ``mnist_cnn``; cross-entropy) and the
half-width M&G autoencoder (MSE). Protocol: K-FAC block-diagonal with the
library's defaults except ``damping``; ``--steps`` steps of shuffled
mini-batches of ``--batch-size`` (the same sequence for every ``λ₀``; the
autoencoder gets ``--ae-steps`` steps of 250, because it needs longer to leave
its plateau); seed 0. A run diverges when its batch loss exceeds 1e6 or is
not finite.

Output: a markdown table (mean batch loss over the last 10 steps per problem
and ``λ₀``) on stdout and in ``--out`` (``initial_damping.csv``/``.md``).

Usage:
    python analysis/initial_damping.py [--damping 1e-3 1e-2 1e-1] [--steps 60]
        [--ae-steps 300 (0: skip)] [--problems ...] [--min-damping 1e-6] [--quick]
        [--device cuda] [--threads 1]
        [--out results/initial_damping]
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit.app.train import markdown_table

CLASSIFIERS = ("digits_mlp", "digits_cnn", "mnist1d_mlp", "mnist_cnn")
AUTOENCODER = "mnist_autoencoder_half"


def run(problem, batches, damping: float, **options) -> dict:
    """Train a copy of the problem's model; mean loss of the last 10 steps, or divergence."""
    model, loss_func = copy.deepcopy(problem.model), problem.loss_func
    opt = ck.optim.KFAC(model, loss_func, damping=damping, **options)
    losses = []
    for X, y in batches:
        loss = float(opt.step(lambda X=X, y=y: loss_func(model(X), y)))
        losses.append(loss)
        if not math.isfinite(loss) or loss > 1e6:
            return {"diverged_at": len(losses), "final": math.inf}
    tail = losses[-10:]
    return {"diverged_at": None, "final": sum(tail) / len(tail)}


def mini_batches(problem, batch_size: int, steps: int) -> list:
    """``steps`` shuffled mini-batches (new permutation per epoch, seeded)."""
    out, epoch = [], 0
    while len(out) < steps:
        out += problem.batches(batch_size, shuffle=True, seed=epoch)
        epoch += 1
    return out[:steps]


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(CLASSIFIERS))
    parser.add_argument("--damping", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ae-steps", type=int, default=300)
    parser.add_argument("--min-damping", type=float, default=None, help="default: KFAC's")
    parser.add_argument("--quick", action="store_true", help="10 steps, 20 autoencoder steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/initial_damping"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.ae_steps = 10, min(args.ae_steps, 20)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook")
    rows = []
    plan = [(name, args.batch_size, args.steps) for name in args.problems]
    if args.ae_steps:
        plan.append((AUTOENCODER, 250, args.ae_steps))
    for name, batch_size, steps in plan:
        problem = ck.problems.get_problem(name, seed=0, device=args.device)
        batches = mini_batches(problem, batch_size, steps)
        row = {"problem": f"{name} ({steps} steps of {batch_size})"}
        for damping in args.damping:
            options = {} if args.min_damping is None else {"min_damping": args.min_damping}
            result = run(problem, batches, damping, **options)
            cell = (
                f"diverged at step {result['diverged_at']}"
                if result["diverged_at"]
                else round(result["final"], 4)
            )
            row[f"λ₀ = {damping:g}"] = cell
        rows.append(row)
        print(row, flush=True)
    table = markdown_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "initial_damping.csv", index=False)
    (args.out / "initial_damping.md").write_text(table + "\n")
    return frame


if __name__ == "__main__":
    main()
