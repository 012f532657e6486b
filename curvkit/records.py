r"""Plain records of what one extraction pass returns.

Conventions (stated once, used everywhere; see ``docs/conventions.md``):

- **Parameter order.** The parameters of a layer are ``[weight, bias]`` (bias
  only when present and trainable). A flat vector is the concatenation of
  ``p.flatten()`` (row-major) over ``records.params`` in that order.
- **Loss scaling.** The loss is :math:`L = R\sum_n \ell_n` with :math:`R = 1/N`
  for ``reduction="mean"`` and :math:`R = 1` for ``"sum"``. Every matrix carries
  the same :math:`R`.
- **Kronecker factors.** A layer's curvature block over the row-major
  vectorisation of the joint matrix :math:`\bar W = [W, b]` (shape
  ``[out, in + 1]``; ``[out, in]`` without bias or with ``separate_bias=True``)
  is approximated by :math:`G \otimes A` (output factor first, PyTorch's
  flatten order) with

  .. math::
     A = R \sum_n \bar a_n \bar a_n^\top, \qquad
     G = \frac{1}{N} \sum_n \sum_c s_{n,c} s_{n,c}^\top,

  where :math:`\bar a_n = [a_n; 1]` and :math:`s_{n,c}` are output gradients of
  the *unreduced* per-example loss :math:`\ell_n` (MC samples, columns of the
  loss Hessian's square root, or the true-label gradient, depending on the
  kind). With ``separate_bias=True`` the bias block is
  :math:`G \cdot (R \sum_n 1)` and ``A`` has no homogeneous coordinate.
- **Conv layers** (KFC). ``A`` sums the unfolded patches over output locations
  :math:`t` ("expand") and ``G`` averages over them; "reduce" averages the
  patches and sums the gradients over :math:`t` before the outer products.
- **Cross factors** between consecutive layers :math:`l, l+1` carry the same
  normalisation: :math:`A_{l,l+1} = R\sum_n \bar a^{(l)}_n \bar a^{(l+1)\top}_n`,
  :math:`G_{l,l+1} = \frac1N \sum_n\sum_c s^{(l)}_{n,c} s^{(l+1)\top}_{n,c}`, so
  that :math:`G_{l,l+1}\otimes A_{l,l+1}` approximates the off-diagonal block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

#: Kinds of output-gradient factor ``G``.
FACTOR_KINDS = ("kfac", "kflr", "kfra", "empirical")


@dataclass
class LayerRecord:
    r"""What one extraction pass returns for one parametrised layer.

    Attributes:
        name: Qualified module name inside the model (``"3"``, ``"enc.0"``).
        module: The layer itself (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``; on the
            graph path also ``Conv3d``, ``ConvTranspose1d/2d/3d``, ``Embedding``,
            ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``).
        position: Index of the layer among the model's parametrised layers (graph
            path: order of the modules' first calls).
        params: The layer's trainable parameters in flat order ``[weight, bias]``.
        has_bias: Whether ``params`` contains a bias.
        separate_bias: ``False``: ``A`` has the homogeneous coordinate and the
            Kronecker block covers weight and bias jointly; ``True``: ``A`` is
            the weight-only factor and the bias block is ``G * bias_scale``.
        bias_scale: :math:`R\sum_n 1` (times :math:`|T|` for conv "expand"):
            the scalar "A" of a separate bias block.
        A: Input factor, ``[in(+1), in(+1)]`` (``in = C_in * prod(kernel)`` for conv).
        G: Output-gradient factors by kind (``"kfac"``, ``"kflr"``, ``"kfra"``,
            ``"empirical"``), each ``[out, out]``.
        batch_grad: Per-example gradients, one tensor ``[N, *p.shape]`` per
            parameter, summing over the batch to the gradient of the loss
            (BackPACK's convention: they include the factor :math:`R`).
        grad_factors: ``Linear`` layers' per-example gradients in factored form
            ``(g, a)``, ``g`` ``[N, out]`` (with :math:`R`), ``a`` ``[N, in]``: the
            weight gradient of example ``n`` is ``outer(g[n], a[n])``, its bias
            gradient ``g[n]`` (quantity ``"batch_grad_factors"``; ``N·(in + out)``
            numbers instead of ``N·out·in``).
        curvature_grad_factors: ``Linear`` layers, by kind (``"kfac"``, ``"kflr"``):
            ``(rows, a)``, ``rows`` ``[V, N, out]`` the output gradients behind
            ``G[kind]`` (sampled-label gradients over :math:`\sqrt M`, or the
            columns of the loss Hessian's square root) times :math:`R`, ``a``
            ``[N, in]`` as in ``grad_factors``. With ``w_vn = outer(rows[v, n],
            a[n]) / R`` the weight block of the layer's Fisher (``"kfac"``) or GGN
            (``"kflr"``) is
            :math:`R\sum_{v,n} \mathrm{vec}(w_{vn})\mathrm{vec}(w_{vn})^\top`
            (quantity ``"curvature_grad_factors"``; ``V = mc_samples`` or the number
            of outputs).
        diag_ggn, diag_ggn_mc, diag_hessian: Diagonals, shaped like ``params``.
        cross_A: :math:`A_{l,l+1}` to the next layer, or ``None`` where the
            pair has no cross factor (see ``cross_reason``).
        cross_G: :math:`G_{l,l+1}` by kind, ``[out_l, out_{l+1}]``.
        cross_reason: Why there is no cross factor to the next layer, if none.
        block: Layout of the layer's curvature block (graph path, see
            ``docs/conventions.md``): ``"kron"`` (:math:`G \otimes A` as above),
            ``"kron_grouped"`` (grouped convolution: ``A`` ``[groups, k(+1), k(+1)]``
            and ``G[kind]`` ``[groups, o, o]``, one :math:`G_g \otimes A_g` per group
            over the group's rows of the weight; the block is block-diagonal over
            groups), ``"embedding"`` (``nn.Embedding``: the block over the row-major
            weight ``[num_embeddings, dim]`` is :math:`\operatorname{diag}(A_\text{diag})
            \otimes G`, input factor first because the weight is the transposed map)
            or ``"dense"`` (normalisation layers: ``dense[kind]`` is the exact block
            ``[D, D]`` over the flat ``[weight, bias]``, no ``A``/``G``).
        A_diag: ``"embedding"`` blocks: :math:`R` times the token counts, ``[num_embeddings]``.
        dense: ``"dense"`` blocks by kind (``"kfac"``, ``"kflr"``, ``"empirical"``):
            :math:`R\sum_{v,n}\psi_{vn}\psi_{vn}^\top` with :math:`\psi_{vn}` the
            per-(column, example) gradient of the layer's parameters (the exact
            Fisher/GGN/empirical-Fisher block of the layer).
        calls: How often the module was called in the forward pass (graph path:
            every call adds its locations ``t`` like shared weights).
    """

    name: str
    module: nn.Module
    position: int
    params: list[Tensor]
    has_bias: bool
    separate_bias: bool = False
    bias_scale: float = 1.0
    A: Tensor | None = None
    G: dict[str, Tensor] = field(default_factory=dict)
    batch_grad: list[Tensor] | None = None
    grad_factors: tuple[Tensor, Tensor] | None = None
    curvature_grad_factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    diag_ggn: list[Tensor] | None = None
    diag_ggn_mc: list[Tensor] | None = None
    diag_hessian: list[Tensor] | None = None
    cross_A: Tensor | None = None
    cross_G: dict[str, Tensor] = field(default_factory=dict)
    cross_reason: str | None = None
    block: str = "kron"
    A_diag: Tensor | None = None
    dense: dict[str, Tensor] = field(default_factory=dict)
    calls: int = 1

    @property
    def numel(self) -> int:
        """Number of trainable parameters of the layer."""
        return sum(p.numel() for p in self.params)

    @property
    def out_features(self) -> int:
        """Rows of the layer's weight matrix (``out`` or ``C_out``)."""
        return self.params[0].shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the flattened weight matrix (``in`` or ``C_in * prod(kernel)``)."""
        return self.params[0][0].numel()

    @property
    def joint(self) -> bool:
        """Whether the Kronecker block covers weight and bias jointly."""
        return self.has_bias and not self.separate_bias


@dataclass
class Records:
    """Per-layer records of one extraction pass, in forward order.

    Attributes:
        layers: One :class:`LayerRecord` per parametrised layer, forward order.
        loss: The loss value of the pass (detached).
        batch_size: ``N``.
        reduction_factor: ``R`` (``1/N`` for mean, ``1`` for sum).
        kfac_approx: ``"expand"`` or ``"reduce"`` (conv layers).
        mc_samples: Monte Carlo samples used for ``"kfac"`` / ``"diag_ggn_mc"``.
        unfactored: ``(name, module, params)`` of the modules that got gradients but
            no curvature (``extract(..., unsupported="gradient")``), forward order.
    """

    layers: list[LayerRecord]
    loss: Tensor
    batch_size: int
    reduction_factor: float
    kfac_approx: str = "expand"
    mc_samples: int = 1
    unfactored: list[tuple[str, nn.Module, list[Tensor]]] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerRecord:
        return self.layers[i]

    @property
    def params(self) -> list[Tensor]:
        """All trainable parameters, in the flat order of every operator."""
        return [p for rec in self.layers for p in rec.params]

    def summary(self) -> list[dict]:
        """One row per layer: shapes and traces of what was extracted."""
        rows = []
        for rec in self.layers:
            row = {
                "layer": rec.name,
                "type": type(rec.module).__name__,
                "params": rec.numel,
            }
            if rec.A is not None:
                row["A"] = tuple(rec.A.shape)
                row["tr A"] = float(rec.A.diagonal(dim1=-2, dim2=-1).sum())
            for kind, G in rec.G.items():
                row[f"G[{kind}]"] = tuple(G.shape)
                row[f"tr G[{kind}]"] = float(G.diagonal(dim1=-2, dim2=-1).sum())
            if rec.cross_A is not None:
                row["cross"] = f"A{tuple(rec.cross_A.shape)}"
            rows.append(row)
        return rows
