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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.data import as_batches, num_data
from curvkit.errors import ShapeError, UnsupportedModuleError
from curvkit.operators import kron_math as km
from curvkit.operators.base import CurvatureOperator, check_damping
from curvkit.records import FACTOR_KINDS, LayerRecord, Records

STRUCTURES = ("block-diagonal", "tridiagonal")
DAMPING_MODES = ("exact", "factored")


@dataclass(frozen=True)
class KronLayer:
    r"""Shape information of one layer's Kronecker block (no factors).

    Attributes:
        name: Layer name (the block's name).
        weight_shape: Shape of the weight (``[out, in]`` or ``[C_out, C_in, *kernel]``).
        has_bias: Whether the layer has a trainable bias (flat order ``[W, b]``).
        separate_bias: ``True``: weight block :math:`G \otimes A` and bias block
            :math:`G \cdot s`; ``False``: one block over ``[W, b]``.
    """

    name: str
    weight_shape: torch.Size
    has_bias: bool
    separate_bias: bool = False

    @classmethod
    def from_record(cls, rec: LayerRecord) -> KronLayer:
        """The layout of a :class:`~curvkit.records.LayerRecord`."""
        return cls(rec.name, torch.Size(rec.params[0].shape), rec.has_bias, rec.separate_bias)

    @property
    def out_features(self) -> int:
        """Rows of the weight matrix."""
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the flattened weight matrix."""
        return self.weight_shape[1:].numel()

    @property
    def joint(self) -> bool:
        """Whether the block covers ``[W, b]`` jointly."""
        return self.has_bias and not self.separate_bias

    @property
    def param_shapes(self) -> list[torch.Size]:
        """Shapes of the layer's parameters in flat order."""
        return [self.weight_shape] + ([torch.Size([self.out_features])] if self.has_bias else [])

    @property
    def numel(self) -> int:
        """Number of parameters (the block size)."""
        return self.out_features * (self.in_features + int(self.has_bias))

    def split(self, X: Tensor) -> list[Tensor]:
        """Flat columns ``[numel, k]`` to matrices ``[k, out, ·]``: ``[W|b]``, or ``W``, ``b``."""
        out, inn, k = self.out_features, self.in_features, X.shape[1]
        W = X[: out * inn].reshape(out, inn, k)
        if not self.has_bias:
            return [W.permute(2, 0, 1)]
        b = X[out * inn :].reshape(out, 1, k)
        if self.joint:
            return [torch.cat([W, b], dim=1).permute(2, 0, 1)]
        return [W.permute(2, 0, 1), b.permute(2, 0, 1)]

    def merge(self, mats: Sequence[Tensor], out: Tensor) -> Tensor:
        """Inverse of :meth:`split`: matrices ``[k, out, ·]`` into ``out`` ``[numel, k]``."""
        k, rows, inn = mats[0].shape[0], self.out_features, self.in_features
        W = mats[0][..., :inn]
        out[: rows * inn].view(rows, inn, k).copy_(W.permute(1, 2, 0))
        if self.has_bias:
            b = mats[0][..., inn] if self.joint else mats[1][..., 0]
            out[rows * inn :].copy_(b.T)
        return out


def layers_and_factors(records: Records, kind: str) -> tuple[list[KronLayer], list, list, list]:
    """Layouts and ``(A, G, bias_scale)`` lists of ``kind`` from a :class:`Records`.

    Raises:
        ShapeError: If ``kind`` is unknown or missing from a layer's records.
    """
    check_kind(kind)
    for rec in records:
        block = getattr(rec, "block", "kron")
        if block != "kron":
            raise ShapeError(
                f"Layer {rec.name!r} ({type(rec.module).__name__}) has a {block!r} curvature "
                "block (graph path), not a G ⊗ A factorisation over its weight; Kronecker "
                "operators need Linear/Conv layers with groups=1 (see docs/conventions.md)."
            )
        if rec.A is None or kind not in rec.G:
            raise ShapeError(
                f"Layer {rec.name!r} has no Kronecker factors of kind {kind!r} "
                f"(extracted: {sorted(rec.G)}); extract with quantities=({kind!r},)."
            )
    layers = [KronLayer.from_record(rec) for rec in records]
    return (
        layers,
        [r.A for r in records],
        [r.G[kind] for r in records],
        [r.bias_scale for r in records],
    )


def tied_parameters(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Module]]]:
    """Trainable parameters registered in more than one module (tied weights).

    A module object used at two places counts as two modules (its parameters are
    tied between them).

    Returns:
        Per shared parameter, its ``(qualified name, owning module)`` pairs.
    """
    owners: dict[int, list] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append(
                    (f"{mname}.{pname}" if mname else pname, module)
                )
    return [pairs for pairs in owners.values() if len(pairs) > 1]


def check_untied(model: torch.nn.Module, what: str) -> None:
    """Raise unless every trainable parameter belongs to one module.

    Kronecker factors (and the extraction's per-layer diagonals) describe one
    module's use of its weight; a weight shared by two modules has a curvature
    block that is no Kronecker product of either module's factors.

    Raises:
        UnsupportedModuleError: Naming the parameter and both modules.
    """
    tied = tied_parameters(model)
    if tied:
        (n1, m1), (n2, m2) = tied[0][:2]
        raise UnsupportedModuleError(
            f"{what}: {n1!r} ({type(m1).__name__}) and {n2!r} ({type(m2).__name__}) are one "
            "tied parameter; Kronecker factors are per module, so a weight shared by two "
            "modules has no Kronecker block. Untie the weights, or use the exact operators "
            "(curvkit.ggn, curvkit.fisher, curvkit.hessian), which count a tied weight once."
        )


def check_kind(kind: str, kinds: Sequence[str] = FACTOR_KINDS) -> None:
    """Raise :class:`ShapeError` unless ``kind`` is one of ``kinds``."""
    if kind not in kinds:
        raise ShapeError(f"kind={kind!r} is not supported; use one of {tuple(kinds)}.")


def check_factors(layers: Sequence[KronLayer], A: Sequence[Tensor], G: Sequence[Tensor]) -> None:
    """Raise :class:`ShapeError` unless each layer has an ``A`` and a ``G`` of the right size."""
    if not (len(layers) == len(A) == len(G)):
        raise ShapeError(f"Got {len(layers)} layers, {len(A)} A factors and {len(G)} G factors.")
    for layer, a, g in zip(layers, A, G):
        need = (layer.in_features + int(layer.joint), layer.out_features)
        if a.shape != (need[0], need[0]) or g.shape != (need[1], need[1]):
            raise ShapeError(
                f"Layer {layer.name!r}: factors A{tuple(a.shape)}, G{tuple(g.shape)} do not "
                f"fit the weight {tuple(layer.weight_shape)}: expected A of size {need[0]} "
                f"and G of size {need[1]}."
            )


def kron_pairs(
    layer: KronLayer, A: Tensor, G: Tensor, bias_scale: float
) -> list[tuple[Tensor, Tensor]]:
    r"""The ``(G, A)`` Kronecker pairs of a layer in :meth:`KronLayer.split` order.

    A separate bias block :math:`G \cdot s` is the pair ``(G, [[s]])``.
    """
    pairs = [(G, A)]
    if layer.has_bias and layer.separate_bias:
        pairs.append((G, A.new_full((1, 1), float(bias_scale))))
    return pairs


class LayeredOperator(CurvatureOperator):
    """A block-diagonal operator with one block per :class:`KronLayer`."""

    def __init__(self, layers: Sequence[KronLayer], dtype, device):
        self.layers = list(layers)
        shapes = [s for layer in self.layers for s in layer.param_shapes]
        super().__init__(
            shapes,
            dtype,
            device,
            [layer.numel for layer in self.layers],
            [la.name for la in self.layers],
        )

    def _apply_layer(self, i: int, mats: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def _merge_all(self, X: Tensor, mats: Iterable[Sequence[Tensor]]) -> Tensor:
        """Per layer the matrices of :meth:`KronLayer.split` into flat columns shaped like ``X``.

        ``mats`` may be a generator: each layer's result is merged before the next is made.
        """
        out = torch.empty_like(X)
        for layer, M, Ol in zip(self.layers, mats, out.split(self.block_sizes)):
            layer.merge(M, Ol)
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        parts = zip(self.layers, X.split(self.block_sizes))
        results = (self._apply_layer(i, layer.split(Xl)) for i, (layer, Xl) in enumerate(parts))
        return self._merge_all(X, results)


class KronEigenOperator(LayeredOperator):
    r"""Per layer :math:`(U_G \otimes U_A)\operatorname{diag}(\mathrm{vec} S)(U_G\otimes U_A)^\top`.

    The common form of damped K-FAC inverses and of EKFAC: an orthonormal
    Kronecker basis per block with arbitrary positive scales. A pair whose scale
    is ``None`` is a plain Kronecker product :math:`L \otimes R` instead (a rank-one
    ``S`` folded into the bases, as for factored damping): two matrix products
    per block instead of four.

    Args:
        layers: Layouts, forward order.
        blocks: Per layer, one ``(U_G, U_A, S)`` or ``(L, R, None)`` per Kronecker
            pair (see :func:`kron_pairs`).
    """

    def __init__(
        self, layers: Sequence[KronLayer], blocks: Sequence[Sequence[tuple[Tensor, Tensor, Tensor]]]
    ):
        first = blocks[0][0][0]
        super().__init__(layers, first.dtype, first.device)
        self.blocks = [list(b) for b in blocks]

    def _apply_layer(self, i, mats):
        return [
            km.kron_matmat(U_G, U_A, M) if S is None else km.eigenbasis_matmat(U_G, U_A, S, M)
            for (U_G, U_A, S), M in zip(self.blocks[i], mats)
        ]

    def state_dict(self) -> dict:
        """The bases and scales as nested lists of tensors (``torch.save``-able)."""
        return {"blocks": [[list(pair) for pair in layer] for layer in self.blocks]}

    @classmethod
    def from_state_dict(cls, layers: Sequence[KronLayer], state: dict):
        """Rebuild the operator from :meth:`state_dict` and the layouts."""
        return cls(layers, [[tuple(pair) for pair in layer] for layer in state["blocks"]])


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
        """Per layer and pair, ``((γ, U_G), (α, U_A))`` (cached; see :func:`kron_math.eigh_psd`)."""
        if self._eig is None:
            self._eig = []
            for i in range(len(self.layers)):
                g_eig = km.eigh_psd(self.G[i])
                blocks = []
                for _, A in self.pairs(i):
                    a_eig = (
                        km.eigh_psd(A)
                        if A.shape[0] > 1
                        else (A[0].clamp_min(0), torch.ones_like(A))
                    )
                    blocks.append((g_eig, a_eig))
                self._eig.append(blocks)
        return self._eig

    def _scales(self, damping: float, damping_mode: str):
        if damping_mode not in DAMPING_MODES:
            raise ShapeError(
                f"damping_mode={damping_mode!r} is not supported; use one of {DAMPING_MODES}."
            )
        check_damping(damping)
        out = []
        for i, layer_eig in enumerate(self.eigendecompositions()):
            blocks = []
            for (G, A), ((gam, U_G), (alp, U_A)) in zip(self.pairs(i), layer_eig):
                shifts = km.factored_shifts(A, G, damping) if damping_mode == "factored" else None
                blocks.append((U_G, U_A, gam, alp, shifts))
            out.append(blocks)
        return out

    def inverse(self, damping: float = 0.0, damping_mode: str = "exact") -> KronEigenOperator:
        r"""The damped inverse as an operator with cached eigenbases.

        ``"exact"``: :math:`(G\otimes A + \lambda I)^{-1}` per block (MATH.md).
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
            torch.trace(G) * torch.trace(A)
            for i in range(len(self.layers))
            for G, A in self.pairs(i)
        )


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
) -> CurvatureOperator:
    r"""K-FAC approximation of the Fisher/GGN on a data set.

    Factors are extracted per batch and combined with the global normalisation
    (:func:`extract_batches`), so several batches give
    exactly the operator of one concatenated batch (deterministic kinds).

    Args:
        model: An ``nn.Sequential`` of modules BackPACK supports.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: One ``(X, y)`` batch or an iterable of batches.
        kind: ``"kfac"`` (Monte Carlo), ``"kflr"`` (exact), ``"kfra"`` (Linear
            chains) or ``"empirical"``.
        structure: ``"block-diagonal"`` (:class:`BlockDiagonalKFAC`) or
            ``"tridiagonal"`` (:class:`~curvkit.operators.tridiag.TriDiagonalKFAC`;
            KFRA has no cross factors, so its tri-diagonal form is block-diagonal
            and says so in a warning).
        mc_samples: Monte Carlo samples for ``kind="kfac"``.
        separate_bias: Separate weight and bias blocks instead of a joint ``[W, b]`` block.
        kfac_approx: ``"expand"`` or ``"reduce"`` for conv layers.
        seed: Seed of the label sampling for ``kind="kfac"``.
        factor_dtype: dtype of the factors (default: the model's).

    Returns:
        The operator.

    Raises:
        ShapeError: On an unknown ``kind`` or ``structure``.
        UnsupportedModuleError: For a weight tied between two modules (see
            :func:`check_untied`), or from the extraction.
        UnsupportedLossError: From the extraction.
    """
    check_kind(kind)
    if structure not in STRUCTURES:
        raise ShapeError(f"structure={structure!r} is not supported; use one of {STRUCTURES}.")
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
    )
    if tridiagonal:
        from curvkit.operators.tridiag import TriDiagonalKFAC

        return TriDiagonalKFAC.from_records(records, kind)
    return BlockDiagonalKFAC.from_records(records, kind)


_R_WEIGHTED = ("A", "cross_A", "diag_ggn", "diag_ggn_mc", "diag_hessian", "batch_grad")


def _combine(acc: LayerRecord | None, rec: LayerRecord, wr: float, wg: float) -> LayerRecord:
    """``acc + weights * rec`` for one layer (``weights * rec`` when ``acc`` is ``None``).

    ``R``-weighted quantities get ``wr``, averaged ``G`` factors ``wg``; per-example
    gradients are concatenated along the example axis. Updates ``rec`` in place.
    """
    for name in _R_WEIGHTED:
        value = getattr(rec, name)
        if value is None:
            continue
        old = None if acc is None else getattr(acc, name)
        if not isinstance(value, list):
            setattr(rec, name, value * wr if old is None else old + value * wr)
        elif old is None:
            setattr(rec, name, [v * wr for v in value])
        elif name == "batch_grad":
            setattr(rec, name, [torch.cat([a, v * wr]) for a, v in zip(old, value)])
        else:
            setattr(rec, name, [a + v * wr for a, v in zip(old, value)])
    if rec.grad_factors is not None:
        g, a = rec.grad_factors
        old = None if acc is None else acc.grad_factors
        rec.grad_factors = (
            (g * wr, a) if old is None else (torch.cat([old[0], g * wr]), torch.cat([old[1], a]))
        )
    old = {} if acc is None else acc.curvature_grad_factors
    for kind, (rows, a) in rec.curvature_grad_factors.items():
        if kind in old:
            rows, a = torch.cat([old[kind][0], rows * wr], dim=1), torch.cat([old[kind][1], a])
        else:
            rows = rows * wr
        rec.curvature_grad_factors[kind] = (rows, a)
    for name in ("G", "cross_G"):
        old = {} if acc is None else getattr(acc, name)
        new = {k: v * wg + old[k] if k in old else v * wg for k, v in getattr(rec, name).items()}
        setattr(rec, name, new)
    rec.bias_scale = rec.bias_scale * wr + (0.0 if acc is None else acc.bias_scale)
    return rec


def extract_batches(model, loss_func, data, quantities, seed: int = 0, **kwargs) -> Records:
    r"""Extract ``quantities`` on every batch of ``data`` and combine them globally.

    With :math:`N = \sum_b N_b` and the global :math:`R` (``1/N`` or ``1``), each
    batch's ``R``-weighted quantities (``A``, cross ``A``, diagonals, per-example
    gradients, ``bias_scale``, the loss) are multiplied by :math:`R / R_b`
    (:math:`N_b/N` for ``"mean"``, ``1`` for ``"sum"``) and summed, and the averaged
    ``G`` factors by :math:`N_b/N`. Several batches thus give exactly the records of
    one concatenated batch (up to Monte Carlo sampling). Per-example gradients are
    concatenated. Label sampling uses one ``torch.Generator`` seeded with ``seed``.
    The parameters' ``.grad`` are left as they were.

    Args:
        model: The model.
        loss_func: The loss (its ``reduction`` sets :math:`R`).
        data: One ``(X, y)`` batch or an iterable of batches.
        quantities: What :func:`curvkit.extraction.extract` should compute.
        seed: Seed of the label sampling (``"kfac"``, ``"diag_ggn_mc"``).
        **kwargs: Passed on to :func:`curvkit.extraction.extract`.

    Returns:
        The combined :class:`~curvkit.records.Records`.

    Raises:
        UnsupportedModuleError: For a weight tied between two modules (see
            :func:`check_untied`), or from the extraction.
    """
    from curvkit.extraction import extract

    check_untied(model, "Kronecker and diagonal extraction")
    batches = as_batches(data)
    total = num_data(batches)
    mean = getattr(loss_func, "reduction", "mean") == "mean"
    generator = None
    if any(q in ("kfac", "diag_ggn_mc") for q in quantities):
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    combined = None
    try:
        for X, y in batches:
            rec = extract(model, loss_func, X, y, quantities, generator=generator, **kwargs)
            if len(batches) == 1:
                return rec
            wr, wg = (X.shape[0] / total if mean else 1.0), X.shape[0] / total
            previous = [None] * len(rec) if combined is None else combined.layers
            rec.layers = [_combine(a, r, wr, wg) for a, r in zip(previous, rec.layers)]
            rec.loss = rec.loss * wr + (0.0 if combined is None else combined.loss)
            rec.reduction_factor = rec.reduction_factor * wr  # R_b * R / R_b = R
            combined = rec
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
    combined.batch_size = total
    return combined
