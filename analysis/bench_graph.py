"""Cost of the graph extraction path (any ``nn.Module``) against the chain sweep and the peers.

Questions:

1. On a chain both paths support (the M&G autoencoder, batch 128), what does the
   graph path cost for the gradient + Monte Carlo K-FAC factors, as a ratio to
   the chain sweep?
2. On a ResNet-18-style CNN (batch 32, 3x32x32, widths 32-256, BatchNorm) and on a
   decoder-only transformer (batch 16, context 128), what does gradient + K-FAC
   cost against curvlinops' ``KFACLinearOperator`` factor build plus a gradient?
3. Per-example gradients on the autoencoder: curvkit against BackPACK's
   ``BatchGrad`` and ``torch.func.vmap(grad)``.

All methods of one setup are timed side by side in one run (interleaved
repetitions, medians) and reported as ratios to a plain forward+backward.

Usage::

    python analysis/bench_graph.py [--quick] [--threads 1] [--reps 5] [--setups ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extraction import autoencoder  # noqa: E402

from curvkit.extraction import extract
from curvkit.problems.architectures import BasicBlock, CharTransformer


class ResNet18Style(nn.Module):
    """ResNet-18 layout (stem, 4 stages of 2 BasicBlocks, strides 1-2-2-2) at widths w..8w."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stages += [BasicBlock(c, w, stride=1 if i == 0 else 2), BasicBlock(w, w)]
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        """Logits ``[N, num_classes]``."""
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class FlatLogits(nn.Module):
    """The transformer with logits ``[N*T, V]`` (curvlinops' KFAC takes 2-D outputs)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        """Logits ``[N*T, V]``."""
        out = self.net(x)
        return out.transpose(1, 2).reshape(-1, out.shape[1])


def setups(names, tiny: bool = False):
    """``(key, title, model, loss_func, X, y)`` of each setup (``tiny``: smoke-test sizes)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if "autoencoder" in names:
        X = torch.rand(8 if tiny else 128, 784, generator=gen)
        title = f"M&G autoencoder b{X.shape[0]} (chain)"
        yield "autoencoder", title, autoencoder(), nn.MSELoss(), X, X
    if "resnet" in names:
        N, side, width = (4, 8, 4) if tiny else (32, 32, 32)
        X = torch.randn(N, 3, side, side, generator=gen)
        y = torch.randint(0, 10, (N,), generator=gen)
        title = f"ResNet-18-style CNN b{N}"
        yield "resnet", title, ResNet18Style(width), nn.CrossEntropyLoss(), X, y
    if "transformer" in names:
        N, T, V, d = (2, 8, 96, 16) if tiny else (16, 128, 96, 128)
        X = torch.randint(0, V, (N, T), generator=gen)
        y = torch.randint(0, V, (N * T,), generator=gen)
        model = FlatLogits(CharTransformer(V, T, d_model=d, n_layers=2, n_heads=4))
        title = f"transformer b{N} T={T} (d={d}, 2 blocks)"
        yield "transformer", title, model, nn.CrossEntropyLoss(), X, y


def methods(key, model, loss_func, X, y):
    """Name -> zero-argument callable; each leaves ``.grad`` like a backward pass."""
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]

    def zero():
        model.zero_grad(set_to_none=True)

    def plain():
        zero()
        loss_func(model(X), y).backward()

    def curvkit(backend, *quantities, **kwargs):
        def run():
            zero()
            extract(model, loss_func, X, y, quantities=quantities, backend=backend, **kwargs)

        return run

    fns = {"autograd fwd+bwd": plain}
    if key == "autoencoder":
        fns["sweep grad+kfac"] = curvkit("sweep", "kfac")
        fns["graph grad+kfac"] = curvkit("graph", "kfac")
        fns["sweep grad+batch_grad"] = curvkit("sweep", "batch_grad")
        fns["graph grad+batch_grad"] = curvkit("graph", "batch_grad")
        fns.update(per_example_peers(model, loss_func, X, y))
        return fns
    kfac_params = [
        p
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for p in m.parameters()
        if p.requires_grad
    ]

    def curvlinops_kfac():
        plain()  # the gradient
        K = KFACLinearOperator(
            model, loss_func, kfac_params, [(X, y)], fisher_type="mc", check_deterministic=False
        )
        K.compute_kronecker_factors()

    fns["graph grad+kfac"] = curvkit("graph", "kfac", unsupported="gradient")
    fns["graph grad+kfac (reduce)"] = curvkit(
        "graph", "kfac", unsupported="gradient", kfac_approx="reduce"
    )
    fns["curvlinops grad + KFAC build (mc)"] = curvlinops_kfac
    del params
    return fns


def per_example_peers(model, loss_func, X, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    from torch.func import functional_call, grad, vmap

    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_func))

    def backpack_batch_grad():
        bp_model.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            bp_loss(bp_model(X), y).backward()

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, t):
        return loss_func(functional_call(model, p, (x[None],)), t[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def vmap_grad():
        per_example(params, X, y)

    return {"BackPACK BatchGrad": backpack_batch_grad, "torch.func vmap(grad)": vmap_grad}


def peak_memory(fn) -> tuple[float, float]:
    """Peak of live CPU tensor memory during ``fn()`` and its largest single allocation (bytes).

    From the torch profiler's per-operator allocations (``profile_memory=True``),
    summed in the order the operators started: memory allocated before the call
    (model, data, previous results freed by the call) does not count.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    live = peak = largest = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, e.self_cpu_memory_usage)
    return float(peak), float(largest)


def memory_rows(fns: dict, model: nn.Module) -> dict[str, float]:
    """Print peak memory of the curvkit methods against ``D`` and ``D^2`` float32 entries.

    Returns:
        Method name -> peak bytes.
    """
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mib, gib = 4 * D / 2**20, 4 * D * D / 2**30
    print(f"memory (D = {D:,}; D*4 B = {mib:.1f} MiB; D^2*4 B = {gib:,.0f} GiB)")
    head = ("method", "peak MiB", "peak/D*4", "peak/D^2*4", "max alloc MiB")
    print(f"{head[0]:36s} {head[1]:>9s} {head[2]:>9s} {head[3]:>11s} {head[4]:>14s}")
    peaks = {}
    for name, fn in fns.items():
        if not (name.startswith(("graph", "sweep", "autograd"))):
            continue
        fn()  # warm
        peak, largest = peak_memory(fn)
        peaks[name] = peak
        print(
            f"{name:36s} {peak / 2**20:9.1f} {peak / (4 * D):9.2f} {peak / (4 * D * D):11.1e} "
            f"{largest / 2**20:14.1f}"
        )
    return peaks


def bench(fns: dict, reps: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> dict:
    """Run the setups; returns per setup the median times, ``D`` and the peak memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--setups",
        nargs="+",
        default=["autoencoder", "resnet", "transformer"],
        choices=["autoencoder", "resnet", "transformer"],
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    warnings.filterwarnings("ignore", message="Full backward hook")
    print(f"threads={torch.get_num_threads()} reps={reps} (median, interleaved)")
    results = {}
    for key, title, model, loss_func, X, y in setups(args.setups, args.tiny):
        fns = methods(key, model, loss_func, X, y)
        medians = bench(fns, reps)
        base = medians["autograd fwd+bwd"]
        print(f"\n{title}")
        print(f"{'method':36s} {'ms':>9s} {'ratio':>7s}")
        for name, t in medians.items():
            print(f"{name:36s} {1e3 * t:9.2f} {t / base:7.2f}x")
        if key == "autoencoder":
            g = medians["graph grad+kfac"] / medians["sweep grad+kfac"]
            peer = min(medians["BackPACK BatchGrad"], medians["torch.func vmap(grad)"])
            print(f"graph / sweep (grad+kfac): {g:.2f}x (target <= 1.25x)")
            for path in ("sweep", "graph"):
                r = medians[f"{path} grad+batch_grad"] / peer
                print(f"{path} batch_grad / fastest peer: {r:.2f}x (target <= 1x)")
        else:
            r = medians["graph grad+kfac"] / medians["curvlinops grad + KFAC build (mc)"]
            print(f"graph grad+kfac / curvlinops grad+build: {r:.2f}x (target <= 1x)")
        D = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[key] = {"medians": medians, "D": D}
        if not args.no_memory:
            results[key]["peaks"] = memory_rows(fns, model)
    return results


if __name__ == "__main__":
    main()
