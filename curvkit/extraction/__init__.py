"""One-pass extraction of Kronecker factors, per-example gradients and diagonals."""

from curvkit.extraction.checks import QUANTITIES
from curvkit.extraction.engine import extract

__all__ = ["QUANTITIES", "extract"]
