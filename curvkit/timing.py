"""Wall-clock timing: per-phase clocks and median times, synchronising CUDA.

One owner for timing in the package and its analysis scripts: :class:`Clock`
adds the seconds of each ``with clock("phase"):`` block to a dict, and
:func:`median_time` and :func:`interleaved_times` time repeated calls. With a
CUDA device both wait for the device before and after the timed code, so the
seconds include the kernels the code launched.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for ``device``'s queued work if it is a CUDA device; otherwise do nothing."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds per phase, accumulated over ``with clock(name):`` blocks.

    Args:
        device: Device to synchronise around each block (``None`` or a CPU device:
            no synchronisation).
        phases: Dict to add the seconds to (default: a new one); e.g. an optimiser's
            ``timers``.

    Example:
        >>> clock = Clock()
        >>> with clock("setup"):
        ...     _ = sum(range(10))
        >>> list(clock.phases)
        ['setup']
    """

    def __init__(self, device: torch.device | str | None = None, phases: dict | None = None):
        self.device = device
        self.phases: dict[str, float] = {} if phases is None else phases

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block under ``name`` (the seconds are added even if it raises)."""
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


def median_time(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device | str | None = None,
    on_call: Callable[[], object] | None = None,
) -> tuple[float, object]:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after one warm-up run.

    Args:
        fn: The code to time.
        repeats: Timed runs (at least one).
        device: Device to synchronise around each run.
        on_call: Called after every run, the warm-up included (e.g. a progress bar's
            ``update``).

    Returns:
        ``(seconds, result)``: the median and the last run's return value.
    """
    result = fn()
    if on_call is not None:
        on_call()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if on_call is not None:
            on_call()
    return statistics.median(times), result


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], repeats: int, device: torch.device | str | None = None
) -> dict[str, float]:
    """Median seconds per function, one call of each per repetition in turn.

    Every function is called once first (warm-up). Interleaving makes a slow spell of
    a shared machine hit every entry alike.

    Returns:
        The median seconds of each entry of ``fns``, under its key.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
