r"""Block-tri-diagonal K-FAC (Martens & Grosse 2015, §4.3 and App. B).

The layers' parameter blocks :math:`D\theta_1, \dots, D\theta_L` (forward order) are
modelled as a Gaussian chain :math:`D\theta_L \sim N(0, \Sigma_L)`,
:math:`D\theta_i = \Psi_{i,i+1} D\theta_{i+1} + \epsilon_i`,
:math:`\epsilon_i \sim N(0, \Sigma_{i|i+1})`, fitted to the Kronecker blocks
:math:`\tilde F_{i,j} = G_{i,j} \otimes A_{i,j}` on the diagonal and the first
off-diagonal:

.. math::
   \Psi_{i,i+1} = \Psi^G_i \otimes \Psi^A_i, \quad
   \Psi^G_i = G_{i,i+1} G_{i+1}^{-1}, \quad \Psi^A_i = A_{i,i+1} A_{i+1}^{-1},

   \Sigma_{i|i+1} = G_i \otimes A_i - (\Psi^G_i G_{i+1} \Psi^{G\top}_i)
                    \otimes (\Psi^A_i A_{i+1} \Psi^{A\top}_i), \qquad \Sigma_L = G_L \otimes A_L.

Its covariance :math:`\breve F = \Xi^{-1}\Lambda^{-1}\Xi^{-\top}` is dense and equals
:math:`\tilde F` on those blocks; its inverse :math:`\breve F^{-1} = \Xi^\top\Lambda\Xi`
is block-tri-diagonal, with :math:`\Lambda = \operatorname{diag}(\Sigma_{i|i+1}^{-1})`
and :math:`\Xi` unit upper block-bidiagonal with :math:`-\Psi_{i,i+1}` above the
diagonal. Products use block substitution and Kronecker products only; each
:math:`\Sigma_{i|i+1}^{-1}` comes from two generalised eigenproblems
(:func:`~curvkit.operators.kron_math.kron_difference_inverse`), never from a
:math:`d_A d_G`-sized matrix.

Where a pair of consecutive layers has no cross factor (conv layers, branches, a
kind without cross factors), :math:`\Psi_{i,i+1} = 0`: the chain breaks and that
pair is treated block-diagonally. :attr:`TriDiagonalKFAC.fallback_pairs` lists
these pairs, and the operator warns once when it is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.errors import ShapeError
from curvkit.operators import kron_math as km
from curvkit.operators.kron_base import (
    KronLayer,
    LayeredOperator,
    check_factors,
    layers_and_factors,
)
from curvkit.records import Records


class TriDiagonalKFAC(LayeredOperator):
    r"""Block-tri-diagonal K-FAC :math:`\breve F` (M&G §4.3) in flat parameter order.

    Args:
        layers: Layouts, forward order (joint ``[W, b]`` blocks; ``separate_bias``
            is not supported).
        A: Input factors per layer.
        G: Output factors per layer.
        cross_A: ``L - 1`` cross factors :math:`A_{i,i+1}` (``[a_i, a_{i+1}]``) or ``None``.
        cross_G: ``L - 1`` cross factors :math:`G_{i,i+1}` (``[out_i, out_{i+1}]``) or ``None``.
        bias_scale: Accepted for a signature like
            :class:`~curvkit.operators.kronecker.BlockDiagonalKFAC`'s; unused, as
            the blocks are joint.
        reasons: Why a pair has no cross factor, per pair (for the warning).

    Attributes:
        fallback_pairs: ``(layer_i, layer_{i+1}, reason)`` of the pairs treated
            block-diagonally.

    Raises:
        ShapeError: On a layer with a separate bias block or mismatching factors.

    Note:
        Products with :math:`\breve F` use the undamped factors; where a diagonal
        factor of layer :math:`i+1` is singular, :math:`\Psi` uses its
        pseudo-inverse. The eigendecompositions are computed once per operator.
    """

    def __init__(
        self,
        layers: Sequence[KronLayer],
        A: Sequence[Tensor],
        G: Sequence[Tensor],
        cross_A: Sequence[Tensor | None],
        cross_G: Sequence[Tensor | None],
        bias_scale: Sequence[float] | None = None,
        reasons: Sequence[str | None] | None = None,
    ):
        check_factors(layers, A, G)
        super().__init__(layers, A[0].dtype, A[0].device)
        if len(cross_A) != len(layers) - 1 or len(cross_G) != len(layers) - 1:
            raise ShapeError(f"Expected {len(layers) - 1} cross factors for {len(layers)} layers.")
        for layer in self.layers:
            if layer.has_bias and layer.separate_bias:
                raise ShapeError(
                    f"Layer {layer.name!r}: the tri-diagonal structure needs joint [W, b] blocks; "
                    "extract with separate_bias=False."
                )
        self.A, self.G = list(A), list(G)
        self.cross_A, self.cross_G = [], []
        self.fallback_pairs = []
        reasons = list(reasons) if reasons is not None else [None] * len(cross_A)
        for i, (cA, cG) in enumerate(zip(cross_A, cross_G)):
            if cA is None or cG is None:
                cA = cG = None
                why = reasons[i] or "no cross factor"
                self.fallback_pairs.append((self.layers[i].name, self.layers[i + 1].name, why))
            elif cA.shape != (A[i].shape[0], A[i + 1].shape[0]) or cG.shape != (
                G[i].shape[0],
                G[i + 1].shape[0],
            ):
                raise ShapeError(
                    f"Cross factors of layers {self.layers[i].name!r}, {self.layers[i + 1].name!r} "
                    f"have shapes A{tuple(cA.shape)}, G{tuple(cG.shape)}."
                )
            self.cross_A.append(cA)
            self.cross_G.append(cG)
        if self.fallback_pairs:
            pairs = "; ".join(f"({a}, {b}): {why}" for a, b, why in self.fallback_pairs)
            warnings.warn(
                f"Tri-diagonal K-FAC treats these layer pairs block-diagonally: {pairs}.",
                UserWarning,
                stacklevel=2,
            )
        self._eig = None
        self._chain_cache = None

    @classmethod
    def from_records(cls, records: Records, kind: str = "kflr") -> TriDiagonalKFAC:
        """Tri-diagonal K-FAC from the factors and cross factors of ``kind`` in ``records``."""
        layers, A, G, _ = layers_and_factors(records, kind)
        cross_A, cross_G, reasons = [], [], []
        for rec in records.layers[:-1]:
            cG = rec.cross_G.get(kind)
            cross_A.append(rec.cross_A)
            cross_G.append(cG)
            if rec.cross_A is None:
                reasons.append(rec.cross_reason or f"no cross factor of kind {kind!r}")
            elif cG is None:
                reasons.append(f"no cross factor of kind {kind!r}")
            else:
                reasons.append(None)
        return cls(layers, A, G, cross_A, cross_G, reasons=reasons)

    # -- factor algebra ------------------------------------------------------------
    def eigendecompositions(self) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """Per layer ``((γ, U_G), (α, U_A))`` of the undamped factors (cached)."""
        if self._eig is None:
            self._eig = [(km.eigh_psd(G), km.eigh_psd(A)) for G, A in zip(self.G, self.A)]
        return self._eig

    def _chain(
        self, shifts: list[tuple[float, float]], cache: dict | None = None
    ) -> list[tuple[Tensor, ...] | None]:
        r"""Per pair ``(Ψ^G, Ψ^A, D, E)`` with the next layer's factors shifted, or ``None``.

        :math:`D = \Psi^G G_{i+1,i}`, :math:`E = \Psi^A A_{i+1,i}`, so that
        :math:`\Sigma_{i|i+1} = \hat G_i \otimes \hat A_i - D \otimes E`.
        """
        chain = []
        for i, (cA, cG) in enumerate(zip(self.cross_A, self.cross_G)):
            if cA is None:
                chain.append(None)
                continue
            delta_a, delta_g = shifts[i + 1]
            psi_g = cG @ self._factor_inverse(i + 1, "G", delta_g, cache)
            psi_a = cA @ self._factor_inverse(i + 1, "A", delta_a, cache)
            chain.append((psi_g, psi_a, psi_g @ cG.T, psi_a @ cA.T))
        return chain

    def _factor_inverse(self, i: int, which: str, shift: float, cache: dict | None = None):
        """``(G_i + shift I)^{-1}`` or ``A_i``'s: by Cholesky if shifted, else a pseudo-inverse."""
        M = self.G[i] if which == "G" else self.A[i]
        if shift > 0:
            return km.shifted_inverse(M, shift, cache)
        return km.psd_inverse(*self.eigendecompositions()[i][0 if which == "G" else 1])

    def _shifts(self, damping: float) -> list[tuple[float, float]]:
        if damping < 0:
            raise ShapeError(f"damping must be non-negative, got {damping}.")
        return [km.factored_shifts(A, G, damping) for A, G in zip(self.A, self.G)]

    # -- products ------------------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        if self._chain_cache is None:
            self._chain_cache = self._chain(self._shifts(0.0))
        chain, L = self._chain_cache, len(self.layers)
        w = [layer.split(Xl)[0] for layer, Xl in zip(self.layers, X.split(self.block_sizes))]
        for i in range(L - 1):  # w = Ξ^{-T} v (forward substitution)
            if chain[i] is not None:
                psi_g, psi_a = chain[i][:2]
                w[i + 1] = w[i + 1] + km.sandwich(psi_g.T, w[i], psi_a)
        z = []
        for i in range(L):  # z = Λ^{-1} w
            zi = km.sandwich(self.G[i], w[i], self.A[i])
            if i < L - 1 and chain[i] is not None:
                D, E = chain[i][2:]
                zi = zi - km.sandwich(D, w[i], E)
            z.append(zi)
        for i in reversed(range(L - 1)):  # u = Ξ^{-1} z (back substitution)
            if chain[i] is not None:
                psi_g, psi_a = chain[i][:2]
                z[i] = z[i] + km.sandwich(psi_g, z[i + 1], psi_a.T)
        return self._merge_all(X, [[zi] for zi in z])

    def inverse(self, damping: float = 0.0) -> TriDiagonalInverse:
        r""":math:`\breve F^{-1} = \Xi^\top \Lambda \Xi` with M&G's damping (§6.3 with §4.3).

        The diagonal factors carry factored Tikhonov damping,
        :math:`\hat A_i = A_i + \pi_i\sqrt\lambda I`,
        :math:`\hat G_i = G_i + \pi_i^{-1}\sqrt\lambda I`;
        cross factors stay undamped; :math:`\Psi` and :math:`\Sigma` are computed
        from these. ``damping=0`` gives the undamped :math:`\breve F^{-1}`, with
        pseudo-inverses of singular factors and a generalised inverse of singular
        :math:`\Sigma_{i|i+1}` (then it is no longer the exact inverse of ``self``).

        Args:
            damping: :math:`\lambda \ge 0`.

        Returns:
            A :class:`TriDiagonalInverse` holding the chain and the factored
            :math:`\Sigma^{-1}` (building it is the expensive part).

        Raises:
            ShapeError: On a negative damping.
        """
        shifts = self._shifts(damping)
        cache = {}  # each damped factor's Cholesky factor serves Ψ and Σ alike
        chain = self._chain(shifts, cache)
        sigma_inv = []
        for i, (delta_a, delta_g) in enumerate(shifts):
            if i < len(chain) and chain[i] is not None:
                D, E = chain[i][2:]
                # undamped factors need their eigendecompositions (pseudo-inverses);
                # shifted ones are whitened by Cholesky factors instead
                g_eig, a_eig = self.eigendecompositions()[i] if damping == 0 else (None, None)
                inv = km.kron_difference_inverse(
                    self.G[i], self.A[i], D, E, g_eig, a_eig, (delta_g, delta_a), cache
                )
            else:
                inv = km.KronDifferenceInverse(
                    self._factor_inverse(i, "G", delta_g, cache),
                    self._factor_inverse(i, "A", delta_a, cache),
                )
            sigma_inv.append(inv)
        psi = [None if c is None else c[:2] for c in chain]
        return TriDiagonalInverse(self.layers, psi, sigma_inv)

    def logdet(self, damping: float = 0.0) -> Tensor:
        r""":math:`\log\det` of the damped :math:`\breve F`, minus that of :meth:`inverse` (λ>0)."""
        return -self.inverse(damping).logdet()

    def trace(self) -> Tensor:
        r""":math:`\sum_l \operatorname{tr} G_l \operatorname{tr} A_l` (exact diagonal blocks)."""
        return sum(torch.trace(G) * torch.trace(A) for G, A in zip(self.G, self.A))


class TriDiagonalInverse(LayeredOperator):
    r"""Applies :math:`\Xi^\top \Lambda \Xi` from cached :math:`\Psi` and :math:`\Sigma^{-1}`.

    Args:
        layers: Layouts, forward order.
        psi: ``L - 1`` pairs :math:`(\Psi^G_i, \Psi^A_i)`, ``None`` where the chain breaks.
        sigma_inv: ``L`` factored inverses :math:`\Sigma_{i|i+1}^{-1}`, the last
            :math:`\Sigma_L^{-1}`.
    """

    def __init__(
        self,
        layers: Sequence[KronLayer],
        psi: Sequence[tuple[Tensor, Tensor] | None],
        sigma_inv: Sequence[km.KronDifferenceInverse],
    ):
        super().__init__(layers, sigma_inv[0].W1.dtype, sigma_inv[0].W1.device)
        self.psi, self.sigma_inv = list(psi), list(sigma_inv)

    def _matmat(self, X: Tensor) -> Tensor:
        L = len(self.layers)
        v = [layer.split(Xl)[0] for layer, Xl in zip(self.layers, X.split(self.block_sizes))]
        y = list(v)
        for i in range(L - 1):  # y = Ξ v
            if self.psi[i] is not None:
                psi_g, psi_a = self.psi[i]
                y[i] = v[i] - km.sandwich(psi_g, v[i + 1], psi_a.T)
        z = [inv.matmat(yi) for inv, yi in zip(self.sigma_inv, y)]  # z = Λ y
        u = list(z)
        for i in range(L - 1):  # u = Ξ^T z
            if self.psi[i] is not None:
                psi_g, psi_a = self.psi[i]
                u[i + 1] = u[i + 1] - km.sandwich(psi_g.T, z[i], psi_a)
        return self._merge_all(X, [[ui] for ui in u])

    def state_dict(self) -> dict:
        r""":math:`\Psi` and the factored :math:`\Sigma^{-1}` as nested lists of tensors."""
        return {
            "psi": [None if p is None else list(p) for p in self.psi],
            "sigma_inv": [list(inv) for inv in self.sigma_inv],
        }

    @classmethod
    def from_state_dict(cls, layers: Sequence[KronLayer], state: dict) -> TriDiagonalInverse:
        """Rebuild the operator from :meth:`state_dict` and the layouts."""
        psi = [None if p is None else tuple(p) for p in state["psi"]]
        return cls(layers, psi, [km.KronDifferenceInverse(*inv) for inv in state["sigma_inv"]])

    def logdet(self) -> Tensor:
        r""":math:`\log\det \Lambda` (:math:`\Xi` is unit triangular) from the factored pieces."""
        return sum(inv.logdet() for inv in self.sigma_inv)
