r"""Torch-native symmetric linear operators on the flat parameter space.

A :class:`CurvatureOperator` needs only ``_matmat`` (a ``[D, k]`` matrix in, a
``[D, k]`` matrix out, on the operator's device and dtype). Everything else —
``@`` with a flat vector, a matrix of columns or a list of parameter-shaped
tensors, dense and SciPy export, sums and scalar multiples — is built on it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from curvkit.errors import ConfigError, ShapeError


class CurvatureOperator:
    """A symmetric ``D x D`` linear operator over a model's parameters.

    Subclasses implement :meth:`_matmat`. ``D`` is the total number of entries of
    ``param_shapes``; the flat order is the concatenation of ``p.flatten()``.

    Args:
        param_shapes: Shapes of the parameters, in flat order.
        dtype: Floating-point type of products.
        device: Device of products.
        block_sizes: Sizes of the diagonal blocks the operator is organised in
            (one per layer for the Kronecker operators; one per parameter by
            default). They sum to ``D``.
        block_names: A name per block (for per-layer comparison tables).

    Attributes:
        matvecs: Number of matrix-vector products computed so far (a ``[D, k]``
            product counts ``k``); estimators report it.
    """

    def __init__(
        self,
        param_shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        block_sizes: Sequence[int] | None = None,
        block_names: Sequence[str] | None = None,
    ):
        self.param_shapes = [torch.Size(s) for s in param_shapes]
        self.param_numels = [s.numel() for s in self.param_shapes]
        self.dim = sum(self.param_numels)
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_sizes = list(block_sizes) if block_sizes is not None else self.param_numels
        if sum(self.block_sizes) != self.dim:
            raise ShapeError(f"block_sizes sum to {sum(self.block_sizes)}, expected D={self.dim}.")
        names = block_names if block_names is not None else map(str, range(len(self.block_sizes)))
        self.block_names = list(names)
        self.matvecs = 0

    # -- to be implemented ---------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        """Multiply a ``[D, k]`` matrix (operator's device and dtype)."""
        raise NotImplementedError

    # -- shape information ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(D, D)``."""
        return (self.dim, self.dim)

    def block_slices(self) -> list[tuple[str, slice]]:
        """``(name, slice)`` of each diagonal block in the flat order."""
        out, start = [], 0
        for name, size in zip(self.block_names, self.block_sizes):
            out.append((name, slice(start, start + size)))
            start += size
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )

    # -- products ------------------------------------------------------------------
    def matmat(self, X: Tensor) -> Tensor:
        """Multiply a ``[D, k]`` matrix; counts ``k`` matrix-vector products."""
        X = self._check_columns(X)
        self.matvecs += X.shape[1]
        return self._matmat(X)

    def quadratic_form(self, X: Tensor) -> Tensor:
        r""":math:`X^\top M X`, ``[k, k]``, for a ``[D, k]`` matrix ``X``.

        Here ``X.T @ self.matmat(X)``; the exact Gauss-Newton forms (GGN, Fisher,
        empirical Fisher) override it with forward-mode products only.
        """
        X = self._check_columns(X)
        return X.T @ self.matmat(X)

    def _check_columns(self, X: Tensor) -> Tensor:
        if X.ndim != 2 or X.shape[0] != self.dim:
            raise ShapeError(
                f"{type(self).__name__}: expected a [{self.dim}, k] matrix, got {tuple(X.shape)}."
            )
        return X.to(device=self.device, dtype=self.dtype)

    def __matmul__(self, x):
        """Multiply a flat vector ``[D]``, a matrix ``[D, k]``, or a list of tensors.

        A list holds one tensor per parameter, shaped like it (one vector) or
        with a trailing column axis ``[*p.shape, k]``; the result has the same form.
        """
        if isinstance(x, CurvatureOperator):
            return ProductOperator(self, x)
        if isinstance(x, (list, tuple)):
            return self._matmul_list(list(x))
        if not isinstance(x, Tensor):
            raise ShapeError(f"Cannot multiply {type(self).__name__} with {type(x).__name__}.")
        if x.ndim == 1:
            return self.matmat(x.unsqueeze(1)).squeeze(1)
        return self.matmat(x)

    def _matmul_list(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) != len(self.param_shapes):
            raise ShapeError(
                f"Expected {len(self.param_shapes)} tensors shaped like the parameters, "
                f"got {len(xs)}."
            )
        batched = xs[0].shape != self.param_shapes[0]
        for x, s in zip(xs, self.param_shapes):
            if (x.shape[:-1] if batched else x.shape) != s:
                raise ShapeError(
                    f"List entry of shape {tuple(x.shape)} does not match parameter {tuple(s)}."
                )
        k = xs[0].shape[-1] if batched else 1
        X = torch.cat([x.reshape(-1, k) for x in xs])
        Y = self.matmat(X)
        out = [
            y.reshape(*s, k) if batched else y.reshape(s)
            for y, s in zip(Y.split(self.param_numels), self.param_shapes)
        ]
        return out

    # -- composition ---------------------------------------------------------------
    def __add__(self, other):
        return SumOperator(self, other, 1.0)

    def __sub__(self, other):
        return SumOperator(self, other, -1.0)

    def __mul__(self, scalar):
        return ScaledOperator(self, float(scalar))

    __rmul__ = __mul__

    def __neg__(self):
        return ScaledOperator(self, -1.0)

    # -- export --------------------------------------------------------------------
    def to_dense(self, chunk_size: int = 512) -> Tensor:
        """The ``D x D`` matrix in flat parameter order (costs ``D`` products)."""
        cols = []
        for start in range(0, self.dim, chunk_size):
            stop = min(start + chunk_size, self.dim)
            E = torch.zeros(self.dim, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    def to_scipy(self, dtype=np.float64):
        """A :class:`scipy.sparse.linalg.LinearOperator` (NumPy arrays in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mm(x):
            X = torch.as_tensor(np.asarray(x), device=self.device, dtype=self.dtype)
            X = X.reshape(self.dim, -1)
            return self.matmat(X).cpu().numpy().astype(dtype)

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype=dtype)

    def inverse(self, damping: float = 0.0, **kwargs) -> CurvatureOperator:
        """``(self + damping * I)^{-1}``; see the subclass for the method used."""
        raise NotImplementedError(
            f"{type(self).__name__} has no structured inverse; use curvkit.operators.CGInverse "
            "for a conjugate-gradient solve."
        )


def check_damping(damping) -> None:
    """Raise unless ``damping`` is a real number ``>= 0`` (``+inf`` allowed: the zero limit).

    Raises:
        ConfigError: For NaN, a negative value or a non-number, naming the value.
    """
    ok = isinstance(damping, numbers.Real) and not isinstance(damping, bool)
    if not (ok and float(damping) >= 0):  # false for NaN
        raise ConfigError(f"damping must be a non-negative number, got {damping!r}.")


class _Composite(CurvatureOperator):
    def __init__(self, *ops: CurvatureOperator):
        first = ops[0]
        for op in ops[1:]:
            if op.shape != first.shape:
                raise ShapeError(
                    f"Cannot combine operators of shapes {first.shape} and {op.shape}."
                )
        super().__init__(
            first.param_shapes, first.dtype, first.device, first.block_sizes, first.block_names
        )
        self.ops = ops


class SumOperator(_Composite):
    """``A + sign * B``."""

    def __init__(self, A: CurvatureOperator, B: CurvatureOperator, sign: float):
        super().__init__(A, B)
        self.sign = sign

    def _matmat(self, X):
        A, B = self.ops
        return A.matmat(X) + self.sign * B.matmat(X)


class ScaledOperator(_Composite):
    """``scalar * A``."""

    def __init__(self, A: CurvatureOperator, scalar: float):
        super().__init__(A)
        self.scalar = scalar

    def _matmat(self, X):
        return self.scalar * self.ops[0].matmat(X)


class ProductOperator(_Composite):
    """``A @ B`` (not symmetric in general; used for checks such as ``inv @ K``)."""

    def _matmat(self, X):
        A, B = self.ops
        return A.matmat(B.matmat(X))


class IdentityOperator(CurvatureOperator):
    """``I`` on the flat parameter space."""

    def _matmat(self, X):
        return X.clone()


class DenseOperator(CurvatureOperator):
    """An explicit ``D x D`` matrix as an operator (small problems and tests)."""

    def __init__(self, matrix: Tensor, param_shapes=None, **kwargs):
        shapes = param_shapes if param_shapes is not None else [torch.Size([matrix.shape[0]])]
        super().__init__(shapes, matrix.dtype, matrix.device, **kwargs)
        self.matrix = matrix

    def _matmat(self, X):
        # (X^T M^T)^T is M X; for the thin X of probes and Krylov blocks it ran 1.4-2.6 times
        # faster than M @ X with torch's CPU BLAS (D = 1,898, float64, 8-256 columns)
        return (X.T @ self.matrix.T).T.contiguous()

    def to_dense(self, chunk_size: int = 512) -> Tensor:
        """A copy of the stored matrix."""
        return self.matrix.clone()

    def inverse(self, damping: float = 0.0, **kwargs) -> DenseOperator:
        """``(M + damping * I)^{-1}`` by a dense solve."""
        check_damping(damping)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        inv = torch.linalg.inv(self.matrix + damping * eye)
        return DenseOperator(
            inv, self.param_shapes, block_sizes=self.block_sizes, block_names=self.block_names
        )
