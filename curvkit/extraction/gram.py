r"""Symmetric Gram matrices :math:`s X^\top X` and their homogeneous-coordinate extension.

The Kronecker factors are Gram matrices of tall, narrow-ish matrices
(``X`` is ``[n, d]`` with ``n`` the batch size, often ``n < d``), so they cost as
much as a layer's forward product. Their symmetry is used: the upper block
triangle is computed block row by block row straight into the result (the
scale folded into the product), and the strict lower part is mirrored. On CPU
this took, relative to one product ``X.T @ X`` (``n`` = 1000 / 250 rows):

- 1 thread, blocks of 96 columns: 0.77 / 0.94 (``d`` = 192), 0.68 / 0.75
  (``d`` = 500), 0.65 / 0.69 (``d`` = 784); blocks of 256: 0.79 / 0.82 (500),
  0.72 / 0.76 (784);
- 2 threads, where smaller products parallelise worse, blocks of 256: 0.81 /
  0.86 (``d`` = 500), 0.74 / 0.83 (``d`` = 784); blocks of 96 lost at ``n`` = 250
  for ``d <= 500`` (up to 1.2x);
- with ``n`` = 128: 0.79 to 0.86 for ``d`` from 500 to 1000 at 1 thread (1.0 to
  1.1 for ``d`` = 192 to 512), mixed at 2 threads (0.9 to 1.6); with ``n`` <= 64
  blocking mostly lost (up to 2.8x).

So: on one thread blocks of ``GRAM_BLOCK`` columns from ``GRAM_MIN_ROWS`` rows
on, with more threads blocks of ``GRAM_BLOCK_THREADED`` columns from
``GRAM_MIN_ROWS_THREADED`` rows on, in both cases for at least two blocks of
columns; on GPUs one product.

(BLAS ``syrk`` through SciPy halves the multiplications, but measured on a
2-core CPU within the whole sweep it was 2.6x *slower* than ``X.T @ X``: the
OpenBLAS thread pool and PyTorch's OpenMP pool compete for the cores.)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Columns per block row of the blocked Gram product, and fewest rows, on one thread.
GRAM_BLOCK, GRAM_MIN_ROWS = 96, 128
#: The same with more than one thread.
GRAM_BLOCK_THREADED, GRAM_MIN_ROWS_THREADED = 256, 192


def _block_size(X: Tensor) -> int | None:
    """Columns per block row for ``X`` ``[n, d]``, or ``None`` for one product."""
    (n, d) = X.shape
    if X.device.type != "cpu":
        return None
    if torch.get_num_threads() == 1:
        size, min_rows = GRAM_BLOCK, GRAM_MIN_ROWS
    else:
        size, min_rows = GRAM_BLOCK_THREADED, GRAM_MIN_ROWS_THREADED
    return size if n >= min_rows and d >= 2 * size else None


def gram(X: Tensor, scale: float = 1.0) -> Tensor:
    r"""``scale`` times :math:`X^\top X` for ``X`` of shape ``[n, d]``: symmetric ``[d, d]``.

    Args:
        X: Rows to contract over.
        scale: Multiplier.

    Returns:
        The Gram matrix, same dtype and device as ``X``.
    """
    size = _block_size(X)
    if size is None:
        return torch.addmm(X.new_empty(()), X.T, X, beta=0, alpha=scale)
    d = X.shape[1]
    out = X.new_empty(d, d)
    starts = list(range(0, d, size))
    for s in starts:
        e = min(s + size, d)
        block = out[s:e, s:]
        torch.addmm(block, X[:, s:e].T, X[:, s:], beta=0, alpha=scale, out=block)
    for s in starts:
        e = min(s + size, d)
        if e < d:
            out[e:, s:e].copy_(out[s:e, e:].T)
    return out


def assemble_homogeneous(gram_a: Tensor, col_sum: Tensor, count: float, scale: float) -> Tensor:
    r"""``scale`` times :math:`\begin{pmatrix} a^\top a & a^\top 1 \\ 1^\top a & n \end{pmatrix}`.

    Args:
        gram_a: :math:`a^\top a`, ``[d, d]`` (unscaled).
        col_sum: :math:`a^\top 1`, ``[d]``.
        count: ``n``, the number of rows of ``a``.
        scale: Multiplier.

    Returns:
        ``[d + 1, d + 1]``.
    """
    out = _bordered(gram_a, col_sum, col_sum, count)
    return out if scale == 1.0 else out.mul_(scale)


def _bordered(core: Tensor, bottom: Tensor | None, right: Tensor | None, corner: float) -> Tensor:
    """``core`` with a row appended below and/or a column to the right (``corner`` where both)."""
    d1, d2 = core.shape
    out = core.new_empty(d1 + (bottom is not None), d2 + (right is not None))
    out[:d1, :d2] = core
    if bottom is not None:
        out[d1, :d2] = bottom
    if right is not None:
        out[:d1, d2] = right
    if bottom is not None and right is not None:
        out[d1, d2] = corner
    return out


def homogeneous_gram(a: Tensor, scale: float, homogeneous: bool) -> Tensor:
    r"""``scale`` times the Gram matrix of ``[a, 1]`` (or of ``a`` alone).

    Args:
        a: Rows ``[n, d]``.
        scale: Multiplier (the reduction factor ``R``).
        homogeneous: Whether to append the homogeneous coordinate.

    Returns:
        ``[d(+1), d(+1)]``.
    """
    if not homogeneous:
        return gram(a, scale)
    # a^T a on its own (rows of length d, not d + 1: faster BLAS), then the border
    return assemble_homogeneous(gram(a, scale), a.sum(0).mul_(scale), a.shape[0] * scale, 1.0)


def homogeneous_cross(a1: Tensor, a2: Tensor, scale: float, hom1: bool, hom2: bool) -> Tensor:
    r"""``scale`` times :math:`\bar a_1^\top \bar a_2` with optional homogeneous coordinates.

    The product of the features themselves is formed first (rows of length
    ``d_2``, not ``d_2 + 1``), then the border of column sums and the count.
    """
    cross = torch.addmm(a1.new_empty(()), a1.T, a2, beta=0, alpha=scale)
    if not (hom1 or hom2):
        return cross
    bottom = a2.sum(0).mul_(scale) if hom1 else None
    right = a1.sum(0).mul_(scale) if hom2 else None
    return _bordered(cross, bottom, right, a1.shape[0] * scale)
