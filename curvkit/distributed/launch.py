"""Start a curvkit command on several processes, and join a started one.

``curvkit train --nproc 2 ...`` re-invokes itself through ``torchrun``
(:func:`launch`): one process per shard, each running ``python -m curvkit train
...`` with the ``torch.distributed`` environment set (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...). Inside each process :func:`init_from_env` joins the group
(gloo on CPU, NCCL on CUDA) and :func:`shutdown` leaves it cleanly.

Example:
    >>> from curvkit.distributed.launch import torchrun_command
    >>> torchrun_command(2, ["train", "--steps", "10"])[1:8]
    ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'curvkit']
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta

import torch

from curvkit.errors import ConfigError

#: Environment variables ``torchrun`` sets in the processes it starts.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment is set)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "curvkit") -> list[str]:
    """The command that runs ``python -m module *argv`` on ``nproc`` local processes.

    Args:
        nproc: Processes on this machine (``--nproc_per_node``).
        argv: Arguments of the module (without ``--nproc``).
        module: The module each process runs.

    Returns:
        The command as a list (``torch.distributed.run`` is ``torchrun``'s module).

    Raises:
        ConfigError: If ``nproc`` is not a positive integer.
    """
    if isinstance(nproc, bool) or int(nproc) != nproc or nproc < 1:
        raise ConfigError(f"launch: nproc must be a positive integer, got {nproc!r}.")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(int(nproc)),
        "-m",
        module,
        *argv,
    ]


def launch(
    nproc: int,
    argv: Sequence[str],
    module: str = "curvkit",
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    stdout=None,
    stderr=None,
) -> int:
    """Run ``python -m module *argv`` on ``nproc`` processes through ``torchrun``.

    Each process gets ``OMP_NUM_THREADS = cores // nproc`` (at least 1) unless the
    variable is set, so that the processes do not oversubscribe the cores.

    Args:
        nproc: Number of processes.
        argv: Arguments of the module, e.g. ``["train", "--problem", "mnist_autoencoder"]``.
        module: The module each process runs.
        env: Extra environment variables for the processes.
        timeout: Seconds after which all processes are stopped (default: none).
        stdout: Where the processes' output goes (a file object; default: this
            process's standard output).
        stderr: Where their error output goes (likewise).

    Returns:
        ``torchrun``'s exit status (non-zero when a process failed; ``torchrun`` then
        stops the others).

    Raises:
        ConfigError: If ``nproc`` is not a positive integer, or when called from a
            process that ``torchrun`` started (which would launch recursively).
        subprocess.TimeoutExpired: After ``timeout`` (the processes are stopped).
    """
    if launched():
        raise ConfigError(
            "launch: this process was already started by torchrun; run the command "
            "directly instead of launching it again."
        )
    command = torchrun_command(nproc, argv, module)
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    child_env.update(env or {})
    posix = os.name == "posix"
    proc = subprocess.Popen(
        command, env=child_env, start_new_session=posix, stdout=stdout, stderr=stderr
    )
    try:
        return proc.wait(timeout=timeout)
    except BaseException:  # timeout or Ctrl-C: stop torchrun and every process it started
        _stop(proc, posix)
        raise


def _stop(proc: subprocess.Popen, posix: bool) -> None:
    import signal

    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        if posix:
            os.killpg(proc.pid, sig)
        else:
            proc.kill()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def strip_option(argv: Sequence[str], name: str = "--nproc") -> list[str]:
    """``argv`` without ``name VALUE`` or ``name=VALUE`` (to re-invoke without ``--nproc``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def init_from_env(device=None, timeout: timedelta | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` set up, if any.

    Args:
        device: The training device; CUDA selects NCCL and the GPU ``LOCAL_RANK``,
            anything else gloo.
        timeout: Timeout of the group's collectives (default: PyTorch's).

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` outside ``torchrun``.
    """
    if not launched():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Leave the process group: a barrier first, so that no peer is still using it.

    A process group must not outlive ``destroy_process_group()``: gloo may abort
    ("terminate called without an active exception") when it is freed at interpreter
    exit. curvkit's objects hold their groups weakly; delete objects that hold one
    strongly (a ``DistributedDataParallel`` wrapper) before calling this. Unreachable
    objects are collected first for the same reason.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
