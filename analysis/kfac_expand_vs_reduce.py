"""K-FAC for convolutions: "expand" or "reduce", which is closer to the exact GGN?

Question (Grosse & Martens 2016, KFC; Eschenhagen et al. 2023,
arXiv:2311.00636): a convolution shares its weights over the output locations
:math:`t`. K-FAC-expand treats every location as an example (patch outer
products summed over :math:`t`, output gradients averaged), K-FAC-reduce
averages the patches and sums the gradients over :math:`t` before the outer
products. Eschenhagen et al. show that each is exact in its own setting of
linear weight-sharing layers; for a CNN both are approximations. Per layer,
how far is each from the exact GGN block, at initialisation and after
training, with the exact G (KFLR) and with one Monte Carlo label (KFAC)?

Problem: ``digits_cnn`` (Conv2d(1, 8, 3)-ReLU-MaxPool-Conv2d(8, 16, 3)-ReLU-
MaxPool-Linear(64, 10) on 8x8 digits, D = 1898), float64, curvature on the
first ``--n`` training images (default 1000); ``--problem mnist_cnn`` runs the
28x28 CNN (D = 20,522; its 16,448-parameter linear block is too large to
densify and is left out). Each layer's exact GGN block comes from the GGN
restricted to that layer's parameters, its K-FAC block from the block-diagonal
operator; both are compared with :func:`curvkit.compare` (dense). The Linear
layer has no weight sharing, so there expand and reduce must coincide.

Outputs (in ``--out``): ``metrics.csv`` (every compare row, per layer, kind,
approximation and checkpoint), ``timings.csv`` (factor extraction time of each
variant), ``training.csv``, figures ``conv_*.png`` and ``conv_*.pdf``.

Usage::

    python analysis/kfac_expand_vs_reduce.py [--quick] [--out DIR] [--seed 0]
        [--problem digits_cnn] [--n 1000] [--steps 500] [--threads 1] [--docs [DIR]]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import curvkit as ck
from curvkit import plotting
from curvkit.diagnostics.metrics import BlockView
from curvkit.operators.base import DenseOperator
from curvkit.operators.exact import loss_and_gradient

NAME = "kfac_expand_vs_reduce"
KINDS = {"KFLR": {"kind": "kflr"}, "KFAC": {"kind": "kfac", "mc_samples": 1}}
APPROX = ("expand", "reduce")


def train(problem, steps: int, lr: float, seed: int) -> list[dict]:
    """Adam on mini-batches of 64; logs the training loss and test accuracy."""
    model, loss_func = problem.model, problem.loss_func
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log, step = [], 0

    def record():
        with torch.no_grad():
            X, y = problem.train
            Xt, yt = problem.test
            acc = float((model(Xt).argmax(1) == yt).double().mean())
            log.append({"step": step, "train_loss": float(loss_func(model(X), y)), "test_acc": acc})

    record()
    while step < steps:
        for X, y in problem.loader(batch_size=64, seed=seed + step):
            opt.zero_grad()
            loss_func(model(X), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    record()
    for p in model.parameters():
        p.grad = None
    return log


def layers(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the parametrised layers, in forward order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]


def analyse(tag, problem, data, args, out: Path) -> tuple[list, list]:
    model, loss_func = problem.model, problem.loss_func
    ops, timing = {}, []
    for kind, options in KINDS.items():
        for approx in APPROX:
            seconds = []
            for _ in range(3):  # the first build also pays one-time set-up costs
                t0 = time.perf_counter()
                op = ck.kfac(model, loss_func, data, kfac_approx=approx, seed=args.seed, **options)
                seconds.append(time.perf_counter() - t0)
            ops[f"{kind} {approx}"] = op
            timing.append(
                {"checkpoint": tag, "approx": f"{kind} {approx}", "build_s": sorted(seconds)[1]}
            )
    _, g = loss_and_gradient(model, loss_func, data)
    first = next(iter(ops.values()))
    frames, heat = [], {}
    named = layers(model)
    for (lname, module), (_, s) in zip(named, first.block_slices()):
        size = s.stop - s.start
        label = f"{type(module).__name__} {lname} ({size})"
        if size > args.block_max:
            print(f"[{tag}] {label}: more than --block-max parameters, left out.", file=sys.stderr)
            continue
        params = [p for p in module.parameters() if p.requires_grad]
        B = ck.ggn(model, loss_func, data, params=params).to_dense()
        B = (B + B.T) / 2
        shapes = [torch.Size([size])]
        lam_max = float(torch.linalg.eigvalsh(B).max())
        blocks = {name: BlockView(op, s).to_dense() for name, op in ops.items()}
        for name, A in blocks.items():
            ratio = float(torch.trace(A) / torch.trace(B))
            trace_ratio = pd.DataFrame(
                [{"approx": name, "reference": "GGN", "metric": "trace_ratio", "value": ratio}]
            )
            df = ck.compare(
                {name: DenseOperator(A, shapes)},
                DenseOperator(B, shapes),
                k=min(10, size),
                damping_grid=[lam_max * r for r in (1e-3, 1e-2, 1e-1)],
                gradient=g[s],
                blocks=False,
                seed=args.seed,
                reference_name="GGN",
            )
            frames.append(
                pd.concat([df, trace_ratio], ignore_index=True).assign(
                    block=label,
                    layer=lname,
                    checkpoint=tag,
                    size=size,
                    kind=name.split()[0],
                    kfac_approx=name.split()[1],
                )
            )
        print(f"[{tag}] {label}: compared", file=sys.stderr, flush=True)
        if isinstance(module, torch.nn.Conv2d) and size >= 100:
            heat[f"{lname} ({type(module).__name__})"] = {
                "exact GGN": B,
                "KFLR expand": blocks["KFLR expand"],
                "KFLR reduce": blocks["KFLR reduce"],
            }
    for label, mats in heat.items():
        safe = label.split()[0]
        plotting.heatmaps(
            mats,
            title=f"{label}, {tag}: exact GGN block vs KFLR",
            path=out / f"conv_heatmaps_{safe}_{tag}",
        )
    return frames, timing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / NAME)
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problem", default="digits_cnn", help="digits_cnn, mnist_cnn, tiny_cnn")
    parser.add_argument("--n", type=int, default=1000, help="examples for the curvature")
    parser.add_argument("--steps", type=int, default=500, help="Adam steps before checkpoint 2")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--block-max", type=int, default=4000, help="largest block densified")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--docs", nargs="?", const="docs/figures", default=None, help="copy figures there"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.problem, args.n, args.steps = "tiny_cnn", 32, 20
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    problem = ck.problems.get_problem(args.problem, seed=args.seed, dtype=torch.float64)
    X, y = problem.train
    data = (X[: args.n], y[: args.n])
    start = time.perf_counter()
    frames, timing = analyse("init", problem, data, args, out)
    log = train(problem, args.steps, args.lr, args.seed)
    more, more_t = analyse("trained", problem, data, args, out)
    wall = time.perf_counter() - start
    metrics = pd.concat(frames + more, ignore_index=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    timings = pd.DataFrame(timing + more_t)
    timings.to_csv(out / "timings.csv", index=False)
    pd.DataFrame(log).to_csv(out / "training.csv", index=False)

    # layers labelled by module name and type, e.g. "trained: 3 (Conv2d)"
    kind = metrics["block"].str.split().str[0]
    shown = metrics.assign(
        block=metrics["checkpoint"] + ": " + metrics["layer"] + " (" + kind + ")"
    )
    for metric in ("frobenius", "cosine", "overlap"):
        plotting.metric_bars(
            shown,
            metric=metric,
            block=None,
            title="K-FAC expand and reduce vs the exact GGN block, per layer",
            path=out / f"conv_{metric}",
        )
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for f in sorted([*out.glob("conv_*.png"), *out.glob("conv_*.pdf")]):
            shutil.copy(f, docs / f.name)
    summary = _summary(metrics, timings, log, problem, data[0].shape[0], args, wall)
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    return {"metrics": metrics, "timings": timings, "wall": wall}


def _summary(metrics, timings, log, problem, n, args, wall) -> str:
    lines = [
        f"{problem.name} (D = {problem.num_params}), curvature on {n} examples; "
        f"test accuracy {log[0]['test_acc']:.3f} -> {log[-1]['test_acc']:.3f} after "
        f"{args.steps} Adam steps; wall {wall:.0f} s",
        "",
    ]
    for metric in ("frobenius", "cosine", "overlap", "trace_ratio"):
        part = metrics[metrics["metric"] == metric]
        table = part.pivot_table(
            index=["checkpoint", "block"],
            columns=["kind", "kfac_approx"],
            values="value",
            sort=False,
        )
        lines += [f"{metric} vs the exact GGN block:", table.to_string(float_format="%.4f"), ""]
    pre = metrics[(metrics["metric"] == "precond_reduction") & (metrics["checkpoint"] == "trained")]
    table = pre.pivot_table(
        index=["block", "damping"], columns=["kind", "kfac_approx"], values="value", sort=False
    )
    lines += [
        "model reduction ratio of the damped step (trained):",
        table.to_string(float_format="%.4f"),
        "",
    ]
    t = timings.groupby("approx")["build_s"].median()
    lines += [
        "factor extraction time [s] (median of 3 builds, median over checkpoints):",
        t.to_string(float_format="%.4f"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
