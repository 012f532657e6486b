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
kind without cross factors, any layer whose block is not one Kronecker product
:math:`G \otimes A` over ``[W, b]``: grouped or transposed convolutions,
embeddings, normalisation layers, separate bias blocks on the graph path),
:math:`\Psi_{i,i+1} = 0`: the chain breaks and that pair is treated
block-diagonally; such a layer's own block is that of
:class:`~curvkit.operators.kronecker.BlockDiagonalKFAC` (its inverse with factored
damping per Kronecker pair, exact damping for dense blocks).
:attr:`TriDiagonalKFAC.fallback_pairs` lists these pairs, and the operator warns
once when it is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor

from curvkit.errors import ShapeError
from curvkit.operators import kron_math as km
from curvkit.operators.kron_base import (
    KronLayer,
    LayeredOperator,
    check_factors,
    kron_pairs,
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
        bias_scale: Scalar of separate bias blocks of layers outside the chain (as
            for :class:`~curvkit.operators.kronecker.BlockDiagonalKFAC`).
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
            if layer.block == "kron" and layer.has_bias and layer.separate_bias:
                raise ShapeError(
                    f"Layer {layer.name!r}: the tri-diagonal structure needs joint [W, b] blocks; "
                    "extract with separate_bias=False."
                )
        self.A, self.G = list(A), list(G)
        self.bias_scale = list(bias_scale) if bias_scale is not None else [1.0] * len(layers)
        self.cross_A, self.cross_G = [], []
        self.fallback_pairs = []
        reasons = list(reasons) if reasons is not None else [None] * len(cross_A)
        for i, (cA, cG) in enumerate(zip(cross_A, cross_G)):
            coupled = self.layers[i].simple and self.layers[i + 1].simple
            if cA is None or cG is None or not coupled:
                cA = cG = None
                why = reasons[i] or (
                    "no cross factor" if coupled else "not a pair of single Kronecker blocks"
                )
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
        layers, A, G, scales = layers_and_factors(records, kind)
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
        return cls(layers, A, G, cross_A, cross_G, scales, reasons=reasons)

    # -- factor algebra ------------------------------------------------------------
    def eigendecompositions(self) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """Per layer ``((γ, U_G), (α, U_A))`` of the undamped factors (cached).

        ``None`` for a layer that is no single Kronecker block (see :attr:`KronLayer.simple`).
        """
        if self._eig is None:
            self._eig = [
                (km.eigh_psd(G), km.eigh_psd(A)) if layer.simple else None
                for layer, G, A in zip(self.layers, self.G, self.A)
            ]
        return self._eig

    def pairs(self, i: int) -> list[tuple[Tensor, Tensor]]:
        """The ``(G, A)`` Kronecker pairs of layer ``i`` (see :func:`kron_pairs`)."""
        return kron_pairs(self.layers[i], self.A[i], self.G[i], self.bias_scale[i])

    def _block_inverse(self, i: int, damping: float) -> list[km.KronDifferenceInverse]:
        """Inverse of a layer outside the chain, per Kronecker pair.

        Factored damping (M&G §6.3) per pair; a dense block is damped exactly; with
        ``damping=0`` the pseudo-inverse.
        """
        out = []
        for G, A in self.pairs(i):
            if damping == 0:
                A_inv = km.psd_inverse(*km.eigh_psd(A)) if A.shape[0] > 1 else km.safe_reciprocal(A)
                out.append(km.KronDifferenceInverse(km.psd_inverse(*km.eigh_psd(G)), A_inv))
            elif self.layers[i].block == "dense":  # (G a + λ)^{-1} = (G + λ/a)^{-1} / a
                G_inv = km.shifted_inverse(G, damping / float(A[0, 0]))
                out.append(km.KronDifferenceInverse(G_inv, 1.0 / A))
            else:
                delta_a, delta_g = km.factored_shifts(A, G, damping)
                out.append(
                    km.KronDifferenceInverse(
                        km.shifted_inverse(G, delta_g), km.shifted_inverse(A, delta_a)
                    )
                )
        return out

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
        return [
            km.factored_shifts(A, G, damping) if layer.simple else (0.0, 0.0)
            for layer, A, G in zip(self.layers, self.A, self.G)
        ]

    # -- products ------------------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        if self._chain_cache is None:
            self._chain_cache = self._chain(self._shifts(0.0))
        chain, L = self._chain_cache, len(self.layers)
        mats = [layer.split(Xl) for layer, Xl in zip(self.layers, X.split(self.block_sizes))]
        w = [m[0] for m in mats]
        for i in range(L - 1):  # w = Ξ^{-T} v (forward substitution)
            if chain[i] is not None:
                psi_g, psi_a = chain[i][:2]
                w[i + 1] = w[i + 1] + km.sandwich(psi_g.T, w[i], psi_a)
        z = []
        for i in range(L):  # z = Λ^{-1} w
            if not self.layers[i].simple:  # outside the chain: the layer's own block
                z.append([km.kron_matmat(G, A, M) for (G, A), M in zip(self.pairs(i), mats[i])])
                continue
            zi = km.sandwich(self.G[i], w[i], self.A[i])
            if i < L - 1 and chain[i] is not None:
                D, E = chain[i][2:]
                zi = zi - km.sandwich(D, w[i], E)
            z.append([zi])
        for i in reversed(range(L - 1)):  # u = Ξ^{-1} z (back substitution)
            if chain[i] is not None:
                psi_g, psi_a = chain[i][:2]
                z[i][0] = z[i][0] + km.sandwich(psi_g, z[i + 1][0], psi_a.T)
        return self._merge_all(X, z)

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
            if not self.layers[i].simple:
                inv = self._block_inverse(i, damping)
            elif i < len(chain) and chain[i] is not None:
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
        return sum(
            km.trace(G) * km.trace(A) for i in range(len(self.layers)) for G, A in self.pairs(i)
        )


class TriDiagonalInverse(LayeredOperator):
    r"""Applies :math:`\Xi^\top \Lambda \Xi` from cached :math:`\Psi` and :math:`\Sigma^{-1}`.

    Args:
        layers: Layouts, forward order.
        psi: ``L - 1`` pairs :math:`(\Psi^G_i, \Psi^A_i)`, ``None`` where the chain breaks.
        sigma_inv: ``L`` factored inverses :math:`\Sigma_{i|i+1}^{-1}`, the last
            :math:`\Sigma_L^{-1}`; for a layer outside the chain that is no single
            Kronecker block, a list with one inverse per Kronecker pair.
    """

    def __init__(
        self,
        layers: Sequence[KronLayer],
        psi: Sequence[tuple[Tensor, Tensor] | None],
        sigma_inv: Sequence[km.KronDifferenceInverse],
    ):
        first = sigma_inv[0][0] if isinstance(sigma_inv[0], list) else sigma_inv[0]
        super().__init__(layers, first.W1.dtype, first.W1.device)
        self.psi, self.sigma_inv = list(psi), list(sigma_inv)

    def _matmat(self, X: Tensor) -> Tensor:
        L = len(self.layers)
        mats = [layer.split(Xl) for layer, Xl in zip(self.layers, X.split(self.block_sizes))]
        v = [m[0] for m in mats]
        y = list(v)
        for i in range(L - 1):  # y = Ξ v
            if self.psi[i] is not None:
                psi_g, psi_a = self.psi[i]
                y[i] = v[i] - km.sandwich(psi_g, v[i + 1], psi_a.T)
        z = [  # z = Λ y; a layer outside the chain: its own inverse per pair
            [p.matmat(M) for p, M in zip(inv, m)] if isinstance(inv, list) else [inv.matmat(yi)]
            for inv, yi, m in zip(self.sigma_inv, y, mats)
        ]
        u = [list(zi) for zi in z]
        for i in range(L - 1):  # u = Ξ^T z
            if self.psi[i] is not None:
                psi_g, psi_a = self.psi[i]
                u[i + 1][0] = u[i + 1][0] - km.sandwich(psi_g.T, z[i][0], psi_a)
        return self._merge_all(X, u)

    def state_dict(self) -> dict:
        r""":math:`\Psi` and the factored :math:`\Sigma^{-1}` as nested lists of tensors."""
        return {
            "psi": [None if p is None else list(p) for p in self.psi],
            "sigma_inv": [
                [list(p) for p in inv] if isinstance(inv, list) else list(inv)
                for inv in self.sigma_inv
            ],
        }

    @classmethod
    def from_state_dict(cls, layers: Sequence[KronLayer], state: dict) -> TriDiagonalInverse:
        """Rebuild the operator from :meth:`state_dict` and the layouts."""
        psi = [None if p is None else tuple(p) for p in state["psi"]]
        sigma_inv = [
            [km.KronDifferenceInverse(*p) for p in inv]
            if isinstance(inv[0], (list, tuple))
            else km.KronDifferenceInverse(*inv)
            for inv in state["sigma_inv"]
        ]
        return cls(layers, psi, sigma_inv)

    def logdet(self) -> Tensor:
        r""":math:`\log\det \Lambda` (:math:`\Xi` is unit triangular) from the factored pieces."""
        return sum(
            sum(p.logdet() for p in inv) if isinstance(inv, list) else inv.logdet()
            for inv in self.sigma_inv
        )
