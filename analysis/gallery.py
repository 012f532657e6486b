"""One figure of every kind that ``curvkit.plotting`` draws, on a tiny problem (under a minute).

Problem: scikit-learn's 8x8 digits (pixel values / 16, a seeded subset of
``--n`` images), a small CNN with nested module names, cross-entropy, float64::

    blocks.0.conv1  Conv2d(1, 4, 3)  + ReLU
    blocks.1.conv2  Conv2d(4, 4, 3)  + ReLU
    flatten, head   Linear(64, 10)

(D = 838 parameters), trained for ``--steps`` Adam steps; the curvature of the
trained network is computed on all ``--n`` images. Every matrix is small enough
to be dense, so exact spectra and exact per-layer blocks are available.

Figures (``gallery_*.png`` and vector ``gallery_*.pdf`` in ``--out``):
Kronecker factors per layer, per-layer spectra of KFLR against the exact GGN
blocks, an exact eigenvalue histogram (Hessian and GGN), comparison bars per
layer, preconditioning quality, SLQ densities, matrix heatmaps, per-block
errors, top eigenvalues, trace-estimator errors, curvature over training and a
loss landscape.

Usage::

    python analysis/gallery.py [--out docs/figures] [--n 200] [--steps 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import curvkit as ck
from curvkit import plotting
from curvkit.diagnostics.tracking import CurvatureTracker
from curvkit.operators.base import DenseOperator
from curvkit.operators.exact import loss_and_gradient

NAME = "gallery"


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded digits images ``[n, 1, 8, 8]`` (values / 16) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(seed))[:n]
    X = torch.as_tensor(data.data, dtype=torch.float64)[order].reshape(n, 1, 8, 8) / 16.0
    return X, torch.as_tensor(data.target)[order]


def model(seed: int) -> nn.Sequential:
    """The nested CNN of the module docstring (module names ``blocks.0.conv1`` ...)."""
    torch.manual_seed(seed)
    blocks = nn.Sequential(
        nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 4, 3), act1=nn.ReLU())),
        nn.Sequential(OrderedDict(conv2=nn.Conv2d(4, 4, 3), act2=nn.ReLU())),
    )
    net = nn.Sequential(OrderedDict(blocks=blocks, flatten=nn.Flatten(), head=nn.Linear(64, 10)))
    return net.double()


def train(net, loss_func, X, y, steps: int, seed: int, tracker=None) -> None:
    """Adam steps on mini-batches of 64 (the tracker records every ``tracker.every`` steps)."""
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        if tracker is not None:
            tracker.maybe_record(step, X, y)
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        opt.zero_grad()
        loss_func(net(X[idx]), y[idx]).backward()
        opt.step()
    for p in net.parameters():
        p.grad = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results") / NAME)
    parser.add_argument("--n", type=int, default=200, help="digits images")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.steps = 64, 20
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    X, y = digits(args.n, args.seed)
    net, loss_func = model(args.seed), nn.CrossEntropyLoss()
    data = (X, y)
    labels = plotting.layer_labels(net)
    written = {}

    def done(name, fig):
        written[name] = plotting.save(fig, out / f"gallery_{name}")

    # curvature over training (the tracker follows the Adam run)
    tracker = CurvatureTracker(
        net, loss_func, every=max(1, args.steps // 10), k=3, num_matvecs=30, seed=args.seed
    )
    train(net, loss_func, X, y, args.steps, args.seed, tracker)
    done("curvature_over_training", plotting.curvature_over_training(tracker.to_dataframe()))

    # operators and dense matrices of the trained network
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tri-diagonal: no conv cross factors
        ops = {
            "GGN": ck.ggn(net, loss_func, data),
            "KFLR": ck.kfac(net, loss_func, data, kind="kflr"),
            "tri-diag KFLR": ck.kfac(net, loss_func, data, kind="kflr", structure="tridiagonal"),
            "KFAC (MC)": ck.kfac(net, loss_func, data, kind="kfac", seed=args.seed),
            "diag GGN": ck.diag_ggn(net, loss_func, data),
            "EF": ck.empirical_fisher(net, loss_func, data),
        }
    dense = {k: op.to_dense() for k, op in ops.items()}
    dense = {k: (M + M.T) / 2 for k, M in dense.items()}
    H = ck.hessian(net, loss_func, data).to_dense()
    H = (H + H.T) / 2
    slices = [(label, s) for label, (_, s) in zip(labels, ops["GGN"].block_slices())]

    # Kronecker factors and per-layer spectra against the exact GGN blocks
    records = ck.extract(net, loss_func, X, y, quantities=("kflr",))
    for p in net.parameters():
        p.grad = None
    done("factor_heatmaps", plotting.factor_heatmaps(records, "kflr", title="KFLR factors"))
    exact_blocks = plotting.diagonal_blocks(dense["GGN"], slices)
    fig = plotting.layer_spectra(
        records, exact_blocks, approx_name="KFLR (G ⊗ A)", exact_name="GGN block", top=200,
        title="Per-layer spectra: Kronecker block against the exact block",
    )  # fmt: skip
    done("layer_spectra", fig)

    # exact spectra
    eig_h, eig_g = torch.linalg.eigvalsh(H), torch.linalg.eigvalsh(dense["GGN"])
    fig = plotting.eigenvalue_histogram(
        {"Hessian": eig_h, "GGN": eig_g}, title="Exact eigenvalues (dense eigvalsh)"
    )
    done("eigenvalue_histogram", fig)
    top = {"Hessian": eig_h}
    top.update({k: torch.linalg.eigvalsh(dense[k]) for k in ("GGN", "KFLR", "tri-diag KFLR")})
    fig = plotting.eigenvalue_ranks(top, top=20, title="Top-20 eigenvalues (dense)")
    done("eigenvalue_ranks", fig)
    slq = dict(num_probes=8, lanczos_steps=60, seed=args.seed)  # on the dense matrices
    densities = {
        "GGN": ck.spectral_density(DenseOperator(dense["GGN"]), log=True, **slq),
        "KFLR": ck.spectral_density(DenseOperator(dense["KFLR"]), log=True, **slq),
        "Hessian": ck.spectral_density(DenseOperator(H), **slq),
    }
    done("spectral_densities", plotting.spectral_densities(densities, title="SLQ densities"))

    # comparisons against the exact GGN
    names = [label for label, _ in slices]
    shapes = dict(param_shapes=ops["GGN"].param_shapes, block_sizes=ops["GGN"].block_sizes)
    reference = DenseOperator(dense["GGN"], block_names=names, **shapes)
    approx = {
        k: DenseOperator(M, block_names=names, **shapes)
        for k, M in dense.items()
        if k not in ("GGN",)
    }
    _, g = loss_and_gradient(net, loss_func, data)
    lam_max = float(eig_g.max())
    table = ck.compare(
        approx, reference, k=10, gradient=g, seed=args.seed, reference_name="GGN",
        damping_grid=[lam_max * r for r in (1e-4, 1e-3, 1e-2, 1e-1)],
    )  # fmt: skip
    fig = plotting.metric_bars(table, "frobenius", block=None, title="Against the exact GGN")
    done("metric_bars", fig)
    fig = plotting.metric_bars(table, "directional", directions=("eigvec_1", "eigvec_2",
                               "gradient"), title="Curvature along GGN eigenvectors")  # fmt: skip
    done("metric_bars_directional", fig)
    done("preconditioning", plotting.preconditioning_quality(table, title="Damped steps"))
    shown = {k: dense[k] for k in ("GGN", "KFLR", "KFAC (MC)")}
    done("heatmaps", plotting.heatmaps(shown, slices, title="Curvature matrices"))
    errors = {
        k: plotting.block_norms(dense[k], slices, reference=dense["GGN"])
        for k in ("KFLR", "KFAC (MC)", "EF")
    }
    fig = plotting.block_heatmap(errors, names=names, ncols=3, title="Per-block error vs GGN")
    done("block_heatmap", fig)

    # estimators and the loss landscape
    rows = []
    exact_trace = float(torch.trace(dense["GGN"]))
    for method in ("hutchinson", "hutch++", "xtrace"):
        for n in (12, 24, 48, 96):
            for seed in range(3):
                est = ck.trace(DenseOperator(dense["GGN"]), method=method, num_matvecs=n,
                               seed=seed)  # fmt: skip
                rows.append({"method": method, "matvecs": est.matvecs,
                             "error": abs(est.value - exact_trace) / exact_trace})  # fmt: skip
    done("estimator_error", plotting.estimator_error(rows, title="Trace of the GGN"))
    vals, vecs = torch.linalg.eigh(H)
    gen = torch.Generator().manual_seed(args.seed)
    directions = {
        "top Hessian eigenvector": vecs[:, -1],
        "gradient": g,
        "random 1": torch.randn(H.shape[0], generator=gen, dtype=H.dtype),
        "random 2": torch.randn(H.shape[0], generator=gen, dtype=H.dtype),
    }
    fig = plotting.loss_landscape(
        net, loss_func, data, directions, np.linspace(-1.0, 1.0, 21), title="Loss landscape"
    )
    done("loss_landscape", fig)
    wall = time.perf_counter() - start
    print(f"{len(written)} figures in {out} ({wall:.0f} s)")
    return {"figures": written, "table": table, "records": records, "wall": wall}


if __name__ == "__main__":
    main()
