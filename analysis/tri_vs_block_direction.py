r"""Progress per iteration of tri-diagonal and block-diagonal K-FAC steps from one state.

Question: experiment 1 finds the tri-diagonal structure saving 14–21% of the
iterations to Adam's loss, not the 25–40% M&G report. How much more does one
tri-diagonal step achieve than one block-diagonal step taken from the same
parameters, factors, damping and previous update?

One K-FAC run on the autoencoder with experiment 1's protocol (half width,
sigmoid, MSE, sparse initialisation, batch 250, automatic step, LM damping,
``min_damping`` 1e-6) keeps the cross factors and, at every inverse refresh,
builds both inverses from the same averaged factors and damping; it follows
one of them (``--follow``). Every ``--every`` steps both proposals are turned
into the update the optimiser would take (M&G §7: ``α``, ``μ`` from the exact
quadratic model of the batch, with the run's previous update) and scored by

- ``model_<s>``: the reduction of that quadratic model, :math:`-M(\delta)`;
- ``train_<s>``: the decrease of the loss on all 4000 training images,
  :math:`L(\theta) - L(\theta + \delta)`, the progress the iteration makes.

Outputs in ``--out`` (default ``results/tri_vs_block_direction``):
``steps.csv`` (one row per scored step), ``summary.md`` and the run's
``curve.csv``. The summary has, per phase of the run, the tri-diagonal over
the block-diagonal sum of ``model`` and of ``train``, how often the
tri-diagonal step made more progress, and how often either step raised the
training loss.

Usage:
    python analysis/tri_vs_block_direction.py [--follow block|tri] [--steps 300] [--every 3]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit.app import train as T
from curvkit.operators.kronecker import BlockDiagonalKFAC

STRUCTURES = ("block", "tri")


def instrument(opt, follow: str, every: int, train_data, rows: list) -> None:
    """Patch ``opt`` to hold both inverses, follow one, and score both every ``every`` steps."""
    pre, st = opt.preconditioner, opt.state["kfac"]
    tri_refresh = pre.refresh
    held = {}

    def refresh(damping, comm=None):
        tri_refresh(damping, comm)
        held["tri"] = pre.inverse
        block = BlockDiagonalKFAC(pre.layers, pre.A, pre.G, pre.bias_scale)
        held["block"] = block.inverse(damping=damping, damping_mode="factored")
        pre.inverse = held[follow]

    pre.refresh = refresh
    automatic = opt._automatic_update

    @torch.no_grad()
    def train_decrease(params, update) -> float:
        before = T.full_loss(opt.net, opt.loss_func, *train_data)
        opt._apply(params, update)
        after = T.full_loss(opt.net, opt.loss_func, *train_data)
        opt._apply(params, -update)
        return before - after

    def update(X, y, params, flat_g, proposal, Q=None):
        k = st["step"] + 1
        if k % every == 0:  # `proposal` is the followed inverse's; the other one only here
            props = {
                s: proposal if s == follow else -held[s].matmat(flat_g.unsqueeze(1)).squeeze(1)
                for s in STRUCTURES
            }
            row = dict(step=k, damping=st["damping"])
            saved = [p.detach().clone() for p in params]
            for s in STRUCTURES:
                delta, change = automatic(X, y, params, flat_g, props[s])
                row[f"model_{s}"] = -change
                row[f"train_{s}"] = train_decrease(params, delta)
            for p, q in zip(params, saved):  # undo round-off of the trial steps exactly
                p.data.copy_(q)
            rows.append(row)
        return automatic(X, y, params, flat_g, proposal, Q)

    opt._automatic_update = update


def summarize(table: pd.DataFrame, phases=(0, 30, 100, 200, 10**9)) -> pd.DataFrame:
    """Tri-diagonal over block-diagonal progress, summed over the scored steps of each phase."""
    out = []
    for lo, hi in zip(phases, phases[1:]):
        part = table[(table.step > lo) & (table.step <= hi)]
        if len(part):
            out.append(
                dict(
                    steps=f"{lo + 1}-{min(hi, int(table.step.max()))}",
                    scored=len(part),
                    loss_at_end=part.train_loss.iloc[-1],
                    model_ratio=part.model_tri.sum() / part.model_block.sum(),
                    train_ratio=part.train_tri.sum() / part.train_block.sum(),
                    tri_better=f"{(part.train_tri > part.train_block).mean():.0%}",
                    block_step_up=f"{(part.train_block < 0).mean():.0%}",
                    tri_step_up=f"{(part.train_tri < 0).mean():.0%}",
                )
            )
    return pd.DataFrame(out)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--follow", choices=STRUCTURES, default="block")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=3, help="score every k-th step")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-damping", type=float, default=1e-6)
    parser.add_argument("--quick", action="store_true", help="12 steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/tri_vs_block_direction"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = 12
    problem = ck.problems.get_problem("mnist_autoencoder_half", seed=args.seed, init="sparse")
    rows = []

    def build(model, loss_func, lr):
        opt = ck.optim.KFAC(
            model, loss_func, structure="tridiagonal", damping=1e-3, min_damping=args.min_damping
        )
        instrument(opt, args.follow, args.every, problem.train, rows)
        return opt

    method = T.Method(f"K-FAC following {args.follow}", build, False)
    curve = T.train_run(
        problem, args.follow, None, args.steps, args.batch_size, args.seed, 1, method=method
    )
    table = pd.DataFrame(rows)
    table["train_loss"] = [curve[k - 1]["train_loss"] for k in table.step]  # before the step
    summary = summarize(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "steps.csv", index=False)
    pd.DataFrame(curve).to_csv(args.out / "curve.csv", index=False)
    (args.out / "summary.md").write_text(
        f"following {args.follow}, batch {args.batch_size}, seed {args.seed}\n\n"
        + T.markdown_table(summary.round(4).to_dict("records"))
    )
    print(summary.round(3).to_string(index=False))
    return summary


if __name__ == "__main__":
    main()
