"""One-pass extraction of Kronecker factors, per-example gradients and diagonals."""

from curvkit.extraction.checks import QUANTITIES
from curvkit.extraction.engine import extract
from curvkit.extraction.graph import extract_graph

__all__ = ["QUANTITIES", "extract", "extract_graph"]
