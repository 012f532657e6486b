r"""Symmetric Gram matrices :math:`s X^\top X` and their homogeneous-coordinate extension.

The Kronecker factors are Gram matrices of tall, narrow-ish matrices
(``X`` is ``[n, d]`` with ``n`` the batch size, often ``n < d``), so they cost as
much as a layer's forward product. Their symmetry is used: the upper block
triangle is computed block row by block row straight into the result (the
scale folded into the product), and the strict lower part is mirrored, which
saves about a third of the multiplications for ``d >= 2 * GRAM_BLOCK`` on CPU
(on GPUs one product is used).

(BLAS ``syrk`` through SciPy halves the multiplications, but measured on a
2-core CPU within the whole sweep it was 2.6x *slower* than ``X.T @ X``: the
OpenBLAS thread pool and PyTorch's OpenMP pool compete for the cores.)
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Columns per block row of the blocked Gram product.
GRAM_BLOCK = 256


def gram(X: Tensor, scale: float = 1.0) -> Tensor:
    r"""``scale`` times :math:`X^\top X` for ``X`` of shape ``[n, d]``: symmetric ``[d, d]``.

    Args:
        X: Rows to contract over.
        scale: Multiplier.

    Returns:
        The Gram matrix, same dtype and device as ``X``.
    """
    d = X.shape[1]
    if d < 2 * GRAM_BLOCK or X.device.type != "cpu":
        return torch.addmm(X.new_empty(()), X.T, X, beta=0, alpha=scale)
    out = X.new_empty(d, d)
    starts = list(range(0, d, GRAM_BLOCK))
    for s in starts:
        e = min(s + GRAM_BLOCK, d)
        block = out[s:e, s:]
        torch.addmm(block, X[:, s:e].T, X[:, s:], beta=0, alpha=scale, out=block)
    for s in starts:
        e = min(s + GRAM_BLOCK, d)
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
    d = gram_a.shape[0]
    out = gram_a.new_empty(d + 1, d + 1)
    out[:d, :d] = gram_a
    out[:d, d] = col_sum
    out[d, :d] = col_sum
    out[d, d] = count
    return out if scale == 1.0 else out.mul_(scale)


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
    (d1, d2), n = cross.shape, a1.shape[0]
    out = cross.new_empty(d1 + int(hom1), d2 + int(hom2))
    out[:d1, :d2] = cross
    if hom1:
        out[d1, :d2] = a2.sum(0).mul_(scale)
    if hom2:
        out[:d1, d2] = a1.sum(0).mul_(scale)
    if hom1 and hom2:
        out[d1, d2] = n * scale
    return out
