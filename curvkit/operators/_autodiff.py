r"""Autodiff building blocks shared by the exact curvature operators.

Everything here works on any differentiable ``nn.Module`` (not only
``nn.Sequential``) and on models that BackPACK's ``extend()`` has hooked:

- Jacobian-vector products :math:`J v` use forward-mode dual tensors
  (:mod:`torch.autograd.forward_ad`) when the model has no full backward hooks:
  one pass yields the output *with* its reverse-mode graph and the tangent.
  PyTorch's ``BackwardHookFunction`` (installed by full backward hooks, e.g. by
  ``backpack.extend``) has no forward-mode rule, so hooked models use
  :func:`torch.func.jvp` instead, which accepts it and also keeps the graph.
- Several columns at once use ``vmap`` over :func:`torch.func.jvp`; where
  torch.func cannot run the model (in-place updates of running statistics in
  training mode) the columns are looped, or, for hooked models, computed with
  the double-vjp trick (see :class:`Linearization`).
- Vector-Jacobian products :math:`J^\top u` are plain reverse-mode passes that
  reuse one forward graph for all columns.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call

from curvkit.errors import ShapeError, UnsupportedLossError

#: Modules whose training-mode forward pass is random or changes the model.
_STATEFUL_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def resolve_params(
    model: nn.Module, params: Sequence[Tensor] | None
) -> tuple[list[Tensor], list[str]]:
    """The parameters an operator acts on, with their qualified names in ``model``.

    Args:
        model: The network.
        params: Parameters to differentiate, or ``None`` for every parameter
            with ``requires_grad``. A parameter shared by several modules (tied
            weights) is one parameter: it appears once in the flat order, under
            its first name in ``model.named_parameters()``.

    Returns:
        The parameters in flat order and their names (``"0.weight"``).

    Raises:
        ShapeError: If a parameter is not one of ``model``'s, appears twice in
            ``params`` (e.g. ``[w, w]``), or none is left.
    """
    named = list(model.named_parameters(remove_duplicate=True))
    if params is None:
        pairs = [(n, p) for n, p in named if p.requires_grad]
    else:
        by_id = {id(p): n for n, p in named}
        pairs = []
        first: dict[int, int] = {}
        for i, p in enumerate(params):
            if id(p) in first:
                raise ShapeError(
                    f"params[{i}] is params[{first[id(p)]}] ({by_id.get(id(p), 'the same tensor')}"
                    "): a parameter may appear once; a weight tied between modules is one "
                    "parameter and is listed once."
                )
            first[id(p)] = i
            if id(p) not in by_id:
                raise ShapeError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model; "
                    "pass tensors from model.parameters()."
                )
            if not p.requires_grad:
                raise ShapeError(f"params[{i}] ({by_id[id(p)]}) has requires_grad=False.")
            pairs.append((by_id[id(p)], p))
    if not pairs:
        raise ShapeError(
            "No trainable parameter: the model has no parameter with requires_grad=True."
        )
    dtypes = {p.dtype for _, p in pairs}
    devices = {p.device for _, p in pairs}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ShapeError(f"Parameters must share one dtype and device; got {dtypes} on {devices}.")
    if not next(iter(dtypes)).is_floating_point:
        raise ShapeError(f"Parameters must be floating point, got {next(iter(dtypes))}.")
    return [p for _, p in pairs], [n for n, _ in pairs]


def block_layout(
    names: Sequence[str], numels: Sequence[int], blocks: str
) -> tuple[list[int], list[str]]:
    """Sizes and names of the diagonal blocks.

    Args:
        names: Qualified parameter names in flat order.
        numels: Their sizes.
        blocks: ``"param"`` (one block per parameter, named ``"0.weight"``) or
            ``"layer"`` (consecutive parameters of one module form a block
            named after the module as in ``named_modules()``: ``"0"``, and
            ``""`` for the root module; the grouping of the Kronecker operators,
            where weight and bias share a block).

    Returns:
        ``(block_sizes, block_names)``.

    Raises:
        ShapeError: If ``blocks`` is neither option.
    """
    if blocks == "param":
        return list(numels), list(names)
    if blocks != "layer":
        raise ShapeError(f"blocks={blocks!r} is not supported; use 'layer' or 'param'.")
    sizes, out_names = [], []
    for name, numel in zip(names, numels):
        layer = name.rpartition(".")[0]  # "" for the root module, as in named_modules()
        if out_names and out_names[-1] == layer:
            sizes[-1] += numel
        else:
            sizes.append(numel)
            out_names.append(layer)
    return sizes, out_names


def reduction_of(loss_func) -> str:
    """``"mean"`` or ``"sum"``: how ``loss_func`` reduces over examples.

    A callable without a ``reduction`` attribute is taken to average.

    Raises:
        UnsupportedLossError: For other reductions (``"none"``).
    """
    reduction = getattr(loss_func, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{type(loss_func).__name__} has reduction={reduction!r}; curvature operators need a "
            "scalar loss: use reduction='mean' or 'sum'."
        )
    return reduction


def batch_scales(loss_func, batch_sizes: Sequence[int]) -> list[float]:
    r"""Factors turning each batch's loss into its share of the data-set loss.

    For ``reduction="mean"`` the batch loss averages over its :math:`N_b`
    examples; multiplying it by :math:`N_b / N` gives the contribution to
    :math:`L = \frac1N \sum_n \ell_n` over all :math:`N` examples (docs/conventions.md).
    For ``"sum"`` the factor is one.
    """
    if reduction_of(loss_func) == "sum":
        return [1.0] * len(batch_sizes)
    total = sum(batch_sizes)
    return [n / total for n in batch_sizes]


def has_backward_hooks(model: nn.Module) -> bool:
    """Whether a (module or global) full backward hook would wrap the forward pass."""
    global_hooks = (
        nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks
    )
    return bool(global_hooks) or any(
        m._backward_hooks or m._backward_pre_hooks for m in model.modules()
    )


def forward_context(model: nn.Module):
    """Context for our forward passes: stops BackPACK from storing inputs and outputs.

    ``backpack.extend`` registers forward hooks that keep each module's input
    and output (and with them our whole graph) alive after a product;
    ``backpack.disable`` switches that storage off.
    """
    if any(getattr(m, "_backpack_extend", False) for m in model.modules()):
        from backpack import disable

        return disable()
    return contextlib.nullcontext()


def warn_if_stateful(model: nn.Module, what: str) -> None:
    """Warn when training-mode modules make products random or mutate the model."""
    for name, module in model.named_modules():
        if module.training and isinstance(module, _STATEFUL_IN_TRAINING):
            warnings.warn(
                f"{what}: module {name!r} ({type(module).__name__}) is in training mode, so every "
                "product runs it in training mode (Dropout: random products; BatchNorm: batch "
                "statistics, running statistics updated at each product). Call model.eval() "
                "unless that is intended.",
                stacklevel=3,
            )
            return


class Linearization:
    r"""Jacobian-vector and vector-Jacobian products of one model on one batch.

    Three ways to compute :math:`J v`, fastest first, each with a known limit:

    - ``"dual"``: forward-mode dual tensors; not with full backward hooks.
    - ``"func"``: :func:`torch.func.jvp` (``vmap``-ed over columns); not when the
      forward pass mutates a buffer in place (training-mode BatchNorm).
    - ``"vjp"``: the double-vjp trick :math:`Jv = \partial_u (J^\top u)^\top v`
      (Pearlmutter 1994; Townsend 2017) through the reverse-mode graph; works for
      any model that autograd can differentiate twice.

    A way that raises ``RuntimeError`` on this model is not tried again.

    Args:
        model: The network.
        params: Parameters of the Jacobian.
        names: Their qualified names (for :func:`torch.func.functional_call`).
    """

    def __init__(self, model: nn.Module, params: list[Tensor], names: list[str]):
        self.model = model
        self.params = params
        self.names = names
        self.use_dual = not has_backward_hooks(model)
        self.use_func = True

    def _call(self, X, tensors) -> Tensor:
        return functional_call(self.model, dict(zip(self.names, tensors)), (X,))

    def _func_jvp(self, X, primals, tangents):
        return torch.func.jvp(lambda *ps: self._call(X, ps), primals, tangents)

    def output_and_jvp(self, X, v: list[Tensor]) -> tuple[Tensor, Tensor]:
        r"""Output :math:`f` (with its reverse-mode graph) and :math:`J v` (detached)."""
        if self.use_dual:
            with forward_ad.dual_level():
                duals = [forward_ad.make_dual(p, t) for p, t in zip(self.params, v)]
                f, jv = forward_ad.unpack_dual(self._call(X, duals))
            return f, jv.detach()
        if self.use_func:
            try:
                f, jv = self._func_jvp(X, tuple(self.params), tuple(v))
                return f, jv.detach()
            except RuntimeError:
                self.use_func = False
        f = self.model(X)
        return f, self._vjp_trick(f, [t.unsqueeze(0) for t in v])[0]

    def jvp_columns(self, X, V: list[Tensor], f: Tensor) -> Tensor:
        r"""``[k, *f.shape]``: :math:`J v_j` for the columns ``V`` (each ``[k, *p.shape]``).

        ``f`` is the output of ``model(X)`` with its graph (used by the ``"vjp"`` way).
        """
        if self.use_func:
            primals = tuple(p.detach() for p in self.params)
            try:
                with torch.no_grad():
                    return torch.vmap(lambda *t: self._func_jvp(X, primals, t)[1])(*V)
            except RuntimeError:
                self.use_func = False
        if self.use_dual:
            cols = []
            with torch.no_grad(), forward_ad.dual_level():
                for j in range(V[0].shape[0]):
                    duals = [forward_ad.make_dual(p, t[j]) for p, t in zip(self.params, V)]
                    cols.append(forward_ad.unpack_dual(self._call(X, duals)).tangent)
            return torch.stack(cols)
        return self._vjp_trick(f, V)

    def output_and_jvp_columns(self, X, V: list[Tensor]) -> tuple[Tensor, Tensor]:
        r"""Output :math:`f` and ``[k, *f.shape]`` :math:`J v_j`, both detached.

        With :func:`torch.func.jvp` one vectorised pass gives both (the output
        does not depend on the tangents); otherwise the output comes from a plain
        forward pass and :meth:`jvp_columns`.
        """
        if self.use_func:
            primals = tuple(p.detach() for p in self.params)
            try:
                with torch.no_grad():
                    return torch.vmap(lambda *t: self._func_jvp(X, primals, t), out_dims=(None, 0))(
                        *V
                    )
            except RuntimeError:
                self.use_func = False
        f = self.model(X)
        return f.detach(), self.jvp_columns(X, V, f).detach()

    def _vjp_trick(self, f: Tensor, V: list[Tensor]) -> Tensor:
        u = torch.zeros_like(f, requires_grad=True)
        g = torch.autograd.grad(f, self.params, u, create_graph=True, materialize_grads=True)
        live = [i for i, gi in enumerate(g) if gi.requires_grad]
        k = V[0].shape[0]
        if not live:
            return torch.zeros(k, *f.shape, dtype=f.dtype, device=f.device)
        cols = [
            torch.autograd.grad(
                [g[i] for i in live],
                u,
                [V[i][j] for i in live],
                retain_graph=True,
                materialize_grads=True,
            )[0]
            for j in range(k)
        ]
        return torch.stack(cols)

    def vjp_columns(self, f: Tensor, U: Tensor) -> list[Tensor]:
        r"""``[k, *p.shape]`` per parameter: :math:`J^\top u_j` for ``U`` ``[k, *f.shape]``.

        One reverse pass per column through the same graph (the graph is
        released after the last column).
        """
        k = U.shape[0]
        out = [torch.empty(k, *p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        for j in range(k):
            grads = torch.autograd.grad(
                f, self.params, U[j], retain_graph=j < k - 1, materialize_grads=True
            )
            for o, g in zip(out, grads):
                o[j] = g
        return out


def split_columns(X: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """``[D, k]`` to one ``[k, *shape]`` tensor per parameter."""
    k = X.shape[1]
    chunks = X.T.split([s.numel() for s in shapes], dim=1)
    return [c.reshape(k, *s) for c, s in zip(chunks, shapes)]


def join_columns(parts: Sequence[Tensor]) -> Tensor:
    """One ``[k, *shape]`` tensor per parameter to ``[D, k]``."""
    k = parts[0].shape[0]
    return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T
