"""Run a function on several CPU processes joined by a gloo group on 127.0.0.1.

``run_workers(fn, *args)`` starts ``world_size`` processes, each calling
``fn(rank, world_size, *args)`` inside an initialised process group, and returns
what each returned (or, with ``allow_errors=True``, a record per rank with the
error and the time it took). Processes are forked when the parent uses one thread
(fast: no fresh ``import torch``), spawned otherwise; every run is bounded by
``timeout`` seconds, after which the processes are killed and the test fails.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

#: Times a worker may note (``MARKS[name] = time.monotonic()``); saved in its record.
MARKS: dict[str, float] = {}


def warm_imports() -> None:
    """Import what workers import lazily, once in the parent, so forked workers inherit it.

    ``torch.optim.Optimizer()`` imports ``torch._dynamo`` on first use (seconds).
    """
    import curvkit.extraction  # noqa: F401
    import curvkit.operators.exact  # noqa: F401
    import curvkit.problems  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out, pg_timeout, fn, args):
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    record = {"rank": rank}
    start = time.perf_counter()
    ok = False
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        record["value"] = fn(rank, world_size, *args)
        ok = True
    except BaseException as err:  # recorded for the parent, which decides
        record["error_type"] = type(err).__name__
        record["error"] = str(err)
        record["traceback"] = traceback.format_exc()
    record["seconds"] = time.perf_counter() - start
    record["end"] = time.monotonic()
    record["marks"] = dict(MARKS)
    torch.save(record, Path(out) / f"rank{rank}.pt")
    if ok:  # a peer that failed never reaches the barrier; skip it then
        dist.barrier()
        dist.destroy_process_group()


def run_workers(
    fn,
    *args,
    world_size: int = 2,
    timeout: float = 60.0,
    pg_timeout: float = 30.0,
    allow_errors: bool = False,
):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes.

    Returns:
        The values returned by ``fn``, by rank; with ``allow_errors``, the records
        (``value`` or ``error_type``/``error``, ``seconds``, the ``time.monotonic()``
        at the ``end`` and the worker's ``marks``) by rank.

    Raises:
        AssertionError: If the run exceeds ``timeout`` or, without ``allow_errors``,
            a process raised (its traceback is in the message).
    """
    method = "fork" if torch.get_num_threads() == 1 and os.name == "posix" else "spawn"
    if method == "fork":
        warm_imports()
    ctx = mp.get_context(method)
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, out, pg_timeout, fn, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        files = [Path(out) / f"rank{r}.pt" for r in range(world_size)]
        done_at = None
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if done_at is None and all(f.exists() for f in files):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 10:
                break  # results are in; a process stuck in teardown is not the test's concern
            time.sleep(0.02)
        timed_out = any(p.is_alive() for p in procs) and not all(f.exists() for f in files)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        records = [torch.load(f, weights_only=False) if f.exists() else None for f in files]
    if timed_out:
        raise AssertionError(f"distributed run exceeded {timeout} s; records: {records}")
    missing = [r for r, rec in enumerate(records) if rec is None]
    if missing:
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"processes {missing} left no result (exit codes {codes})")
    if allow_errors:
        return records
    errors = [rec for rec in records if "error_type" in rec]
    if errors:
        raise AssertionError("\n".join(f"rank {e['rank']}:\n{e['traceback']}" for e in errors))
    return [rec["value"] for rec in records]
