"""Cost of one-pass extraction relative to a plain forward+backward pass.

Question: what does ``curvkit.extract`` cost on top of the gradient, and how does
it compare with BackPACK's stock KFAC extension and curvlinops' KFAC factor build?

Setups: the Martens & Grosse MNIST autoencoder 784-1000-500-250-30-250-500-1000-784
(sigmoid, MSE, batch 128) and a small CNN (Conv2d-ReLU-MaxPool2d blocks, CE,
batch 64, 28x28 inputs). All methods are timed side by side in one run:
repetitions are interleaved and the median is reported, as a ratio to the median
of ``loss.backward()`` on the same model and batch.

Usage::

    python analysis/bench_extraction.py [--quick] [--device cpu|cuda] [--reps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

from curvkit.extraction import extract
from curvkit.timing import interleaved_times


def autoencoder() -> nn.Sequential:
    """784-1000-500-250-30-250-500-1000-784 with sigmoids (linear code and output layers)."""
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i not in (3, len(dims) - 2):
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    """Conv2d(1,16,3)-ReLU-MaxPool2d(2)-Conv2d(16,32,3)-ReLU-MaxPool2d(2)-Flatten-MLP."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def problems(device):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    X = torch.rand(128, 784, generator=gen)
    yield "MLP autoencoder b128", autoencoder().to(device), nn.MSELoss(), X.to(device), X.to(device)
    X = torch.rand(64, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    yield "CNN b64", cnn().to(device), nn.CrossEntropyLoss(), X.to(device), y.to(device)


def methods(model, loss_func, X, y):
    """Name -> zero-argument callable; each leaves ``.grad`` like a backward pass."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_func))

    def zero():
        model.zero_grad(set_to_none=True)

    def plain():
        zero()
        loss_func(model(X), y).backward()

    def curvkit(*quantities):
        def run():
            zero()
            extract(model, loss_func, X, y, quantities=quantities)

        return run

    def backpack_kfac():
        bp_model.zero_grad(set_to_none=True)
        with backpack(KFAC(mc_samples=1)):
            bp_loss(bp_model(X), y).backward()

    def curvlinops_kfac():
        K = KFACLinearOperator(
            model, loss_func, params, [(X, y)], fisher_type="mc", check_deterministic=False
        )
        K.compute_kronecker_factors()

    return {
        "autograd fwd+bwd": plain,
        "curvkit grad+kfac": curvkit("kfac"),
        "curvkit grad+kfac+cross": curvkit("kfac", "cross"),
        "curvkit grad+kflr": curvkit("kflr"),
        "curvkit grad+diag_ggn": curvkit("diag_ggn"),
        "curvkit grad+batch_grad": curvkit("batch_grad"),
        "BackPACK KFAC (mc=1)": backpack_kfac,
        "curvlinops KFAC build (mc)": curvlinops_kfac,
    }


def bench(fns: dict, reps: int, device) -> dict[str, float]:
    """Median seconds per function, interleaved (:func:`curvkit.timing.interleaved_times`)."""
    return interleaved_times(fns, reps, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (5 if args.quick else 30)
    warnings.filterwarnings("ignore", message="Full backward hook")
    print(f"device={device} threads={torch.get_num_threads()} reps={reps} (median, interleaved)")
    for title, model, loss_func, X, y in problems(device):
        medians = bench(methods(model, loss_func, X, y), reps, device)
        base = medians["autograd fwd+bwd"]
        print(f"\n{title}")
        print(f"{'method':30s} {'ms':>9s} {'ratio':>7s}")
        for name, t in medians.items():
            print(f"{name:30s} {1e3 * t:9.2f} {t / base:7.2f}x")
        extra = medians["curvkit grad+kfac+cross"] / medians["curvkit grad+kfac"] - 1
        print(f"cross factors add {100 * extra:+.1f}% to grad+kfac")


if __name__ == "__main__":
    main()
