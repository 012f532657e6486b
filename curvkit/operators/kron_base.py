r"""Shared pieces of the Kronecker operators: layouts, factor checks, layered operators.

:class:`KronLayer` converts a layer's flat parameter columns to the matrices its
Kronecker pairs act on and back; :class:`LayeredOperator` is the block-diagonal
skeleton of every Kronecker operator, :class:`KronEigenOperator` the common form
of damped inverses and of EKFAC. The concrete operators live in
:mod:`~curvkit.operators.kronecker` (block-diagonal K-FAC),
:mod:`~curvkit.operators.tridiag` and :mod:`~curvkit.operators.ekfac`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.errors import ShapeError
from curvkit.extraction.batches import check_untied, tied_parameters
from curvkit.operators import kron_math as km
from curvkit.operators.base import CurvatureOperator
from curvkit.records import FACTOR_KINDS, LayerRecord, Records

__all__ = [
    "DAMPING_MODES",
    "KronEigenOperator",
    "KronLayer",
    "LayeredOperator",
    "check_factors",
    "check_kind",
    "check_untied",
    "kron_pairs",
    "layers_and_factors",
    "tied_parameters",
]

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
