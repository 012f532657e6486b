"""Helpers shared by the applications: device parsing, progress bars, text tables."""

from __future__ import annotations

import sys

import torch

from curvkit.errors import ConfigError


def progress(iterable, args, **kwargs):
    """A tqdm bar on stderr that shows after 2 s, only on a terminal and without --quiet."""
    from tqdm import tqdm

    disable = getattr(args, "quiet", False) or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, delay=2.0, leave=False, **kwargs)


def cell(value) -> str:
    """One value as table text (floats to 4 digits, shapes as 3x4)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return "" if value is None else str(value)


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table (columns in order of first appearance)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows) for c in columns]

    def line(values):
        just = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(just).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


# -- curvkit problems ----------------------------------------------------------------------
def parse_device(name: str) -> torch.device:
    """The device named by a ``--device`` option, checked to exist on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine.")
    return device
