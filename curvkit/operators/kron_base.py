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
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor

from curvkit.errors import ConfigError, ShapeError
from curvkit.extraction.batches import check_untied, tied_parameters
from curvkit.operators import kron_math as km
from curvkit.operators.base import CurvatureOperator
from curvkit.records import FACTOR_KINDS, LayerRecord, Records

__all__ = [
    "BLOCKS",
    "DAMPING_MODES",
    "KronEigenOperator",
    "KronLayer",
    "LayeredOperator",
    "check_factors",
    "check_kind",
    "check_untied",
    "kron_pairs",
    "layers_and_factors",
    "record_factors",
    "restrict_records",
    "tied_parameters",
]

DAMPING_MODES = ("exact", "factored")


#: Layouts of a layer's curvature block (:attr:`~curvkit.records.LayerRecord.block`).
BLOCKS = ("kron", "kron_grouped", "kron_transposed", "embedding", "dense")


@lru_cache(maxsize=64)
def _transposed_index(weight_shape: torch.Size, groups: int) -> Tensor:
    r"""Flat weight positions in the row-major order of the convolution weight :math:`W'`.

    ``ConvTranspose`` weight ``[C_in, C_out/G, *kernel]``:
    :math:`W'_g[o, i, \kappa] = W[g C_\text{in}/G + i, o, \kappa_\text{max} - \kappa]`, the
    rows of :math:`W'` ``[C_out, C_in/G * prod(kernel)]`` ordered by ``(g, o)``.
    """
    c_in, o, *kernel = weight_shape
    idx = torch.arange(weight_shape.numel()).reshape(groups, c_in // groups, o, *kernel)
    idx = idx.transpose(1, 2).flip(tuple(range(3, 3 + len(kernel))))
    return idx.reshape(-1)


@dataclass(frozen=True)
class KronLayer:
    r"""Shape information of one layer's curvature block (no factors).

    The block acts on matrices cut from the layer's flat parameter columns
    (:meth:`split`), one per Kronecker pair of :func:`kron_pairs`:

    - ``"kron"``: the row-major ``[W, b]`` (``[out, in + 1]``), or ``W`` and ``b``
      (``[out, 1]``) with ``separate_bias``;
    - ``"kron_grouped"``: per group ``g`` the rows ``g·o … (g+1)·o − 1`` of that
      matrix (``o = out / groups``), weight and bias pair per group with
      ``separate_bias``;
    - ``"kron_transposed"``: as ``"kron_grouped"`` over the convolution weight
      :math:`W'` of a transposed convolution (a permutation of the flat weight,
      see :mod:`curvkit.records`);
    - ``"embedding"``: the weight ``[num_embeddings, dim]``, pair
      :math:`(\operatorname{diag}(A_\text{diag}), G)`;
    - ``"dense"``: the flat parameters as one column ``[D, 1]``, pair
      ``(dense block, [[1]])``.

    Attributes:
        name: Layer name (the block's name).
        weight_shape: Shape of the weight (``[out, in]`` or ``[C_out, C_in, *kernel]``;
            ``[C_in, C_out/groups, *kernel]`` for a transposed convolution).
        has_bias: Whether the layer has a trainable bias (flat order ``[W, b]``).
        separate_bias: ``True``: weight block :math:`G \otimes A` and bias block
            :math:`G \cdot s`; ``False``: one block over ``[W, b]``.
        block: One of :data:`BLOCKS`.
        groups: Groups of a ``"kron_grouped"``/``"kron_transposed"`` block.
        shapes: ``"dense"`` blocks: the parameter shapes in flat order.
    """

    name: str
    weight_shape: torch.Size
    has_bias: bool
    separate_bias: bool = False
    block: str = "kron"
    groups: int = 1
    shapes: tuple = ()

    @classmethod
    def from_record(cls, rec: LayerRecord) -> KronLayer:
        """The layout of a :class:`~curvkit.records.LayerRecord`."""
        block = getattr(rec, "block", "kron")
        weight = torch.Size(rec.params[0].shape)
        if block == "dense":
            shapes = tuple(torch.Size(p.shape) for p in rec.params)
            return cls(rec.name, weight, rec.has_bias, False, block, 1, shapes)
        groups = 1
        if block in ("kron_grouped", "kron_transposed"):
            groups = int(getattr(rec.module, "groups", 1))
        return cls(rec.name, weight, rec.has_bias, rec.separate_bias, block, groups)

    @property
    def out_features(self) -> int:
        """Rows of the weight matrix (of :math:`W'` for a transposed convolution)."""
        if self.block == "dense":
            return self.numel
        if self.block == "kron_transposed":
            return self.weight_shape[1] * self.groups
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the flattened weight matrix (per group for grouped blocks)."""
        if self.block == "dense":
            return 1
        if self.block == "kron_transposed":
            return self.weight_shape[0] // self.groups * self.weight_shape[2:].numel()
        return self.weight_shape[1:].numel()

    @property
    def joint(self) -> bool:
        """Whether the block covers ``[W, b]`` jointly."""
        return self.has_bias and not self.separate_bias and self.block != "dense"

    @property
    def simple(self) -> bool:
        r"""Whether the block is one Kronecker product :math:`G \otimes A` over ``[W(, b)]``."""
        return self.block == "kron" and not (self.has_bias and self.separate_bias)

    @property
    def param_shapes(self) -> list[torch.Size]:
        """Shapes of the layer's parameters in flat order."""
        if self.block == "dense":
            return list(self.shapes)
        return [self.weight_shape] + ([torch.Size([self.out_features])] if self.has_bias else [])

    @property
    def numel(self) -> int:
        """Number of parameters (the block size)."""
        if self.block == "dense":
            return sum(s.numel() for s in self.shapes)
        return self.out_features * (self.in_features + int(self.has_bias))

    def split(self, X: Tensor) -> list[Tensor]:
        """Flat columns ``[numel, k]`` to the matrices ``[k, ·, ·]`` of the Kronecker pairs."""
        k = X.shape[1]
        if self.block == "dense":
            return [X.T.unsqueeze(-1)]
        if self.block == "embedding":
            return [X.reshape(*self.weight_shape, k).permute(2, 0, 1)]
        out, inn = self.out_features, self.in_features
        W = X[: out * inn]
        if self.block == "kron_transposed":
            W = W[_transposed_index(self.weight_shape, self.groups).to(X.device)]
        W = W.reshape(out, inn, k)
        if not self.has_bias:
            mats = [W.permute(2, 0, 1)]
        else:
            b = X[out * inn :].reshape(out, 1, k)
            if self.joint:
                mats = [torch.cat([W, b], dim=1).permute(2, 0, 1)]
            else:
                mats = [W.permute(2, 0, 1), b.permute(2, 0, 1)]
        if self.block == "kron":
            return mats
        o = out // self.groups
        per = [M.reshape(k, self.groups, o, M.shape[-1]) for M in mats]
        return [M[:, g] for g in range(self.groups) for M in per]

    def merge(self, mats: Sequence[Tensor], out: Tensor) -> Tensor:
        """Inverse of :meth:`split`: the pairs' matrices into ``out`` ``[numel, k]``."""
        k = mats[0].shape[0]
        if self.block == "dense":
            return out.copy_(mats[0][..., 0].T)
        if self.block == "embedding":
            out.view(*self.weight_shape, k).copy_(mats[0].permute(1, 2, 0))
            return out
        rows, inn = self.out_features, self.in_features
        if self.block != "kron":
            per = len(mats) // self.groups  # matrices per group
            mats = [torch.cat(list(mats[j::per]), dim=1) for j in range(per)]
        W = mats[0][..., :inn].permute(1, 2, 0)
        if self.block == "kron_transposed":
            index = _transposed_index(self.weight_shape, self.groups).to(out.device)
            out[: rows * inn].index_copy_(0, index, W.reshape(rows * inn, k))
        else:
            out[: rows * inn].view(rows, inn, k).copy_(W)
        if self.has_bias:
            b = mats[0][..., inn] if self.joint else mats[1][..., 0]
            out[rows * inn :].copy_(b.T)
        return out


def record_factors(rec: LayerRecord, kind: str) -> tuple[Tensor, Tensor]:
    r"""``(A, G)`` of ``kind`` for one record in the form :func:`kron_pairs` reads.

    ``"kron"``: the factors; grouped blocks: ``[groups, ·, ·]`` stacks;
    ``"embedding"``: ``A`` is the vector :math:`A_\text{diag}`; ``"dense"``: ``A`` is
    ``[[1]]`` and ``G`` the dense block.

    Raises:
        ShapeError: If the record has no factors (or dense block) of ``kind``, or an
            unknown block layout.
    """
    block = getattr(rec, "block", "kron")
    if block not in BLOCKS:
        raise ShapeError(
            f"Layer {rec.name!r} ({type(rec.module).__name__}) has a {block!r} curvature "
            f"block; Kronecker operators support {BLOCKS}."
        )
    if block == "dense":
        if kind not in rec.dense:
            raise ShapeError(
                f"Layer {rec.name!r} ({type(rec.module).__name__}) has no dense block of kind "
                f"{kind!r} (extracted: {sorted(rec.dense)}); extract with quantities=({kind!r},)."
            )
        D = rec.dense[kind]
        return D.new_ones(1, 1), D
    A = rec.A_diag if block == "embedding" else rec.A
    if A is None or kind not in rec.G:
        raise ShapeError(
            f"Layer {rec.name!r} has no Kronecker factors of kind {kind!r} "
            f"(extracted: {sorted(rec.G)}); extract with quantities=({kind!r},)."
        )
    return A, rec.G[kind]


def layers_and_factors(records: Records, kind: str) -> tuple[list[KronLayer], list, list, list]:
    """Layouts and ``(A, G, bias_scale)`` lists of ``kind`` from a :class:`Records`.

    Every block layout of :data:`BLOCKS` is accepted (see :func:`record_factors`).

    Raises:
        ShapeError: If ``kind`` is unknown or missing from a layer's records.
    """
    check_kind(kind)
    factors = [record_factors(rec, kind) for rec in records]
    layers = [KronLayer.from_record(rec) for rec in records]
    return (
        layers,
        [a for a, _ in factors],
        [g for _, g in factors],
        [r.bias_scale for r in records],
    )


def check_kind(kind: str, kinds: Sequence[str] = FACTOR_KINDS) -> None:
    """Raise :class:`ShapeError` unless ``kind`` is one of ``kinds``."""
    if kind not in kinds:
        raise ShapeError(f"kind={kind!r} is not supported; use one of {tuple(kinds)}.")


def _expected_factors(layer: KronLayer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(A, G)`` that fit ``layer`` (see :func:`record_factors`)."""
    if layer.block == "dense":
        return (1, 1), (layer.numel, layer.numel)
    if layer.block == "embedding":
        return (layer.weight_shape[0],), (layer.weight_shape[1],) * 2
    a, o = layer.in_features + int(layer.joint), layer.out_features
    if layer.block == "kron" or layer.groups == 1:
        return (a, a), (o, o)
    o //= layer.groups
    return (layer.groups, a, a), (layer.groups, o, o)


def check_factors(layers: Sequence[KronLayer], A: Sequence[Tensor], G: Sequence[Tensor]) -> None:
    """Raise :class:`ShapeError` unless each layer has an ``A`` and a ``G`` of the right size."""
    if not (len(layers) == len(A) == len(G)):
        raise ShapeError(f"Got {len(layers)} layers, {len(A)} A factors and {len(G)} G factors.")
    for layer, a, g in zip(layers, A, G):
        need_a, need_g = _expected_factors(layer)
        if tuple(a.shape) != need_a or tuple(g.shape) != need_g:
            raise ShapeError(
                f"Layer {layer.name!r} ({layer.block} block): factors A{tuple(a.shape)}, "
                f"G{tuple(g.shape)} do not fit the weight {tuple(layer.weight_shape)}: "
                f"expected A{need_a} and G{need_g}."
            )


def kron_pairs(
    layer: KronLayer, A: Tensor, G: Tensor, bias_scale: float
) -> list[tuple[Tensor, Tensor]]:
    r"""The ``(G, A)`` Kronecker pairs of a layer in :meth:`KronLayer.split` order.

    A separate bias block :math:`G \cdot s` is the pair ``(G, [[s]])``; a grouped
    block has one pair (or two) per group; an embedding's pair is
    :math:`(\operatorname{diag}(A_\text{diag}), G)` with the diagonal factor kept as
    the vector :math:`A_\text{diag}` (see :func:`kron_math.eigh_psd`), a dense
    block's ``(D, [[1]])``.
    """
    if layer.block == "embedding":  # the vector A_diag stands for diag(A_diag)
        return [(A, G)]
    if layer.block == "dense":
        return [(G, A)]
    if layer.block == "kron":
        Gs, As = [G], [A]
    else:
        Gs = list(G) if G.dim() == 3 else [G]
        As = list(A) if A.dim() == 3 else [A]
    pairs = []
    for Gg, Ag in zip(Gs, As):
        pairs.append((Gg, Ag))
        if layer.has_bias and layer.separate_bias:
            pairs.append((Gg, Ag.new_full((1, 1), float(bias_scale))))
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


def _ones_features(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Factored per-example rows whose features are the bias's constant ``1``."""
    rows, a = pair
    return rows, a.new_ones(a.shape[0], 1)


def _restrict(rec: LayerRecord, keep: list[bool]) -> LayerRecord:
    """The record of the kept parameters of one layer (weight or bias of a ``[W, b]`` layer)."""
    params = [p for p, k in zip(rec.params, keep) if k]

    def pick(xs):
        return None if xs is None else [x for x, k in zip(xs, keep) if k]

    changes = dict(
        params=params,
        batch_grad=pick(rec.batch_grad),
        diag_ggn=pick(rec.diag_ggn),
        diag_ggn_mc=pick(rec.diag_ggn_mc),
        diag_hessian=pick(rec.diag_hessian),
        cross_A=None,
        cross_G={},
        cross_reason="params= keeps part of the layer",
    )
    if rec.block == "dense":
        index = torch.cat(
            [
                torch.arange(off, off + p.numel())
                for p, off, k in zip(rec.params, [0, rec.params[0].numel()], keep)
                if k
            ]
        )
        changes["dense"] = {kind: D[index][:, index] for kind, D in rec.dense.items()}
        changes["has_bias"] = keep[-1]
        return replace(rec, **changes)
    weight_only = keep[0]
    changes.update(has_bias=False, separate_bias=False)
    if rec.A is not None:
        if rec.separate_bias:
            shape = (*rec.A.shape[:-2], 1, 1)
            changes["A"] = rec.A if weight_only else rec.A.new_full(shape, float(rec.bias_scale))
        else:
            changes["A"] = rec.A[..., :-1, :-1] if weight_only else rec.A[..., -1:, -1:]
    if not weight_only:  # the bias as a weight [out] with one constant input feature
        if rec.block == "kron_transposed":  # the bias is not permuted
            changes["block"] = "kron_grouped" if rec.module.groups > 1 else "kron"
        if rec.grad_factors is not None:
            changes["grad_factors"] = _ones_features(rec.grad_factors)
        changes["curvature_grad_factors"] = {
            k: _ones_features(v) for k, v in rec.curvature_grad_factors.items()
        }
    return replace(rec, **changes)


def restrict_records(records: Records, params: Sequence[Tensor], names: dict) -> Records:
    r"""Records covering only ``params``, in their order (``params=`` of the K-FAC factories).

    A layer whose parameters are all in ``params`` keeps its block; one whose weight
    (or bias) alone is listed gets the sub-block over it: for a ``[W, b]`` Kronecker
    block :math:`G \otimes A_{WW}` (or :math:`G \otimes A_{bb}`), for a dense block the
    sub-matrix. Cross factors of layers that lose parameters are dropped.

    Args:
        records: Records of the whole model.
        params: The parameters to cover, each in the records.
        names: ``id(parameter) -> qualified name``, for messages.

    Returns:
        New :class:`Records` sharing the tensors of ``records``.

    Raises:
        ConfigError: For a parameter listed twice, one without curvature in the
            records (not trainable, or of an unfactored module), or an order that
            separates a layer's weight and bias or lists the bias first.
    """
    where = {id(p): (i, j) for i, rec in enumerate(records) for j, p in enumerate(rec.params)}
    seen: set[int] = set()
    for k, p in enumerate(params):
        name = names.get(id(p), f"params[{k}] (shape {tuple(p.shape)})")
        if id(p) in seen:
            raise ConfigError(f"params lists {name!r} twice.")
        seen.add(id(p))
        if id(p) not in where:
            raise ConfigError(
                f"params: {name!r} has no Kronecker block in the extraction (not trainable, or "
                "its module has no curvature: see Records.unfactored); list parameters of "
                "factored layers only."
            )
    order: list[int] = []
    for p in params:
        i = where[id(p)][0]
        if i not in order:
            order.append(i)
    layers = []
    for i in order:
        rec = records[i]
        keep = [id(p) in seen for p in rec.params]
        layers.append(rec if all(keep) else _restrict(rec, keep))
    flat = [id(p) for rec in layers for p in rec.params]
    if flat != [id(p) for p in params]:
        raise ConfigError(
            "params must list a layer's weight and bias next to each other, weight first "
            f"(got the order {[names.get(id(p), '?') for p in params]})."
        )
    for k, (i, rec) in enumerate(zip(order, layers)):
        whole_next = k + 1 < len(order) and order[k + 1] == i + 1
        if rec.cross_A is not None and not (whole_next and layers[k + 1] is records[i + 1]):
            layers[k] = replace(
                rec, cross_A=None, cross_G={}, cross_reason="params= separates the pair"
            )
    return replace(records, layers=[replace(r, position=k) for k, r in enumerate(layers)])
