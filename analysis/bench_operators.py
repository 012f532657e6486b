"""Cost of curvature-operator products, as multiples of one gradient.

Question: what does a product with each curvature operator cost, measured in
gradients (one forward + backward pass), side by side with curvlinops and a
plain double-backward Hessian-vector product?

Problems: the M&G MNIST autoencoder 784-1000-500-250-30-250-500-1000-784
(sigmoid, MSE, batch 128, D = 2.8M) and a small CNN (Conv2d(1,16,3)-ReLU-
MaxPool-Conv2d(16,32,3)-ReLU-MaxPool-Linear(800,128)-ReLU-Linear(128,10),
28x28 inputs, cross-entropy, batch 64). Random data: timings do not depend
on the values.

Method: every row is timed once per repetition, rows interleaved (so a slow
spell of the machine hits all rows alike); the table shows medians. Rows
marked "per column" multiply a [D, k] matrix and report time / k.

Rows are entries of ``ROWS``: ``(label, make, columns)`` where
``make(problem)`` does the set-up (building operators, outside the timing) and
returns the function to time. Append rows to compare more operators.

Usage:
    python analysis/bench_operators.py [--quick] [--device cuda] [--reps 11] [--threads 1]
        [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import curvkit as ck
from curvkit.timing import sync


@dataclass
class Problem:
    """A model, its loss and one batch."""

    name: str
    model: nn.Module
    loss_func: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    @property
    def params(self):
        """Trainable parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def dim(self):
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.params)


def mlp_autoencoder(device) -> Problem:
    torch.manual_seed(0)
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Sigmoid())
    X = torch.rand(128, 784, device=device)
    return Problem(
        "mlp-autoencoder-b128", nn.Sequential(*layers).to(device), nn.MSELoss(), X, X.clone()
    )


def small_cnn(device) -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    X = torch.randn(64, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    return Problem("cnn-b64", model.to(device), nn.CrossEntropyLoss(), X, y)


def _vector(p: Problem, columns: int = 1):
    gen = torch.Generator(device=p.X.device).manual_seed(1)
    shape = (p.dim,) if columns == 1 else (p.dim, columns)
    return torch.randn(*shape, generator=gen, device=p.X.device)


# -- rows -------------------------------------------------------------------------------


def make_gradient(p: Problem):
    return lambda: torch.autograd.grad(p.loss_func(p.model(p.X), p.y), p.params)


def make_double_backward_hvp(p: Problem):
    v = [torch.randn_like(q) for q in p.params]

    def run():
        g = torch.autograd.grad(p.loss_func(p.model(p.X), p.y), p.params, create_graph=True)
        return torch.autograd.grad(g, p.params, v)

    return run


def _ck(factory, columns=1, **kwargs):
    def make(p: Problem):
        op = factory(p.model, p.loss_func, (p.X, p.y), **kwargs)
        v = _vector(p, columns)
        return lambda: op @ v

    return make


def _curvlinops(name, **kwargs):
    def make(p: Problem):
        import curvlinops

        cls = getattr(curvlinops, name)
        op = cls(p.model, p.loss_func, p.params, [(p.X, p.y)], check_deterministic=False, **kwargs)
        v = _vector(p)
        return lambda: op @ v

    return make


#: (label, make, columns). The first row is the unit of the ratios.
ROWS = [
    ("gradient", make_gradient, 1),
    ("double-backward HVP (plain autograd)", make_double_backward_hvp, 1),
    ("ck.hessian matvec", _ck(ck.hessian), 1),
    ("curvlinops HessianLinearOperator matvec", _curvlinops("HessianLinearOperator"), 1),
    ("ck.ggn matvec", _ck(ck.ggn), 1),
    ("curvlinops GGNLinearOperator matvec", _curvlinops("GGNLinearOperator"), 1),
    ("ck.fisher(mc_samples=1) matvec", _ck(ck.fisher, mc_samples=1), 1),
    ("curvlinops FisherMCLinearOperator matvec", _curvlinops("FisherMCLinearOperator"), 1),
    ("ck.empirical_fisher matvec", _ck(ck.empirical_fisher), 1),
    ("ck.hessian matmat k=16 (per column)", _ck(ck.hessian, columns=16), 16),
    ("ck.ggn matmat k=16 (per column)", _ck(ck.ggn, columns=16), 16),
]


def bench(problem: Problem, rows, reps: int):
    device = problem.X.device
    fns = [(label, make(problem), cols) for label, make, cols in rows]
    times = {label: [] for label, _, _ in fns}
    peak = {}
    for label, fn, _ in fns:  # warm-up (and peak memory on CUDA)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        if device.type == "cuda":
            peak[label] = torch.cuda.max_memory_allocated(device) / 2**20
    for _ in range(reps):
        for label, fn, _ in fns:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[label].append(time.perf_counter() - start)
    unit = statistics.median(times[fns[0][0]])
    out = []
    for label, _, cols in fns:
        t = statistics.median(times[label]) / cols
        out.append(
            dict(
                problem=problem.name,
                row=label,
                ms=1e3 * t,
                ratio=t / unit,
                peak_mib=peak.get(label),
            )
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, no k=16 rows")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 11, quick 3)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (3 if args.quick else 11)
    rows = [r for r in ROWS if not (args.quick and r[2] > 1)]
    results = []
    for make_problem in (mlp_autoencoder, small_cnn):
        problem = make_problem(device)
        print(f"# {problem.name}: D = {problem.dim:,}, device {device}, {reps} reps", flush=True)
        results += bench(problem, rows, reps)
    print()
    print(
        "| problem | product | median ms | x gradient |"
        + (" peak MiB |" if device.type == "cuda" else "")
    )
    print("|---|---|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    for r in results:
        line = f"| {r['problem']} | {r['row']} | {r['ms']:.1f} | {r['ratio']:.2f} |"
        if device.type == "cuda":
            line += f" {r['peak_mib']:.0f} |"
        print(line)
    print(
        "\nMemory: no exact operator forms a D x D matrix (only to_dense() does); a product "
        "keeps one forward graph per batch and O(D k) vectors. For the autoencoder a dense "
        f"D x D float32 matrix would need {4 * mlp_dim() ** 2 / 2**40:.0f} TiB."
    )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)


def mlp_dim():
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


if __name__ == "__main__":
    main()
