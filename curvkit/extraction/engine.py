r"""One forward and one backward sweep that extract every requested quantity.

The model is an ``nn.Sequential`` (nested ones are flattened). The forward pass
runs its leaf modules one by one without autograd and keeps, per module, what
the backward needs (inputs of parametrised layers, activation derivatives,
vector-Jacobian closures). The backward sweep walks the modules in reverse and
propagates a *stack* ``[V, N, *shape]`` of output-gradient rows:

=========  ==============================================  =========================
rows       content                                         used by
=========  ==============================================  =========================
0          gradient of the batch loss (``R`` included)     ``.grad``, batch_grad,
                                                           empirical
MC         sampled-label gradients / :math:`\sqrt M`        kfac, diag_ggn_mc
sqrt       columns of :math:`\Lambda_n^{1/2}`                kflr, diag_ggn,
                                                           diag_hessian
residual   :math:`\sqrt{|\phi''\odot\delta|}` per activation  diag_hessian
=========  ==============================================  =========================

Only the rows the requested quantities need are propagated. KFRA propagates a
separate batch-averaged ``[D, D]`` matrix (Botev et al. 2017, eqs. 9-10).
Normalisations are those of :mod:`curvkit.records`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvkit.errors import ShapeError, UnsupportedModuleError
from curvkit.extraction.checks import (
    CROSS_KINDS,
    check_arguments,
    check_module,
    factor_dtype_of,
    flatten_sequential,
    sweep_reason,
)
from curvkit.extraction.gram import homogeneous_cross
from curvkit.extraction.graph import SWEEP_ONLY, extract_graph
from curvkit.extraction.layers import PARAMETRISED, LinearNode
from curvkit.extraction.losses import make_loss_handler
from curvkit.extraction.modules import PARAMETER_FREE, ParamVJPNode, VJPNode
from curvkit.records import LayerRecord, Records


@dataclass
class _Rows:
    """Row slices of the backpropagated stack."""

    mc: slice | None = None
    sqrt: slice | None = None
    diag: slice | None = None  # exact square root for the diagonals (``sqrt`` if ``T = 1``)
    residual: list[tuple[slice, float]] = field(default_factory=list)


def _accumulate_grad(p: Tensor, g: Tensor) -> None:
    """Add ``g`` to ``p.grad`` as autograd would."""
    g = g.reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = g.contiguous()
    else:
        p.grad.add_(g)


def _trainable(module: nn.Module) -> list[Tensor]:
    params = []
    if module.weight.requires_grad:
        params.append(module.weight)
        if module.bias is not None and module.bias.requires_grad:
            params.append(module.bias)
    return params


def _residual_rows(r: Tensor) -> list[tuple[Tensor, float]]:
    r"""Rows ``[D, N, *shape]`` with :math:`\sum_d` (row)(row)^T = diag(±r) per example."""
    N, shape = r.shape[0], r.shape[1:]
    flat = r.reshape(N, -1)
    out = []
    for part, sign in ((flat.clamp(min=0), 1.0), ((-flat).clamp(min=0), -1.0)):
        rows = torch.diag_embed(part.sqrt()).transpose(0, 1)  # [D, N, D]
        out.append((rows.reshape(-1, N, *shape), sign))
    return out


def extract(
    model: nn.Sequential,
    loss_func: nn.Module,
    X: Tensor,
    y: Tensor,
    quantities=("kfac",),
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    generator: torch.Generator | None = None,
    factor_dtype: torch.dtype | None = None,
    unsupported: str = "error",
    backend: str = "auto",
) -> Records:
    r"""Extract curvature quantities of every parametrised layer in one pass.

    Besides the requested quantities, the gradient of the loss is accumulated
    into ``p.grad`` of every trainable parameter (like ``loss.backward()``). The
    model is left unchanged: no hooks, no attributes.

    Two backends compute the same records where both apply:

    - the *sweep* runs a plain ``nn.Sequential`` chain module by module and
      propagates the output-gradient rows by hand (every quantity, KFRA and the
      Hessian diagonal included);
    - the *graph path* (:func:`~curvkit.extraction.graph.extract_graph`) runs any
      ``nn.Module`` once with forward hooks on its parametrised modules and gets
      the rows at every module call from one batched autograd backward (residual
      branches, attention, reused modules, dict/tuple inputs; ``Linear`` on
      ``[N, ..., in]``, ``Conv1d/2d/3d`` with groups and any padding mode,
      ``Embedding``, ``BatchNorm``/``LayerNorm``/``GroupNorm``; no KFRA, no
      Hessian diagonal). See ``docs/conventions.md``, "The graph path".

    Args:
        model: Any ``nn.Module`` (graph path), or an ``nn.Sequential`` of supported
            modules for the sweep (nested Sequentials are flattened). Sweep
            parametrised layers: ``Linear`` (2-D input), ``Conv1d``, ``Conv2d``
            (``groups=1``, zero padding).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` "mean" or "sum".
        X: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]``.
        quantities: Any of ``"batch_grad"``, ``"batch_grad_factors"`` (the
            per-example gradients of ``Linear`` layers as the two factors of their
            outer products, ``LayerRecord.grad_factors``; other layers get
            ``batch_grad``), ``"curvature_grad_factors"`` (the same for the output
            gradients behind ``G["kfac"]``/``G["kflr"]`` of ``Linear`` layers, for
            EKFAC of the Fisher or GGN), ``"kfac"`` (Monte Carlo Fisher
            factors), ``"kflr"`` (exact loss-Hessian square root), ``"kfra"``,
            ``"empirical"``, ``"diag_ggn"``, ``"diag_ggn_mc"``,
            ``"diag_hessian"``, ``"cross"`` (cross factors between consecutive
            Linear layers for each requested kind among kfac/kflr/empirical).
        mc_samples: Monte Carlo samples ``M`` for ``"kfac"``/``"diag_ggn_mc"``.
        separate_bias: Keep the bias out of ``A`` (its block is
            ``G * bias_scale``) instead of the joint homogeneous-coordinate layout.
        kfac_approx: ``"expand"`` or ``"reduce"`` (conv layers, and on the graph path
            every weight shared over locations; Eschenhagen et al. 2023).
        generator: Random generator for the Monte Carlo labels.
        factor_dtype: dtype of factors and diagonals (float32/float64); default:
            the model's dtype (float32 for half-precision models).
        unsupported: ``"error"`` (default) raises on a module the sweep cannot
            factor; ``"gradient"`` passes it through ``torch.func.vjp`` instead: its
            parameters get gradients (listed in ``Records.unfactored``) but no
            curvature, and the layers around it keep theirs.
        backend: ``"auto"`` (default): the sweep for a plain ``nn.Sequential``
            chain (no ``Sequential`` subclass overriding ``forward``, no module object
            used twice, a tensor input) whose modules it supports (or with
            ``unsupported="gradient"``), and always for ``"kfra"``/``"diag_hessian"``;
            the graph path otherwise. ``"sweep"`` or ``"graph"`` force one.
            ``"backpack"`` computes the same records with BackPACK's extensions
            (:func:`~curvkit.extraction.backpack_backend.extract_backpack`; its
            ``use_converter=True`` takes models BackPACK's converter can rewrite).

    Returns:
        The per-layer records (see :mod:`curvkit.records` for normalisations).

    Raises:
        UnsupportedModuleError: For an unsupported module (its name and type in the
            message), a model the forced sweep cannot run, or KFRA/the Hessian
            diagonal on the graph path.
        UnsupportedLossError: For an unsupported loss function or option.
        ShapeError: For unknown quantities or backends, ``mc_samples < 1``,
            mismatched batch sizes or unsuitable shapes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> X, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> rec = extract(model, nn.MSELoss(), X, y, quantities=("kflr", "cross"))
        >>> rec[0].A.shape, rec[0].G["kflr"].shape, rec[0].cross_A.shape
        (torch.Size([5, 5]), torch.Size([3, 3]), torch.Size([5, 4]))
    """
    if backend not in BACKENDS:
        raise ShapeError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "backpack":
        from curvkit.extraction.backpack_backend import extract_backpack

        return extract_backpack(
            model, loss_func, X, y, quantities, mc_samples, separate_bias, kfac_approx,
            generator, factor_dtype, unsupported,
        )  # fmt: skip
    if backend == "auto":
        backend = choose_backend(model, X, quantities, unsupported)
    if backend == "graph":
        return extract_graph(
            model, loss_func, X, y, quantities, mc_samples, separate_bias, kfac_approx,
            generator, factor_dtype, unsupported,
        )  # fmt: skip
    q = check_arguments(model, loss_func, X, y, quantities, mc_samples, kfac_approx, unsupported)
    fwd = forward_pass(model, X, kfra="kfra" in q, unsupported=unsupported)
    return backward_sweep(
        fwd, loss_func, y, q, mc_samples, separate_bias, kfac_approx, generator, factor_dtype
    )


#: Values of ``extract(..., backend=...)``.
BACKENDS = ("auto", "sweep", "graph", "backpack")


def choose_backend(model: nn.Module, X, quantities, unsupported: str = "error") -> str:
    """The backend ``extract(..., backend="auto")`` uses: ``"sweep"`` or ``"graph"``.

    The sweep for a plain ``nn.Sequential`` chain (:func:`~curvkit.extraction.checks.
    sweep_reason`) with a tensor input whose modules it supports (all of them, or
    with ``unsupported="gradient"``), and whenever KFRA or the Hessian diagonal is
    requested (the sweep then reports what it cannot do); the graph path otherwise.
    """
    q = {quantities} if isinstance(quantities, str) else set(quantities)
    if q & set(SWEEP_ONLY):
        return "sweep"
    if not isinstance(X, Tensor) or sweep_reason(model) is not None:
        return "graph"
    leaves = flatten_sequential(model)
    if unsupported == "error":
        for pos, (name, module) in enumerate(leaves):
            try:
                check_module(name, pos, module, False, "error")
            except UnsupportedModuleError:
                return "graph"
    # a Linear reached by element-wise modules only sees X's shape: [N, ..., in] needs the graph
    for _, module in leaves:
        if isinstance(module, nn.Linear):
            return "graph" if X.dim() != 2 else "sweep"
        elementwise = getattr(PARAMETER_FREE.get(type(module)), "elementwise", False)
        if not (elementwise or type(module) is nn.Dropout):
            break
    return "sweep"


@dataclass
class ForwardPass:
    """What :func:`forward_pass` keeps for :func:`backward_sweep`.

    Attributes:
        model: The model.
        leaves: ``(name, module)`` of its leaf modules, execution order.
        nodes: One node per leaf (output and backward state).
        kron: Indices of the trainable layers with Kronecker factors.
        gradient_only: Indices of modules handled with ``unsupported="gradient"``.
        output: The model output (detached).
    """

    model: nn.Module
    leaves: list
    nodes: list
    kron: list[int]
    gradient_only: list[int]
    output: Tensor


def forward_pass(
    model: nn.Sequential, X: Tensor, kfra: bool = False, unsupported: str = "error"
) -> ForwardPass:
    """Run the model module by module without autograd, keeping what the sweep needs.

    Raises:
        UnsupportedModuleError: For an unsupported model or module (see :func:`extract`).
        ShapeError: For unsuitable shapes.
    """
    reason = sweep_reason(model)
    if reason is not None:
        raise UnsupportedModuleError(
            f"The sweep (backend='sweep') needs a plain nn.Sequential chain (nested "
            f"Sequentials are flattened), but {reason}; use backend='graph' or 'auto'."
        )
    leaves = flatten_sequential(model)
    if not leaves:
        raise UnsupportedModuleError("extract needs a non-empty nn.Sequential model.")
    handling = [check_module(n, pos, m, kfra, unsupported) for pos, (n, m) in enumerate(leaves)]
    kron = [i for i, (_, m) in enumerate(leaves) if handling[i] == "kron" and _trainable(m)]
    grad_only = [
        i for i, (_, m) in enumerate(leaves)
        if handling[i] == "gradient" and any(p.requires_grad for p in m.parameters())
    ]  # fmt: skip
    if not kron:
        raise ShapeError("The model has no trainable parameters in parametrised layers.")
    with torch.no_grad():
        nodes, h = [], X
        for pos, (name, module) in enumerate(leaves):
            if handling[pos] == "gradient":
                node = ParamVJPNode(module, h)
            else:
                table = PARAMETRISED if handling[pos] == "kron" else PARAMETER_FREE
                if isinstance(module, nn.Linear) and h.dim() != 2:
                    raise ShapeError(
                        f"Linear at position {pos} (name {name!r}) needs 2-D input [N, in] "
                        f"on the sweep, got shape {tuple(h.shape)}; backend='graph' takes "
                        "[N, ..., in]."
                    )
                node = table[type(module)](module, h)
            if isinstance(node, (VJPNode, ParamVJPNode)) and node.out.shape[:1] != h.shape[:1]:
                raise ShapeError(
                    f"{type(module).__name__} at position {pos} changes the batch dimension."
                )
            nodes.append(node)
            h = node.out
    return ForwardPass(model, leaves, nodes, kron, grad_only, h)


def backward_sweep(
    fwd: ForwardPass,
    loss_func: nn.Module,
    y: Tensor,
    q: set[str],
    mc_samples: int = 1,
    separate_bias: bool = False,
    kfac_approx: str = "expand",
    generator: torch.Generator | None = None,
    factor_dtype: torch.dtype | None = None,
    loss_value: Tensor | None = None,
) -> Records:
    """The backward sweep of :func:`extract` after :func:`forward_pass` (checked arguments).

    ``loss_value`` is the batch loss if the caller has it already (else it is computed).
    """
    nodes, leaves, trainable = fwd.nodes, fwd.leaves, fwd.kron
    fdt = factor_dtype_of(fwd.model, factor_dtype)
    h = fwd.output
    N = h.shape[0]
    with torch.no_grad():
        loss = make_loss_handler(loss_func, h, y)
        R = loss.R

        # output rows
        rows = _Rows()
        blocks = [loss.grad()[None]]
        V = 1
        if q & {"kfac", "diag_ggn_mc"}:
            blocks.append(loss.sqrt_hessian_sampled(mc_samples, generator))
            rows.mc = slice(V, V + mc_samples)
            V += mc_samples
        diagonals = q & {"diag_ggn", "diag_hessian"}
        if "kflr" in q or (diagonals and loss.T == 1):
            blocks.append(loss.sqrt_hessian())
            rows.sqrt = rows.diag = slice(V, V + loss.C)
            V += loss.C
        if diagonals and loss.T > 1:  # outputs with extra dimensions: block square root
            blocks.append(loss.sqrt_hessian_blocks())
            rows.diag = slice(V, V + loss.T * loss.C)
            V += loss.T * loss.C
        stack = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        kfra = loss.hessian_mean().to(fdt) if "kfra" in q else None

        # backward sweep
        records, nxt = [], None
        position = len(trainable)
        is_trainable, gradient_only = set(trainable), set(fwd.gradient_only)
        first = min(trainable + fwd.gradient_only)
        for i in reversed(range(first, len(nodes))):
            node, (name, module) = nodes[i], leaves[i]
            if i in is_trainable:
                position -= 1
                rec, nxt = _layer_record(
                    node, name, module, position, stack, rows, q, R, N, fdt,
                    separate_bias, kfac_approx, kfra, nxt,
                )  # fmt: skip
                records.append(rec)
            elif i in gradient_only:
                for p, g in zip(node.params, node.param_grads(stack[0])):
                    _accumulate_grad(p, g)
            if i == first:
                break
            residual = None
            if "diag_hessian" in q and getattr(node, "elementwise", False):
                d2 = node.d2()
                residual = None if d2 is None else d2 * stack[0]
            if kfra is not None:
                kfra = _kfra_step(node, kfra)
            stack = node.jac_t(stack)
            if residual is not None:
                extra = _residual_rows(residual)
                for part, sign in extra:
                    rows.residual.append((slice(V, V + part.shape[0]), sign))
                    V += part.shape[0]
                stack = torch.cat([stack, *(part for part, _ in extra)])
    records.reverse()
    unfactored = [(leaves[i][0], leaves[i][1], nodes[i].params) for i in sorted(gradient_only)]
    return Records(
        layers=records,
        loss=loss.value() if loss_value is None else loss_value.detach(),
        batch_size=N,
        reduction_factor=R,
        kfac_approx=kfac_approx,
        mc_samples=mc_samples,
        unfactored=unfactored,
    )


def _kfra_step(node, M: Tensor) -> Tensor:
    r"""KFRA recursion (Botev et al. 2017, eq. 10) through one module.

    ``Linear``: :math:`W^\top M W`; element-wise :math:`\phi`:
    :math:`M \odot \frac1N\sum_n \phi'_n \phi_n'^\top` (BackPACK's ``KFRA``).
    """
    if isinstance(node, LinearNode):
        W = node.module.weight.to(M.dtype)
        return W.T @ M @ W
    d1 = node.d1()
    if d1 is None:
        return M
    d = d1.reshape(d1.shape[0], -1).to(M.dtype)
    return M * (d.T @ d) / d.shape[0]


def _layer_record(
    node, name, module, position, stack, rows, q, R, N, fdt, separate_bias, approx, kfra, nxt
):
    """Record of one trainable layer from the stack at its output.

    Returns:
        ``(record, info)``; ``info`` carries the features and gradient rows needed
        by the cross factors of the previous layer.
    """
    params = _trainable(module)
    has_bias = len(params) == 2
    g0 = stack[0]
    _accumulate_grad(module.weight, node.weight_grad(g0))
    if has_bias:
        _accumulate_grad(module.bias, node.bias_grad(g0))
    rec = LayerRecord(
        name=name,
        module=module,
        position=position,
        params=params,
        has_bias=has_bias,
        separate_bias=separate_bias,
    )
    kinds = [k for k in CROSS_KINDS if k in q]
    per_example = node.rows_per_example(approx)
    P = N * per_example
    info = {"linear": isinstance(node, LinearNode), "joint": rec.joint, "rows": {}}
    cross = "cross" in q and info["linear"]
    if kinds or "kfra" in q:
        rec.A = node.input_factor(approx, R, rec.joint, fdt)
        rec.bias_scale = R * P
        if cross:
            info["a"] = node.features(approx).to(fdt)
    for kind in kinds:
        if kind == "empirical":
            block, scale = stack[:1], 1.0 / (P * R * R)
        else:
            block, scale = stack[rows.mc if kind == "kfac" else rows.sqrt], 1.0 / P
        rec.G[kind] = node.output_factor(block, approx, scale, fdt)
        if cross:
            info["rows"][kind] = node.grad_rows(block, approx).to(fdt)
    if kfra is not None:
        rec.G["kfra"] = kfra.to(fdt).clone()
    if "curvature_grad_factors" in q and info["linear"]:
        for kind, sl in (("kfac", rows.mc), ("kflr", rows.sqrt)):
            if kind in q:
                rec.curvature_grad_factors[kind] = (stack[sl] * R, node.a)
    if "batch_grad_factors" in q and info["linear"]:
        rec.grad_factors = (g0.clone(), node.a)
    if "batch_grad" in q or ("batch_grad_factors" in q and not info["linear"]):
        gw, gb = node.batch_grads(g0)
        rec.batch_grad = [gw, gb] if has_bias else [gw]
    diag_requests = {
        "diag_ggn": [(rows.diag, R)],
        "diag_ggn_mc": [(rows.mc, R)],
        "diag_hessian": [(rows.diag, R), *rows.residual],
    }
    for quantity, parts in diag_requests.items():
        if quantity in q:
            dw, db = node.diag([(stack[sl], w) for sl, w in parts])
            diag = [dw.to(fdt), db.to(fdt)] if has_bias else [dw.to(fdt)]
            setattr(rec, quantity, diag)
    _cross(rec, info, nxt, kinds, R, P, "cross" in q)
    return rec, info


def _cross(rec, info, nxt, kinds, R, P, wanted) -> None:
    """Cross factors between this layer and the next parametrised one (Linear pairs)."""
    if not wanted:
        return
    if nxt is None:
        rec.cross_reason = "last parametrised layer"
        return
    if not (info["linear"] and nxt["linear"]):
        rec.cross_reason = "conv layer: spatial locations differ"
        return
    rec.cross_A = homogeneous_cross(info["a"], nxt["a"], R, info["joint"], nxt["joint"])
    for kind in kinds:
        scale = 1.0 / (P * R * R) if kind == "empirical" else 1.0 / P
        rec.cross_G[kind] = homogeneous_cross(
            info["rows"][kind], nxt["rows"][kind], scale, False, False
        )
