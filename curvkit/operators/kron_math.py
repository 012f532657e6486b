r"""Linear algebra on Kronecker factors.

Pure functions on small factor matrices; nothing here knows about layers or
models. Matrices act on row-major vectorisations: for ``M`` of shape
``[d_G, d_A]``, :math:`(G \otimes A)\,\mathrm{vec}(M) = \mathrm{vec}(G M A^\top)`.
Every function accepts a leading batch of columns, ``M`` of shape ``[k, d_G, d_A]``.

References:
    Martens & Grosse 2015 (arXiv:1503.05671, "M&G"), §4.2-§4.3, §6.3, App. B;
    Grosse et al. 2023 (arXiv:2308.03296), eq. (21) for exact damping.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from curvkit.errors import NonFiniteError


def symmetrize(M: Tensor) -> Tensor:
    r"""Return :math:`(M + M^\top)/2`."""
    return 0.5 * (M + M.transpose(-1, -2))


def _pinv_cutoff(values: Tensor, size: int) -> Tensor:
    """Magnitude below which an eigenvalue counts as zero (as ``torch.linalg.pinv``)."""
    scale = values.abs().max() if values.numel() else values.new_zeros(())
    return size * torch.finfo(values.dtype).eps * scale


def transpose(M: Tensor) -> Tensor:
    """``M.mT``; a diagonal factor (a vector, see :func:`eigh_psd`) is its own transpose."""
    return M if M.dim() == 1 else M.mT


def trace(M: Tensor) -> Tensor:
    """Trace of a factor (a vector stands for the diagonal matrix it holds)."""
    return M.sum() if M.dim() == 1 else torch.trace(M)


def eigh_psd(M: Tensor, psd: bool = True) -> tuple[Tensor, Tensor]:
    r"""Robust eigendecomposition :math:`M = U \operatorname{diag}(e) U^\top` of a symmetric factor.

    The matrix is symmetrised first. If ``torch.linalg.eigh`` fails to converge
    (float32 on ill-conditioned factors), it is retried in float64, then in float64
    with a diagonal shift :math:`c I` whose ``c`` is subtracted from the
    eigenvalues again (a shift leaves the eigenvectors unchanged).

    Args:
        M: Symmetric matrix ``[d, d]``.
        psd: Whether ``M`` is positive semi-definite in exact arithmetic, in which
            case round-off negatives are clamped to zero.

    Returns:
        ``(e, U)``, eigenvalues ascending and orthonormal eigenvectors, in ``M``'s dtype.

    A vector ``d`` stands for the diagonal factor :math:`\operatorname{diag}(d)` (an
    embedding's input factor): its eigenvalues are ``d`` and its basis, the
    identity, is returned as the vector of ones (every function of this module
    reads a vector factor or basis as that diagonal matrix, never forming it).

    Raises:
        NonFiniteError: If ``M`` has NaN or infinite entries.
        torch.linalg.LinAlgError: If even the shifted float64 decomposition fails.
    """
    if M.dim() == 1:
        return (M.clamp_min(0.0) if psd else M), torch.ones_like(M)
    M = symmetrize(M)
    dtype = M.dtype
    try:
        evals, evecs = torch.linalg.eigh(M)
        if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
            raise torch.linalg.LinAlgError("non-finite eigendecomposition")
    except torch.linalg.LinAlgError:
        if not torch.isfinite(M).all():  # checked only here: no cost on the common path
            raise NonFiniteError(
                f"A Kronecker factor ({tuple(M.shape)}) has NaN or infinite entries, so it has "
                "no eigendecomposition; the data (X or y) or the model's outputs are not "
                "finite. See docs/robustness.md."
            ) from None
        M64 = M.double()
        try:
            evals, evecs = torch.linalg.eigh(M64)
        except torch.linalg.LinAlgError:
            d = M.shape[-1]
            shift = (M64.diagonal().abs().mean() + 1.0) * 1e-6 * d
            evals, evecs = torch.linalg.eigh(
                M64 + shift * torch.eye(d, dtype=M64.dtype, device=M.device)
            )
            evals = evals - shift
        evals, evecs = evals.to(dtype), evecs.to(dtype)
    if psd:
        evals = evals.clamp_min(0.0)
    return evals, evecs


def factored_pi(A: Tensor, G: Tensor) -> float:
    r"""M&G's factored-Tikhonov ratio :math:`\pi`.

    :math:`\pi = \sqrt{(\operatorname{tr}A/d_A)/(\operatorname{tr}G/d_G)}`,

    M&G §6.3: the split of :math:`\lambda` between the factors that
    minimises the norm of the approximation error. Returns ``1`` when either
    trace is not positive (a dead layer), so the damping is split evenly.

    Args:
        A: Input factor ``[d_A, d_A]``.
        G: Output factor ``[d_G, d_G]``.

    Returns:
        :math:`\pi` as a Python float.
    """
    mean_a = float(trace(A)) / A.shape[0]
    mean_g = float(trace(G)) / G.shape[0]
    if mean_a <= 0.0 or mean_g <= 0.0 or not math.isfinite(mean_a / mean_g):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def factored_shifts(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    r"""Shifts ``(δ_A, δ_G) = (π√λ, √λ/π)`` of factored damping :math:`(G+δ_G)\otimes(A+δ_A)`."""
    pi = factored_pi(A, G)
    root = math.sqrt(damping)
    return pi * root, root / pi


def _misaligned(*sizes: int) -> int:
    """How many of ``sizes`` (row lengths of matrix products) are not a multiple of 8."""
    return sum(size % 8 != 0 for size in sizes)


def sandwich(L: Tensor, M: Tensor, R: Tensor) -> Tensor:
    r""":math:`L M R` for matrices ``M`` ``[..., m, n]``, in the cheaper order and layout.

    The association with fewer multiply-adds is used. On CPU the product is
    computed transposed, :math:`(R^\top M^\top L^\top)^\top`, when that gives
    the intermediate and result rows a length that is a multiple of 8 more often:
    joint weight-and-bias blocks have an odd width (``in + 1``), and BLAS
    kernels run up to 1.4x slower on such rows (``analysis/bench_kronecker.py``).
    A vector ``L`` or ``R`` is a diagonal matrix (scales rows or columns).
    """
    if L.dim() == 1 or R.dim() == 1:
        out = L[:, None] * M if L.dim() == 1 else L @ M
        return out * R if R.dim() == 1 else out @ R
    if M.device.type == "cpu" and _misaligned(M.shape[-1], R.shape[-1]) > _misaligned(
        L.shape[-1], L.shape[-2]
    ):
        return sandwich(R.mT, M.mT, L.mT).mT
    (a, b), n, c = L.shape[-2:], M.shape[-1], R.shape[-1]
    if a * b * n + a * n * c <= b * n * c + a * b * c:
        return L @ M @ R
    return L @ (M @ R)


def kron_matmat(G: Tensor, A: Tensor, M: Tensor) -> Tensor:
    r"""Apply :math:`G \otimes A` to ``M`` ``[..., d_G, d_A]``: :math:`\mathrm{vec}(G M A^\top)`."""
    return sandwich(G, M, transpose(A))


def eigenbasis_matmat(U_G: Tensor, U_A: Tensor, scale: Tensor, M: Tensor) -> Tensor:
    r"""Apply :math:`(U_G \otimes U_A)\operatorname{diag}(\mathrm{vec}\,S)(U_G \otimes U_A)^\top`.

    That is :math:`U_G\,[(U_G^\top M U_A) \odot S]\,U_A^\top`: four small matrix
    products. With ``S`` the products of the factors' eigenvalues it is K-FAC, with
    reciprocals of damped eigenvalues its inverse, with corrected eigenvalues EKFAC.

    Args:
        U_G: Orthonormal basis ``[d_G, d_G]``.
        U_A: Orthonormal basis ``[d_A, d_A]``.
        scale: ``S``, ``[d_G, d_A]``.
        M: Matrices ``[..., d_G, d_A]``.

    Returns:
        The product, shaped like ``M``.
    """
    return sandwich(U_G, sandwich(transpose(U_G), M, U_A) * scale, transpose(U_A))


def safe_reciprocal(values: Tensor, pseudo: bool = True) -> Tensor:
    """Entrywise ``1/values``; with ``pseudo``, zero where a value is zero up to round-off.

    The pseudo-inverse cut-off is that of ``torch.linalg.pinv`` (size times machine
    epsilon times the largest magnitude). It is meant for undamped quantities only:
    a damped denominator is positive and is inverted as it is.
    """
    if not pseudo:
        return 1.0 / values
    cutoff = _pinv_cutoff(values, max(values.shape) if values.ndim else 1)
    small = values.abs() <= cutoff
    return torch.where(small, torch.zeros_like(values), 1.0 / torch.where(small, 1.0, values))


def kron_inverse_scale(
    gamma: Tensor, alpha: Tensor, damping: float = 0.0, shifts: tuple[float, float] | None = None
) -> Tensor:
    r"""Eigenvalue scaling ``S`` of a damped Kronecker inverse in the factors' eigenbasis.

    Exact damping (``shifts=None``): :math:`S = 1/(\gamma\alpha^\top + \lambda)`, so
    that ``eigenbasis_matmat(U_G, U_A, S, ·)`` applies :math:`(G\otimes A+\lambda I)^{-1}`
    (docs/conventions.md; Grosse et al. 2023, eq. 21). Factored damping (``shifts=(δ_A, δ_G)``):
    :math:`S = 1/((\gamma+\delta_G)(\alpha+\delta_A)^\top)`, the inverse of
    :math:`(G+\delta_G I)\otimes(A+\delta_A I)` (M&G §6.3). Zero denominators
    (undamped singular factors) give zero: the Moore-Penrose pseudo-inverse.

    Args:
        gamma: Eigenvalues of ``G``, ``[d_G]``.
        alpha: Eigenvalues of ``A``, ``[d_A]``.
        damping: :math:`\lambda` (exact damping only).
        shifts: ``(δ_A, δ_G)`` for factored damping.

    Returns:
        ``S``, ``[d_G, d_A]``.
    """
    if shifts is None:
        denom = torch.outer(gamma, alpha) + damping
        return safe_reciprocal(denom, pseudo=damping == 0)
    delta_a, delta_g = shifts
    denom = torch.outer(gamma + delta_g, alpha + delta_a)
    return safe_reciprocal(denom, pseudo=delta_a == 0 or delta_g == 0)


def psd_inverse(evals: Tensor, evecs: Tensor, shift: float = 0.0) -> Tensor:
    r""":math:`(M + cI)^{-1}` from an eigendecomposition of ``M`` (pseudo-inverse if singular)."""
    if evecs.dim() == 1:  # a diagonal factor
        return safe_reciprocal(evals + shift, pseudo=shift == 0)
    return (evecs * safe_reciprocal(evals + shift, pseudo=shift == 0)) @ evecs.T


def shifted_inverse(M: Tensor, shift: float, cache: dict | None = None) -> Tensor:
    r""":math:`(M + cI)^{-1}` of a symmetric PSD ``M`` for ``c > 0``, by Cholesky.

    About five times cheaper than an eigendecomposition and as accurate for a
    positive definite matrix. Where the Cholesky factorisation fails (``c`` below
    the round-off of ``M``), :func:`eigh_psd` and :func:`psd_inverse` take over.
    """
    if shift <= 0:
        raise ValueError(f"shifted_inverse needs a positive shift, got {shift}.")
    if M.dim() == 1:  # a diagonal factor
        return 1.0 / (M + shift)
    L = shifted_cholesky(M, shift, cache)
    if L is not None:
        return torch.cholesky_inverse(L)
    return psd_inverse(*eigh_psd(M), shift)


def shifted_cholesky(M: Tensor, shift: float, cache: dict | None = None) -> Tensor | None:
    """Lower Cholesky factor of ``sym(M) + shift I``, or ``None`` if the factorisation fails.

    ``cache`` (a dict kept by the caller for the lifetime of ``M``) memoises the
    factor per ``(M, shift)``, for builds that need it more than once.
    """
    key = (id(M), shift)
    if cache is not None and key in cache:
        return cache[key]
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(symmetrize(M) + shift * eye)
    L = L if int(info) == 0 and bool(torch.isfinite(L).all()) else None
    if cache is not None:
        cache[key] = L
    return L


class KronDifferenceInverse(NamedTuple):
    r"""Factored inverse of :math:`B \otimes C - D \otimes E`.

    :math:`(B\otimes C - D\otimes E)^{-1} = (W_1 \otimes W_2)\,
    \operatorname{diag}(\mathrm{vec}\,S)\,(W_1 \otimes W_2)^\top` with
    :math:`S = 1/(1 - s_1 s_2^\top)`; apply it with :meth:`matmat`. Without a
    ``scale`` (``D`` or ``E`` zero) it is the plain product :math:`W_1 \otimes W_2`
    of the two inverses :math:`B^{-1}`, :math:`C^{-1}`.
    """

    W1: Tensor
    W2: Tensor
    scale: Tensor | None = None

    def matmat(self, M: Tensor) -> Tensor:
        """Apply the inverse to ``M`` ``[..., d_B, d_C]``."""
        if self.scale is None:
            return kron_matmat(self.W1, self.W2, M)
        return eigenbasis_matmat(self.W1, self.W2, self.scale, M)

    def logdet(self) -> Tensor:
        r""":math:`\log\det` of the inverse (``W`` have :math:`|\det| = \det B^{-1/2}` etc.)."""
        d1, d2 = self.W1.shape[0], self.W2.shape[0]
        ld1, ld2 = (
            W.abs().log().sum() if W.dim() == 1 else torch.linalg.slogdet(W)[1]
            for W in (self.W1, self.W2)
        )
        if self.scale is None:
            return d2 * ld1 + d1 * ld2
        return torch.log(self.scale).sum() + 2 * d2 * ld1 + 2 * d1 * ld2


def generalized_eigh(
    D: Tensor,
    B: Tensor,
    B_eig: tuple[Tensor, Tensor] | None = None,
    shift: float = 0.0,
    cache: dict | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Generalised eigenproblem :math:`D w = s\,(B + cI)\,w` for symmetric ``D`` and PSD ``B``.

    With :math:`B + cI = U \operatorname{diag}(b) U^\top` and
    :math:`R = U\operatorname{diag}(b^{-1/2})`,
    :math:`R^\top D R = P \operatorname{diag}(s) P^\top` and :math:`W = RP` satisfy
    :math:`W^\top (B+cI) W = I`, :math:`W^\top D W = \operatorname{diag}(s)`. Directions
    where :math:`b = 0` get a zero column (a pseudo-inverse). With ``c > 0`` and no
    ``B_eig`` given, :math:`R = L^{-\top}` from the Cholesky factor
    :math:`B + cI = LL^\top` instead (one eigendecomposition instead of two; the
    eigendecomposition route is the fallback if the factorisation fails).

    Args:
        D: Symmetric ``[d, d]``.
        B: PSD ``[d, d]``.
        B_eig: An eigendecomposition ``(b, U)`` of ``B`` to reuse.
        shift: ``c``, added to ``B``'s eigenvalues.
        cache: Memo of Cholesky factors (see :func:`shifted_cholesky`).

    Returns:
        ``(s, W)``.
    """
    L = shifted_cholesky(B, shift, cache) if B_eig is None and shift > 0 else None
    if L is not None:
        # R = L^{-T}: R^T D R = L^{-1} D L^{-T} by two triangular solves
        LiD = torch.linalg.solve_triangular(L, D, upper=False)
        s, P = eigh_psd(torch.linalg.solve_triangular(L, LiD.T, upper=False), psd=False)
        return s, torch.linalg.solve_triangular(L.T, P, upper=True)
    b, U = B_eig if B_eig is not None else eigh_psd(B)
    R = U * safe_reciprocal((b + shift).sqrt(), pseudo=shift == 0)
    s, P = eigh_psd(R.T @ D @ R, psd=False)
    return s, R @ P


def kron_difference_inverse(
    B: Tensor,
    C: Tensor,
    D: Tensor,
    E: Tensor,
    B_eig: tuple[Tensor, Tensor] | None = None,
    C_eig: tuple[Tensor, Tensor] | None = None,
    shifts: tuple[float, float] = (0.0, 0.0),
    cache: dict | None = None,
) -> KronDifferenceInverse:
    r"""Invert :math:`(B + c_B I) \otimes (C + c_C I) - D \otimes E` without forming it.

    M&G App. B: with the generalised eigenbases :math:`W_1^\top B W_1 = I`,
    :math:`W_1^\top D W_1 = \operatorname{diag}(s_1)` (and :math:`W_2, s_2` for
    ``(E, C)``), the matrix equals :math:`(W_1\otimes W_2)^{-\top}(I - s_1 \otimes s_2)
    (W_1\otimes W_2)^{-1}`, whose inverse needs only the diagonal middle. Cost: four
    ``d^3`` eigendecompositions instead of one :math:`(d_B d_C)^3` inversion.
    Singular directions (zero :math:`1 - s_1 s_2`, or singular undamped ``B``, ``C``)
    are dropped (a generalised inverse, not the Moore-Penrose one).

    Args:
        B: PSD ``[d_1, d_1]``.
        C: PSD ``[d_2, d_2]``.
        D: Symmetric ``[d_1, d_1]``.
        E: Symmetric ``[d_2, d_2]``.
        B_eig: Eigendecomposition of ``B`` to reuse.
        C_eig: Eigendecomposition of ``C`` to reuse.
        shifts: ``(c_B, c_C)``, diagonal shifts of ``B`` and ``C``.
        cache: Memo of Cholesky factors (see :func:`shifted_cholesky`).

    Returns:
        A :class:`KronDifferenceInverse`.
    """
    s1, W1 = generalized_eigh(D, B, B_eig, shifts[0], cache)
    s2, W2 = generalized_eigh(E, C, C_eig, shifts[1], cache)
    damped = shifts[0] > 0 and shifts[1] > 0
    return KronDifferenceInverse(
        W1, W2, safe_reciprocal(1.0 - torch.outer(s1, s2), pseudo=not damped)
    )
