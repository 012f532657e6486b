r"""Eigenvalue-corrected K-FAC (EKFAC; George et al. 2018, arXiv:1806.03884).

Per layer, keep K-FAC's Kronecker eigenbasis :math:`U_G \otimes U_A` and replace
its eigenvalues :math:`\gamma\alpha^\top` by the second moments of the per-example
gradients in that basis (George et al. 2018, §3, eq. 9):

.. math::
   S = R \sum_n \left(U_G^\top \nabla_{\bar W} \ell_n\, U_A\right)^{\odot 2},
   \qquad \hat F_{\text{EKFAC}} = (U_G \otimes U_A)\operatorname{diag}(\mathrm{vec}\,S)
   (U_G \otimes U_A)^\top,

with :math:`\nabla_{\bar W}\ell_n` the gradient of the unreduced loss of example
:math:`n` over the joint ``[W, b]`` matrix (``records.batch_grad / R``; conv layers:
the per-example gradient summed over locations).

Note:
    By default (``correction="empirical"``) the per-example gradients are those at
    the true labels, so in the eigenbasis the diagonal of EKFAC equals that of the
    empirical Fisher block whatever the ``kind``; ``kind`` only chooses the
    eigenbasis. With ``kind="empirical"`` this is George et al.'s EKFAC of the
    empirical Fisher; with ``"kfac"``/``"kflr"`` it is a hybrid (Fisher/GGN
    eigenbasis, empirical eigenvalues). ``correction="kind"`` takes the second
    moments of the output gradients behind ``G[kind]`` instead (sampled labels for
    ``"kfac"``, loss-Hessian square-root columns for ``"kflr"``): the paper's EKFAC
    of the Monte Carlo Fisher, or of the GGN, whose diagonal in the eigenbasis
    equals that of the GGN block (``Linear`` layers only, where the per-example
    terms stay factored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvkit.data import as_batches, num_data
from curvkit.errors import ShapeError
from curvkit.extraction.batches import extract_batches
from curvkit.operators import kron_math as km
from curvkit.operators.kron_base import (
    KronEigenOperator,
    KronLayer,
    check_kind,
    layers_and_factors,
)
from curvkit.operators.kronecker import BlockDiagonalKFAC, check_selection, select
from curvkit.records import Records

#: Factor kinds whose eigenbasis EKFAC can use.
EKFAC_KINDS = ("kfac", "kflr", "empirical")

#: Sources of the corrected eigenvalues.
CORRECTIONS = ("empirical", "kind")


def correction_source(kind: str, correction: str) -> str:
    """The rows the eigenvalues come from: ``"empirical"`` or the factor kind."""
    if correction not in CORRECTIONS:
        raise ShapeError(
            f"EKFAC: correction={correction!r} is not supported; use one of {CORRECTIONS}."
        )
    return kind if correction == "kind" else "empirical"


def correction_quantities(kind: str, correction: str) -> tuple[str, ...]:
    """Extraction quantities the eigenvalue correction needs (besides the factors)."""
    if correction_source(kind, correction) == "empirical":
        return ("batch_grad_factors",)
    return ("curvature_grad_factors",)


def eigenbases(layers, A, G, bias_scale=None) -> list[list[tuple[Tensor, Tensor]]]:
    """Per layer and Kronecker pair, the eigenvectors ``(U_G, U_A)`` of K-FAC's factors."""
    eig = BlockDiagonalKFAC(layers, A, G, bias_scale).eigendecompositions()
    return [[(U_G, U_A) for (_, U_G), (_, U_A) in layer] for layer in eig]


def corrected_eigenvalues(
    layers: Sequence[KronLayer],
    bases: Sequence[Sequence[tuple[Tensor, Tensor]]],
    batch_grad: Sequence[Sequence[Tensor]],
    weight: float,
) -> list[list[Tensor]]:
    r"""``weight`` :math:`\cdot \sum_n (U_G^\top M_n U_A)^{\odot 2}` per layer and pair.

    Args:
        layers: Layouts.
        bases: ``(U_G, U_A)`` per layer and pair (see :func:`eigenbases`).
        batch_grad: Per layer, per-example gradients ``[N, *p.shape]`` per parameter.
        weight: Scale of the sum (``1/R`` for records' ``batch_grad``, which include ``R``).

    Returns:
        ``S`` per layer and pair, ``[out, ·]``, in the bases' dtype.
    """
    out = []
    for layer, basis, grads in zip(layers, bases, batch_grad):
        dtype = basis[0][0].dtype
        flat = torch.cat([g.reshape(g.shape[0], -1).to(dtype) for g in grads], dim=1)
        mats = layer.split(flat.T)
        out.append(
            [
                weight * km.sandwich(km.transpose(U_G), M, U_A).square().sum(0)
                for (U_G, U_A), M in zip(basis, mats)
            ]
        )
    return out


def record_eigenvalues(
    layers: Sequence[KronLayer],
    bases: Sequence[Sequence[tuple[Tensor, Tensor]]],
    records: Records,
    weight: float,
    source: str = "empirical",
) -> list[list[Tensor]]:
    r"""Corrected eigenvalues from records, using factored per-example gradients where present.

    For a ``Linear`` layer the per-example gradient is the outer product
    :math:`g_n \bar a_n^\top`, so its square in the eigenbasis factorises:
    :math:`\sum_n (U_G^\top g_n \bar a_n^\top U_A)^{\odot 2} = (\hat g^{\odot 2})^\top
    \hat a^{\odot 2}` with :math:`\hat g = g U_G`, :math:`\hat a = \bar a U_A` (rows
    per example): three products of the size of a gradient instead of two per
    example. Layers without ``grad_factors`` use :func:`corrected_eigenvalues`.

    With ``source="kfac"`` or ``"kflr"`` the rows are those behind ``G[source]``
    (``curvature_grad_factors``: sampled labels, or loss-Hessian square-root
    columns), summed over rows: George et al.'s correction of the (Monte Carlo)
    Fisher or of the GGN instead of the empirical Fisher (``Linear`` layers only).

    Args:
        layers: Layouts.
        bases: ``(U_G, U_A)`` per layer and pair.
        records: Records with ``grad_factors`` or ``batch_grad`` for every layer
            (``source="empirical"``), or ``curvature_grad_factors[source]``.
        weight: Scale of the sum (``1/R``: every form includes ``R``).
        source: ``"empirical"`` (true labels), ``"kfac"`` or ``"kflr"``.

    Returns:
        ``S`` per layer and pair.

    Raises:
        ShapeError: If a layer lacks the per-example gradients ``source`` needs.
    """
    out = []
    for layer, basis, rec in zip(layers, bases, records):
        dtype = basis[0][0].dtype
        if source != "empirical":
            if source not in rec.curvature_grad_factors:
                raise ShapeError(
                    f"Layer {rec.name!r} ({type(rec.module).__name__}) has no "
                    f"curvature_grad_factors[{source!r}]: the {source!r} eigenvalue "
                    "correction supports Linear layers, extracted with "
                    f"('{source}', 'curvature_grad_factors')."
                )
            rows, a = rec.curvature_grad_factors[source]
            out.append(_factored_scales(layer, basis, rows, a, weight))
            continue
        if rec.grad_factors is None:
            if rec.batch_grad is None:
                raise ShapeError(
                    f"Layer {rec.name!r} has no per-example gradients: extract with "
                    "'batch_grad' or 'batch_grad_factors'."
                )
            grads = [g.to(dtype) for g in rec.batch_grad]
            out.extend(corrected_eigenvalues([layer], [basis], [grads], weight))
            continue
        g, a = rec.grad_factors
        out.append(_factored_scales(layer, basis, g[None], a, weight))
    return out


def _factored_scales(layer: KronLayer, basis, rows: Tensor, a: Tensor, weight: float) -> list:
    r"""``weight`` :math:`\cdot (\sum_v \hat g_v^{\odot 2})^\top \hat a^{\odot 2}` per pair.

    ``rows`` ``[V, N, out]``: per-example output gradients; ``a`` ``[N, in]``.
    """
    dtype = basis[0][0].dtype
    rows, a = rows.to(dtype), a.to(dtype)
    ones = a.new_ones(a.shape[0], 1)
    if not layer.has_bias:
        features = [a]
    elif layer.joint:
        features = [torch.cat([a, ones], dim=1)]
    else:
        features = [a, ones]
    return [
        weight * ((rows @ U_G).square().sum(0).T @ (f @ U_A).square())
        for (U_G, U_A), f in zip(basis, features)
    ]


class EKFAC(KronEigenOperator):
    r"""EKFAC: per layer, Kronecker eigenbasis and corrected eigenvalues.

    The block is :math:`(U_G\otimes U_A)\operatorname{diag}(\mathrm{vec} S)(U_G\otimes U_A)^\top`.

    Args:
        layers: Layouts, forward order.
        blocks: Per layer, one ``(U_G, U_A, S)`` per Kronecker pair (joint ``[W, b]``
            block, or weight then bias with ``U_A = [[1]]``).
    """

    @classmethod
    def from_records(
        cls, records: Records, kind: str = "kflr", correction: str = "empirical"
    ) -> EKFAC:
        """EKFAC from the factors of ``kind`` and the per-example gradients in ``records``.

        Raises:
            ShapeError: If the records hold no per-example gradients for the
                ``correction`` (``batch_grad_factors`` or ``batch_grad``;
                ``curvature_grad_factors``) or no factors of ``kind``.
        """
        check_kind(kind, EKFAC_KINDS)
        source = correction_source(kind, correction)
        layers, A, G, scales = layers_and_factors(records, kind)
        missing = source == "empirical" and any(
            rec.batch_grad is None and rec.grad_factors is None for rec in records
        )
        if missing:
            raise ShapeError(
                "EKFAC needs per-example gradients: extract with 'batch_grad_factors' "
                "(or 'batch_grad')."
            )
        bases = eigenbases(layers, A, G, scales)
        S = record_eigenvalues(layers, bases, records, 1.0 / records.reduction_factor, source)
        return cls.from_bases(layers, bases, S)

    @classmethod
    def from_bases(cls, layers, bases, S) -> EKFAC:
        """EKFAC from ``(U_G, U_A)`` per layer and pair and the matching scales ``S``."""
        blocks = [[(U_G, U_A, s) for (U_G, U_A), s in zip(b, sl)] for b, sl in zip(bases, S)]
        return cls(layers, blocks)

    def inverse(self, damping: float = 0.0) -> KronEigenOperator:
        r""":math:`(\hat F_{\text{EKFAC}} + \lambda I)^{-1}`: exact, scales :math:`1/(S + \lambda)`.

        With ``damping=0``, zero scales give the pseudo-inverse.

        Raises:
            ShapeError: On a negative damping.
        """
        if damping < 0:
            raise ShapeError(f"damping must be non-negative, got {damping}.")
        blocks = [
            [(U_G, U_A, km.safe_reciprocal(S + damping, pseudo=damping == 0)) for U_G, U_A, S in b]
            for b in self.blocks
        ]
        return KronEigenOperator(self.layers, blocks)

    def logdet(self, damping: float = 0.0) -> Tensor:
        r""":math:`\log\det(\hat F_{\text{EKFAC}} + \lambda I) = \sum \log(S + \lambda)`."""
        return sum(torch.log(S + damping).sum() for b in self.blocks for _, _, S in b)

    def trace(self) -> Tensor:
        r""":math:`\sum S` (the trace is basis-independent)."""
        return sum(S.sum() for b in self.blocks for _, _, S in b)


def ekfac(
    model: torch.nn.Module,
    loss_func: torch.nn.Module,
    data,
    kind: str = "empirical",
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    seed: int = 0,
    factor_dtype: torch.dtype | None = None,
    correction: str = "empirical",
    params: Sequence[Tensor] | None = None,
    unsupported: str = "error",
) -> EKFAC:
    r"""EKFAC approximation of the Fisher/GGN on a data set.

    One batch: a single extraction pass (factors and per-example gradients).
    Several batches: a first pass over the data for the factors (combined as in
    :func:`~curvkit.operators.kronecker.kfac`), then a second for the corrected
    eigenvalues, so that per-example gradients of one batch at a time are held.

    Args:
        model: Any ``nn.Module`` the extraction supports (every block layout of the
            graph path; per-example gradients are needed, so no ``BatchNorm`` in
            train mode).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: One ``(X, y)`` batch or an iterable of batches.
        kind: Factors whose eigenbasis is used: ``"empirical"`` (default: basis and
            eigenvalues from the same true-label gradients), ``"kfac"`` or ``"kflr"``
            (Fisher/GGN basis with empirical second moments in it; see the module
            docstring).
        mc_samples: Monte Carlo samples for ``kind="kfac"``.
        separate_bias: Separate weight and bias blocks.
        kfac_approx: ``"expand"`` or ``"reduce"`` for conv layers.
        seed: Seed of the label sampling for ``kind="kfac"``.
        factor_dtype: dtype of the factors (default: the model's).
        correction: ``"empirical"`` (default): eigenvalues from true-label
            per-example gradients; ``"kind"``: from the output gradients behind
            ``G[kind]`` (George et al.'s EKFAC of the Fisher or GGN; ``Linear``
            layers only; ``"kflr"`` holds one row per output, ``C·N·out`` numbers
            per layer).
        params: The parameters covered, in their order (see
            :func:`~curvkit.operators.kronecker.kfac`).
        unsupported: ``"error"`` or ``"gradient"`` (modules without a curvature rule
            are skipped), passed to :func:`curvkit.extract`.

    Returns:
        An :class:`EKFAC` operator.

    Raises:
        ShapeError: On an unknown ``kind`` or ``correction``, or a conv layer with
            ``correction="kind"``.
        ConfigError: On bad ``params`` or ``unsupported``.
        UnsupportedModuleError, UnsupportedLossError: From the extraction.

    Example:
        >>> import torch, curvkit as ck
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> E = ck.ekfac(model, nn.CrossEntropyLoss(), (X, y), kind="empirical")
        >>> E.shape
        (23, 23)
    """
    check_kind(kind, EKFAC_KINDS)
    source = correction_source(kind, correction)
    extra = correction_quantities(kind, correction)
    check_selection(params, unsupported)
    batches = as_batches(data)
    options = dict(
        mc_samples=mc_samples,
        separate_bias=separate_bias,
        kfac_approx=kfac_approx,
        factor_dtype=factor_dtype,
        unsupported=unsupported,
    )
    if len(batches) == 1:
        records = extract_batches(model, loss_func, batches, (kind, *extra), seed=seed, **options)
        return EKFAC.from_records(select(model, records, params), kind, correction)
    records = select(
        model, extract_batches(model, loss_func, batches, (kind,), seed=seed, **options), params
    )
    layers, A, G, scales = layers_and_factors(records, kind)
    bases = eigenbases(layers, A, G, scales)
    total, mean = num_data(batches), getattr(loss_func, "reduction", "mean") == "mean"
    S = None
    rows = extra if source == "empirical" else (kind, *extra)
    for b, (X, y) in enumerate(batches):
        # distinct, reproducible label samples per batch for kind="kfac"
        rec = extract_batches(model, loss_func, (X, y), rows, seed=seed + 1 + b, **options)
        rec = select(model, rec, params)
        # R Σ_n (Uᵀ ∇ℓ_n U)² with ∇ℓ_n = batch_grad / R_b and R / R_b = N_b / N ("mean") or 1
        weight = (X.shape[0] / total if mean else 1.0) / rec.reduction_factor
        part = record_eigenvalues(layers, bases, rec, weight, source)
        S = part if S is None else [[s + t for s, t in zip(old, new)] for old, new in zip(S, part)]
    return EKFAC.from_bases(layers, bases, S)
