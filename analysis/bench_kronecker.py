"""Timings of the Kronecker operators, as ratios to one gradient.

Question: what do the block-diagonal and tri-diagonal K-FAC inverses cost to
build and to apply, next to a plain gradient and to curvlinops' cached
``KFACInverseLinearOperator``? Targets: tri-diagonal inverse build and apply at
most 3x the block-diagonal ones.

Rows (median of ``--repeats`` runs, seconds and ratio to one forward+backward):
extraction of the factors (with and without cross factors), inverse build
(eigendecompositions; tri-diagonal: chain and generalised eigenproblems) and
inverse apply to one vector, for curvkit and curvlinops (same damping modes;
the apply rows are interleaved, one product of each per repetition).

Usage:
    python analysis/bench_kronecker.py --problems mnist_autoencoder mnist_cnn \
        --batch-sizes 128 64 --threads 2 --out results/bench_kronecker.csv
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import torch
from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

import curvkit as ck
from curvkit.operators.kronecker import BlockDiagonalKFAC, extract_batches
from curvkit.operators.tridiag import TriDiagonalKFAC
from curvkit.timing import interleaved_times, median_time


def bench_problem(name: str, batch_size: int, damping: float, repeats: int, device) -> list[dict]:
    problem = ck.problems.get_problem(name, seed=0, device=device)
    model, loss_func = problem.model, problem.loss_func
    X, y = problem.batch(batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), device=device)
    rows = []

    def row(what, seconds, reference=None):
        rows.append({"problem": name, "batch": batch_size, "what": what, "seconds": seconds})
        if reference is not None:
            rows[-1]["ratio"] = seconds / reference

    def gradient():
        model.zero_grad()
        loss_func(model(X), y).backward()

    grad_t, _ = median_time(gradient, repeats, device)
    row("gradient (forward + backward)", grad_t, grad_t)

    kind = "kfac"
    extract = {
        "block-diagonal": (kind,),
        "tridiagonal": (kind, "cross"),
    }
    records = {}
    for structure, quantities in extract.items():
        t, _ = median_time(
            lambda q=quantities: records.__setitem__(
                q, extract_batches(model, loss_func, (X, y), q)
            ),
            repeats,
            device,
        )
        row(f"extract factors ({structure})", t, grad_t)

    block = BlockDiagonalKFAC.from_records(records[extract["block-diagonal"]], kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conv pairs fall back, by design
        tri = TriDiagonalKFAC.from_records(records[extract["tridiagonal"]], kind)

    builds = {
        "block-diagonal exact": lambda: BlockDiagonalKFAC(
            block.layers, block.A, block.G, block.bias_scale
        ).inverse(damping, "exact"),
        "block-diagonal factored": lambda: BlockDiagonalKFAC(
            block.layers, block.A, block.G, block.bias_scale
        ).inverse(damping, "factored"),
        "tridiagonal": lambda: TriDiagonalKFAC(
            tri.layers, tri.A, tri.G, tri.cross_A, tri.cross_G
        ).inverse(damping),
    }
    inverses = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, build in builds.items():

            def build_into(b=build, k=label):
                inverses[k] = b()

            t, _ = median_time(build_into, repeats, device)
            row(f"inverse build, curvkit {label}", t, grad_t)
    applies = {f"curvkit {label}": inv for label, inv in inverses.items()}
    ref = KFACLinearOperator(
        model, loss_func, params, [(X, y)], fisher_type="mc", check_deterministic=False,
        separate_weight_and_bias=False,
    )  # fmt: skip
    ref.compute_kronecker_factors()
    for label, opts in {
        "exact": dict(use_exact_damping=True),
        "factored": dict(use_heuristic_damping=True),
    }.items():
        inv = KFACInverseLinearOperator(ref, damping=damping, **opts)
        inv @ v  # computes and caches the factor inverses
        applies[f"curvlinops {label} (cached)"] = inv
    products = {label: (lambda op=op: op @ v) for label, op in applies.items()}
    for label, t in interleaved_times(products, repeats, device).items():
        row(f"inverse apply, {label}", t, grad_t)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["mnist_autoencoder", "mnist_cnn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 64])
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results/bench_kronecker.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = []
    for name, batch in zip(args.problems, args.batch_sizes):
        rows.extend(bench_problem(name, batch, args.damping, args.repeats, device))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["problem", "batch", "what", "seconds", "ratio"])
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        ratio = r.get("ratio", float("nan"))
        print(
            f"{r['problem']:>18} b{r['batch']:<4} {r['what']:<48} "
            f"{r['seconds'] * 1e3:9.2f} ms  {ratio:7.2f}x"
        )
    by = {(r["problem"], r["what"]): r["seconds"] for r in rows}
    for name in args.problems:
        for mode in ("exact", "factored"):
            apply_ratio = (
                by[(name, "inverse apply, curvkit tridiagonal")]
                / by[(name, f"inverse apply, curvkit block-diagonal {mode}")]
            )
            build_ratio = (
                by[(name, "inverse build, curvkit tridiagonal")]
                / by[(name, f"inverse build, curvkit block-diagonal {mode}")]
            )
            print(
                f"{name}: tri-diagonal / block-diagonal {mode}: "
                f"apply {apply_ratio:.2f}x, build {build_ratio:.2f}x"
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
