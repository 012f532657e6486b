"""One-pass extraction of Kronecker factors, per-example gradients and diagonals."""

from curvkit.extraction.backpack_backend import BackpackError, backpack_supports, extract_backpack
from curvkit.extraction.batches import extract_batches
from curvkit.extraction.checks import QUANTITIES
from curvkit.extraction.engine import extract
from curvkit.extraction.graph import extract_graph

__all__ = [
    "QUANTITIES",
    "BackpackError",
    "backpack_supports",
    "extract",
    "extract_backpack",
    "extract_batches",
    "extract_graph",
]
