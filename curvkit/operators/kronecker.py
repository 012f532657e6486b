r"""Block-diagonal K-FAC :math:`\hat F = \operatorname{diag}_l(G_l \otimes A_l)`.

Martens & Grosse 2015 (arXiv:1503.05671, "M&G") §4.2; Grosse & Martens 2016
(KFC) for conv layers; Botev et al. 2017 for KFLR/KFRA. A layer's block acts on
the row-major joint matrix :math:`\bar W = [W, b]` (``[out, in + 1]``), converted
from and to the flat parameter order ``[W.flatten(), b]`` at the edge
(:class:`KronLayer`). The operators take plain per-layer factor lists, so an
optimiser can pass its own moving averages; :meth:`BlockDiagonalKFAC.from_records`
reads them from an extraction pass.

Example:
    >>> import torch, curvkit as ck
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> K = ck.kfac(model, nn.CrossEntropyLoss(), (X, y), kind="kflr")
    >>> K.block_sizes, K.block_names
    ([15, 8], ['0', '2'])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.errors import ConfigError, ShapeError
from curvkit.extraction.batches import extract_batches
from curvkit.operators import kron_math as km
from curvkit.operators.base import CurvatureOperator, check_damping
from curvkit.operators.kron_base import (  # noqa: F401  (re-exported for compatibility)
    DAMPING_MODES,
    KronEigenOperator,
    KronLayer,
    LayeredOperator,
    check_factors,
    check_kind,
    check_untied,
    kron_pairs,
    layers_and_factors,
    restrict_records,
    tied_parameters,
)
from curvkit.operators.tridiag import TriDiagonalKFAC
from curvkit.records import Records

STRUCTURES = ("block-diagonal", "tridiagonal")


class BlockDiagonalKFAC(LayeredOperator):
    r"""Block-diagonal K-FAC :math:`\operatorname{diag}_l(G_l \otimes A_l)` in flat parameter order.

    Args:
        layers: Layouts, forward order.
        A: Input factors, ``[in(+1), in(+1)]`` per layer.
        G: Output factors, ``[out, out]`` per layer.
        bias_scale: Scalar ``s`` of separate bias blocks (``R \sum_n 1``, see
            :mod:`curvkit.records`); default ``1``.

    The factors are read, never modified; the eigendecompositions used by
    :meth:`inverse` and :meth:`logdet` are computed once per operator (build a new
    operator when the factors change).
    """

    def __init__(
        self,
        layers: Sequence[KronLayer],
        A: Sequence[Tensor],
        G: Sequence[Tensor],
        bias_scale: Sequence[float] | None = None,
    ):
        check_factors(layers, A, G)
        super().__init__(layers, A[0].dtype, A[0].device)
        scales = list(bias_scale) if bias_scale is not None else [1.0] * len(layers)
        self.A, self.G, self.bias_scale = list(A), list(G), scales
        self._eig = None

    @classmethod
    def from_records(cls, records: Records, kind: str = "kflr") -> BlockDiagonalKFAC:
        """Block-diagonal K-FAC from the factors of ``kind`` in ``records``."""
        return cls(*layers_and_factors(records, kind))

    def pairs(self, i: int) -> list[tuple[Tensor, Tensor]]:
        """The ``(G, A)`` Kronecker pairs of layer ``i``."""
        return kron_pairs(self.layers[i], self.A[i], self.G[i], self.bias_scale[i])

    def _apply_layer(self, i, mats):
        return [km.kron_matmat(G, A, M) for (G, A), M in zip(self.pairs(i), mats)]

    def eigendecompositions(
        self,
    ) -> list[list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]]:
        """Per layer and pair, ``((γ, U_G), (α, U_A))`` (cached; see :func:`kron_math.eigh_psd`).

        A factor shared by two pairs (a separate bias block's ``G``) is decomposed once.
        """
        if self._eig is None:
            self._eig = []
            for i in range(len(self.layers)):
                done: dict[int, tuple[Tensor, Tensor]] = {}
                blocks = []
                for G, A in self.pairs(i):
                    if id(G) not in done:
                        done[id(G)] = km.eigh_psd(G)
                    a_eig = (
                        km.eigh_psd(A)
                        if A.shape[0] > 1
                        else (A[0].clamp_min(0), torch.ones_like(A))
                    )
                    blocks.append((done[id(G)], a_eig))
                self._eig.append(blocks)
        return self._eig

    def _scales(self, damping: float, damping_mode: str):
        if damping_mode not in DAMPING_MODES:
            raise ConfigError(
                f"damping_mode={damping_mode!r} is not supported; use one of {DAMPING_MODES}."
            )
        check_damping(damping)
        out = []
        for i, layer_eig in enumerate(self.eigendecompositions()):
            # a dense block is damped exactly in either mode (it is no Kronecker product)
            factored = damping_mode == "factored" and self.layers[i].block != "dense"
            blocks = []
            for (G, A), ((gam, U_G), (alp, U_A)) in zip(self.pairs(i), layer_eig):
                shifts = km.factored_shifts(A, G, damping) if factored else None
                blocks.append((U_G, U_A, gam, alp, shifts))
            out.append(blocks)
        return out

    def inverse(self, damping: float = 0.0, damping_mode: str = "exact") -> KronEigenOperator:
        r"""The damped inverse as an operator with cached eigenbases.

        ``"exact"``: :math:`(G\otimes A + \lambda I)^{-1}` per block (docs/conventions.md).
        ``"factored"``:
        :math:`(G + \pi^{-1}\sqrt\lambda I)^{-1} \otimes (A + \pi\sqrt\lambda I)^{-1}`
        (M&G §6.3). Applying it costs four small matrix products per block
        (``"exact"``) or two (``"factored"``, kept as the two factor inverses). The
        factored inverses come from Cholesky factorisations (about five times
        cheaper than the eigendecompositions the exact mode needs) unless the
        eigendecompositions are already cached. With ``damping=0`` singular blocks
        get their pseudo-inverse.

        Args:
            damping: :math:`\lambda \ge 0`.
            damping_mode: ``"exact"`` or ``"factored"``.

        Returns:
            A :class:`KronEigenOperator`.

        Raises:
            ShapeError: On a negative damping or an unknown mode.
        """
        if damping_mode == "factored" and damping > 0 and self._eig is None:
            return KronEigenOperator(self.layers, self._factored_inverse_blocks(damping))
        blocks = []
        for layer in self._scales(damping, damping_mode):
            pairs = []
            for U_G, U_A, gam, alp, shifts in layer:
                if shifts is None:
                    pairs.append((U_G, U_A, km.kron_inverse_scale(gam, alp, damping)))
                else:
                    G_inv = km.psd_inverse(gam, U_G, shifts[1])
                    pairs.append((G_inv, km.psd_inverse(alp, U_A, shifts[0]), None))
            blocks.append(pairs)
        return KronEigenOperator(self.layers, blocks)

    def _factored_inverse_blocks(self, damping: float) -> list:
        """Factored-damping inverses by Cholesky, when no eigendecomposition is cached."""
        blocks = []
        for i in range(len(self.layers)):
            pairs = []
            for G, A in self.pairs(i):
                if self.layers[i].block == "dense":  # (G a + λ)^{-1} = (G + λ/a)^{-1} / a
                    a = A[0, 0]
                    pairs.append((km.shifted_inverse(G, damping / float(a)), 1.0 / A, None))
                    continue
                delta_a, delta_g = km.factored_shifts(A, G, damping)
                pairs.append((km.shifted_inverse(G, delta_g), km.shifted_inverse(A, delta_a), None))
            blocks.append(pairs)
        return blocks

    def logdet(self, damping: float = 0.0, damping_mode: str = "exact") -> Tensor:
        r""":math:`\log\det` of the (damped) operator from the factors' eigenvalues."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for layer in self._scales(damping, damping_mode):
            for _, _, gam, alp, shifts in layer:
                if shifts is None:
                    total = total + torch.log(torch.outer(gam, alp) + damping).sum()
                else:
                    total = total + alp.numel() * torch.log(gam + shifts[1]).sum()
                    total = total + gam.numel() * torch.log(alp + shifts[0]).sum()
        return total

    def trace(self) -> Tensor:
        r""":math:`\sum_l \operatorname{tr} G_l \operatorname{tr} A_l` (and bias blocks)."""
        return sum(
            km.trace(G) * km.trace(A) for i in range(len(self.layers)) for G, A in self.pairs(i)
        )


UNSUPPORTED = ("error", "gradient")


def check_selection(params, unsupported: str) -> None:
    """Validate ``params=`` and ``unsupported=`` of the K-FAC factories.

    Raises:
        ConfigError: Unless ``params`` is ``None`` or a non-empty sequence of tensors
            and ``unsupported`` one of :data:`UNSUPPORTED`.
    """
    if unsupported not in UNSUPPORTED:
        raise ConfigError(
            f"unsupported={unsupported!r} is not supported; use one of {UNSUPPORTED}."
        )
    if params is None:
        return
    if isinstance(params, Tensor) or not all(isinstance(p, Tensor) for p in params):
        raise ConfigError("params must be a list of the model's parameters (tensors) or None.")
    if len(params) == 0:
        raise ConfigError("params is empty; list at least one parameter, or pass None.")


def select(model: torch.nn.Module, records: Records, params) -> Records:
    """``records`` restricted to ``params``; for ``None`` all of them in the model's order.

    The graph path orders records by the modules' first calls; the operators follow
    ``model.parameters()`` instead (the order of the exact operators such as
    :func:`curvkit.ggn`), unless a layer's parameters are not contiguous there.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if params is not None:
        return restrict_records(records, list(params), names)
    covered = {id(p) for p in records.params}
    ordered = [p for p in model.parameters() if id(p) in covered]
    if [id(p) for p in ordered] == [id(p) for p in records.params]:
        return records
    try:
        return restrict_records(records, ordered, names)
    except ConfigError:  # a layer's parameters interleaved with another's: call order
        return records


def kfac(
    model: torch.nn.Module,
    loss_func: torch.nn.Module,
    data,
    kind: str = "kfac",
    structure: str = "block-diagonal",
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    seed: int = 0,
    factor_dtype: torch.dtype | None = None,
    params: Sequence[Tensor] | None = None,
    unsupported: str = "error",
) -> CurvatureOperator:
    r"""K-FAC approximation of the Fisher/GGN on a data set.

    Factors are extracted per batch and combined with the global normalisation
    (:func:`extract_batches`), so several batches give
    exactly the operator of one concatenated batch (deterministic kinds).

    Any model :func:`curvkit.extract` supports works: on the graph path every
    block layout of :class:`~curvkit.records.LayerRecord` (``"kron"``, grouped and
    transposed convolutions, embeddings, dense normalisation blocks) becomes a
    block of the operator (see :class:`~curvkit.operators.kron_base.KronLayer`).
    This is the only place that chooses the operator for a ``structure``.

    Args:
        model: Any ``nn.Module`` the extraction supports (``nn.Sequential`` chains
            by the sweep, everything else by the graph path).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: One ``(X, y)`` batch or an iterable of batches.
        kind: ``"kfac"`` (Monte Carlo), ``"kflr"`` (exact), ``"kfra"`` (Linear
            chains) or ``"empirical"``.
        structure: ``"block-diagonal"`` (:class:`BlockDiagonalKFAC`) or
            ``"tridiagonal"`` (:class:`~curvkit.operators.tridiag.TriDiagonalKFAC`:
            coupled pairs of consecutive Kronecker-factored ``Linear`` layers, every
            other block block-diagonal, listed in a warning; KFRA has no cross
            factors, so its tri-diagonal form is block-diagonal).
        mc_samples: Monte Carlo samples for ``kind="kfac"``.
        separate_bias: Separate weight and bias blocks instead of a joint ``[W, b]`` block.
        kfac_approx: ``"expand"`` or ``"reduce"`` for conv layers and weight sharing.
        seed: Seed of the label sampling for ``kind="kfac"``.
        factor_dtype: dtype of the factors (default: the model's).
        params: The parameters the operator covers, in their order (as curvlinops'
            ``KFACLinearOperator``); default: every parameter with curvature. A
            layer's weight and bias must be next to each other, weight first; one of
            them alone gets its sub-block (see
            :func:`~curvkit.operators.kron_base.restrict_records`); the tri-diagonal
            chain then couples only pairs of whole layers that stay consecutive.
            ``None``: every parameter with curvature, in ``model.parameters()`` order
            (the graph path's records are in call order; see :func:`select`).
        unsupported: ``"error"`` (default) or ``"gradient"``: modules without a
            curvature rule are skipped (their parameters are not covered), passed to
            :func:`curvkit.extract`.

    Returns:
        The operator.

    Raises:
        ShapeError: On an unknown ``kind`` or ``structure``.
        ConfigError: On bad ``params`` or ``unsupported`` (see :func:`check_selection`).
        UnsupportedModuleError: For a weight tied between two modules (see
            :func:`check_untied`), or from the extraction.
        UnsupportedLossError: From the extraction.
    """
    check_kind(kind)
    if structure not in STRUCTURES:
        raise ShapeError(f"structure={structure!r} is not supported; use one of {STRUCTURES}.")
    check_selection(params, unsupported)
    tridiagonal = structure == "tridiagonal"
    records = extract_batches(
        model,
        loss_func,
        data,
        quantities=(kind, "cross") if tridiagonal and kind != "kfra" else (kind,),
        mc_samples=mc_samples,
        separate_bias=separate_bias,
        kfac_approx=kfac_approx,
        seed=seed,
        factor_dtype=factor_dtype,
        unsupported=unsupported,
    )
    records = select(model, records, params)
    if tridiagonal:
        return TriDiagonalKFAC.from_records(records, kind)
    return BlockDiagonalKFAC.from_records(records, kind)
