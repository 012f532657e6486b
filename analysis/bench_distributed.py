"""Data-parallel K-FAC on CPU processes: step time, communication share, inverse phase.

Question: what do 2 processes cost next to 1 at the same per-process batch (weak
scaling), how much of a step is communication, and does computing each layer's
inverse on one process (``inverse_assignment="distributed"``) cut the inverse
phase to about 1/(number of processes) of computing all of them everywhere?

Setup: the half-width M&G autoencoder (784-500-250-125-15 and mirror, MSE) in
float32, K-FAC in M&G's automatic mode (α, μ from the exact quadratic model, LM
damping) with statistics every step (``T_cov=1``). Each configuration starts its
processes itself (gloo on 127.0.0.1, one thread each), runs ``--warmup`` steps and
times ``--steps`` more without an inverse refresh (``T_inv`` larger than the run);
then times ``--repeats`` inverse rebuilds with each assignment. Times are the
median over steps of the slowest process.

Rows: processes, structure, median step time, communication per step (the
communicator's collectives: averaging of gradients, factors and the quadratic model,
agreement flags, ρ's loss) and its share of the step, inverse phase with both
assignments and their ratio.

Usage:
    python analysis/bench_distributed.py --nprocs 1 2 --batch-size 128 \
        --structures block-diagonal tridiagonal --out results/bench_distributed.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COMM_PHASES = ("any", "average/", "average_scalar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _worker(rank, world, port, args, structure, out):
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    import curvkit as ck
    from curvkit.distributed.kfac import DistributedCommunicator
    from curvkit.optim import KFAC

    problem = ck.problems.get_problem(args.problem, seed=0)
    model, loss_func = problem.model, problem.loss_func
    X_all, y_all = problem.batch()
    B, total = args.batch_size, args.warmup + args.steps
    comm = DistributedCommunicator(inverse_assignment="distributed")
    opt = KFAC(model, loss_func, structure=structure, T_inv=10**6, comm=comm, seed=rank)

    def step(k):
        start = ((k * world + rank) * B) % (X_all.shape[0] - B)
        X, y = X_all[start : start + B], y_all[start : start + B]
        opt.step(lambda: loss_func(model(X), y))

    for k in range(args.warmup):
        step(k)
    comm.timers.clear()
    opt.timers.clear()
    times = []
    for k in range(args.warmup, total):
        dist.barrier()
        t0 = time.perf_counter()
        step(k)
        times.append(_slowest(time.perf_counter() - t0))
    comm_time = sum(v for key, v in comm.timers.items() if key.startswith(COMM_PHASES))
    comm_time = _slowest(comm_time) / args.steps
    factor_avg = _slowest(comm.timers.get("average/factors", 0.0)) / args.steps
    inverse = {}
    damping = opt.gamma**2
    for assignment in ("distributed", "everywhere"):
        comm.inverse_assignment = assignment
        runs = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            opt.preconditioner.refresh(damping, comm=comm)
            runs.append(_slowest(time.perf_counter() - t0))
        inverse[assignment] = statistics.median(runs)
    if rank == 0:
        step_time = statistics.median(times)
        row = {
            "problem": args.problem,
            "processes": world,
            "batch_per_process": B,
            "structure": structure,
            "step_s": round(step_time, 4),
            "comm_s_per_step": round(comm_time, 4),
            "comm_share": round(comm_time / step_time, 3),
            "factor_averaging_s_per_step": round(factor_avg, 4),
            "inverse_distributed_s": round(inverse["distributed"], 4),
            "inverse_everywhere_s": round(inverse["everywhere"], 4),
            "inverse_ratio": round(inverse["distributed"] / inverse["everywhere"], 3),
        }
        torch.save(row, out)
    dist.barrier()
    dist.destroy_process_group()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="mnist_autoencoder_half")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--structures", nargs="+", default=["block-diagonal", "tridiagonal"])
    parser.add_argument("--batch-size", type=int, default=128, help="examples per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed inverse rebuilds")
    parser.add_argument("--start-method", default="spawn", choices=("spawn", "fork"))
    parser.add_argument("--quick", action="store_true", help="tiny_mlp, 1 step, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("results/bench_distributed.csv"))
    args = parser.parse_args(argv)
    if args.quick:
        args.problem, args.batch_size, args.warmup, args.steps, args.repeats = (
            "tiny_mlp",
            16,
            1,
            1,
            1,
        )
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for structure in args.structures:
            for world in args.nprocs:
                out = Path(tmp) / f"{structure}-{world}.pt"
                mp.start_processes(
                    _worker,
                    args=(world, _free_port(), args, structure, str(out)),
                    nprocs=world,
                    start_method=args.start_method,
                )
                rows.append(torch.load(out))
                print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return rows


if __name__ == "__main__":
    main()
