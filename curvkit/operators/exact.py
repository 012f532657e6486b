r"""Exact curvature operators: Hessian, GGN, Fisher (type-2 and Monte Carlo), empirical Fisher.

Matrix-free and torch-native: a product costs a few forward/backward passes
per batch, runs on the parameters' device and dtype, and never forms a
``D x D`` matrix (only :meth:`~curvkit.operators.base.CurvatureOperator.to_dense`
does). They work for any differentiable model (BatchNorm in eval mode,
LayerNorm, residual connections, BackPACK-``extend``-ed models) and evaluate
the model at its *current* parameters at every product.

Conventions (docs/conventions.md): :math:`L(\theta) = R\sum_n \ell(f(x_n;\theta), y_n)` with
:math:`R = 1/N` (``reduction="mean"``) or :math:`1` (``"sum"``) over all
:math:`N` examples of all batches, so the curvature over several batches equals
the curvature over their concatenation. Flat order: concatenation of
``p.flatten()`` over ``params``.

- Hessian: :math:`H = \nabla^2_\theta L`, by double backward (Pearlmutter 1994):
  one gradient graph per batch, one extra backward pass per column.
- GGN: :math:`G = \sum_n J_n^\top \Lambda_n J_n`, :math:`\Lambda_n = \nabla^2_f`
  of the batch loss (Schraudolph 2002; M&G §2): :math:`Jv` by forward mode,
  :math:`\Lambda` in closed form (MSE, cross-entropy, BCE-with-logits) or by
  autograd (other losses), :math:`J^\top u` by one backward pass per column.
- Fisher: type-2 (equal to the GGN for the likelihood losses) or Monte Carlo
  with seeded samples of the model's predictive distribution (Martens 2014;
  same sample stream as curvlinops' ``FisherMCLinearOperator``).
- Empirical Fisher: :math:`R\sum_n \nabla\ell_n\nabla\ell_n^\top`, per-example
  gradient outer products at the true labels.

Outputs with extra dimensions are accepted in PyTorch's layouts (cross-entropy
logits ``[N, C, d1, ...]`` with targets ``[N, d1, ...]``, e.g. a language model's
``[N, V, T]``; MSE/BCE outputs ``[N, d1, ..., C]``); ``N`` counts examples
(sequences), the normalisation is PyTorch's (``ignore_index`` included), and the
Monte Carlo Fisher draws one label per position (docs/conventions.md, "Outputs
with extra dimensions").

See :mod:`curvkit.operators._output_curvature` for the scaling of the Monte
Carlo Fisher and of the empirical Fisher for ``MSELoss``/``BCEWithLogitsLoss``
with ``"mean"`` (where the latter differs from curvlinops by the factor ``C``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvkit.data import as_batches
from curvkit.errors import CurvkitError, ShapeError
from curvkit.operators import _output_curvature as oc
from curvkit.operators._autodiff import (
    Linearization,
    batch_scales,
    block_layout,
    forward_context,
    has_backward_hooks,
    join_columns,
    resolve_params,
    split_columns,
    warn_if_stateful,
)
from curvkit.operators.base import CurvatureOperator, DenseOperator
from curvkit.operators.cg import CGInverse

__all__ = [
    "ExactOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "MCFisherOperator",
    "EmpiricalFisherOperator",
    "hessian",
    "ggn",
    "fisher",
    "empirical_fisher",
    "loss_and_gradient",
]


def _to(t, device):
    return t.to(device, non_blocking=True) if isinstance(t, Tensor) else t


class ExactOperator(CurvatureOperator):
    """Shared machinery of the exact operators: data, scaling, blocks, gradient, inverse.

    Args:
        model: Any differentiable ``nn.Module`` mapping a batch ``X`` to outputs.
        loss_func: Loss ``loss_func(model(X), y)`` with ``reduction`` ``"mean"``
            or ``"sum"``.
        data: One ``(X, y)`` batch or an iterable of batches.
        params: Parameters to differentiate; default every parameter with
            ``requires_grad``.
        blocks: ``"layer"`` (weight and bias of a module in one block, as the
            Kronecker operators) or ``"param"`` (one block per parameter).

    Raises:
        ShapeError: For parameters not in ``model``, empty data or a bad ``blocks``.
        UnsupportedLossError: For a loss without a mean/sum reduction.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func,
        data,
        params: Sequence[Tensor] | None = None,
        blocks: str = "layer",
    ):
        self.model = model
        self.loss_func = loss_func
        self.params, self.param_names = resolve_params(model, params)
        self.batches = as_batches(data)
        self.batch_scales = batch_scales(loss_func, [X.shape[0] for X, _ in self.batches])
        self.num_data = sum(X.shape[0] for X, _ in self.batches)
        sizes, names = block_layout(self.param_names, [p.numel() for p in self.params], blocks)
        p0 = self.params[0]
        super().__init__([p.shape for p in self.params], p0.dtype, p0.device, sizes, names)
        warn_if_stateful(model, type(self).__name__)

    def _data(self):
        for (X, y), scale in zip(self.batches, self.batch_scales):
            yield _to(X, self.device), _to(y, self.device), scale

    def _matmat(self, X: Tensor) -> Tensor:
        V = split_columns(X, self.param_shapes)
        total = None
        with forward_context(self.model), torch.enable_grad():
            for Xb, yb, scale in self._data():
                part = self._matmat_batch(Xb, yb, scale, V)
                total = part if total is None else [t.add_(p) for t, p in zip(total, part)]
        return join_columns(total)

    def _matmat_batch(self, X, y, scale: float, V: list[Tensor]) -> list[Tensor]:
        """One batch's contribution, ``[k, *p.shape]`` per parameter."""
        raise NotImplementedError

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The data-set loss and its flat gradient at the current parameters."""
        return loss_and_gradient(self.model, self.loss_func, self.batches, self.params)

    def inverse(self, damping: float = 0.0, method: str = "cg", **kwargs) -> CurvatureOperator:
        r"""``(self + damping * I)^{-1}``.

        Args:
            damping: :math:`\lambda \ge 0` added to the diagonal.
            method: ``"cg"``: a :class:`~curvkit.operators.cg.CGInverse`
                (matrix-free). ``"dense"``: ``eigh`` of :meth:`to_dense`
                (small models).
            **kwargs: For ``"cg"``: ``tol``, ``maxiter``, ``atol``,
                ``preconditioner`` of :class:`~curvkit.operators.cg.CGInverse`. For
                ``"dense"``: ``max_dim`` (default 10000), the largest ``D`` allowed.

        Returns:
            An operator applying the inverse.

        Raises:
            ShapeError: For an unknown method, or ``"dense"`` with ``D > max_dim``.
            CurvkitError: If the damped matrix is singular.
        """
        if method == "cg":
            return CGInverse(self, damping=damping, **kwargs)
        if method != "dense":
            raise ShapeError(f"inverse(method={method!r}) is not supported; use 'cg' or 'dense'.")
        max_dim = kwargs.pop("max_dim", 10_000)
        if kwargs:
            raise ShapeError(f"inverse(method='dense') takes only max_dim, got {sorted(kwargs)}.")
        if self.dim > max_dim:
            raise ShapeError(
                f"inverse(method='dense') on D={self.dim} > max_dim={max_dim} would form a "
                f"{self.dim}x{self.dim} matrix; use method='cg' or raise max_dim."
            )
        A = self.to_dense()
        evals, evecs = torch.linalg.eigh((A + A.T) / 2)
        shifted = evals + damping
        tiny = shifted.abs() <= self.dim * torch.finfo(
            self.dtype
        ).eps * evals.abs().max().clamp_min(1)
        if bool(tiny.any()):
            raise CurvkitError(
                f"{type(self).__name__} + {damping} I is singular (eigenvalue "
                f"{shifted[tiny][0].item():.3g}); increase damping."
            )
        inv = (evecs / shifted) @ evecs.T
        return DenseOperator(
            inv, self.param_shapes, block_sizes=self.block_sizes, block_names=self.block_names
        )


class HessianOperator(ExactOperator):
    r"""Hessian :math:`\nabla^2_\theta L` by double backward (Pearlmutter 1994).

    Per batch and product: one forward pass, one backward pass building the
    gradient graph, then one backward pass through it per column.
    """

    def _matmat_batch(self, X, y, scale, V):
        loss = scale * self.loss_func(self.model(X), y)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        k = V[0].shape[0]
        out = [torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) for p in self.params]
        if not live:  # loss linear in the parameters
            return out
        outputs = [grads[i] for i in live]
        for j in range(k):
            hv = torch.autograd.grad(
                outputs,
                self.params,
                [V[i][j] for i in live],
                retain_graph=j < k - 1,
                materialize_grads=True,
            )
            for o, h in zip(out, hv):
                o[j] = h
        return out


class _GaussNewtonForm(ExactOperator):
    r""":math:`\sum_n J_n^\top \Lambda_n J_n`; subclasses choose :math:`\Lambda`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lin = Linearization(self.model, self.params, self.param_names)

    def _output_curvature(self, f: Tensor, y: Tensor, scale: float) -> oc.OutputCurvature:
        raise NotImplementedError

    def _reset(self) -> None:
        """Called before every product (the Monte Carlo Fisher reseeds its sampler)."""

    def _matmat(self, X):
        self._lin.use_dual = not has_backward_hooks(self.model)
        self._reset()
        return super()._matmat(X)

    def quadratic_form(self, X: Tensor) -> Tensor:
        r""":math:`X^\top M X = \sum_n (J_n X)^\top \Lambda_n (J_n X)`, ``[k, k]``.

        Only Jacobian-vector products (forward mode, all columns in one
        vectorised pass where :func:`torch.func.jvp` applies) and the output-space
        curvature: no backward pass. M&G's quadratic model needs just these
        numbers, at about half the cost of ``X.T @ self.matmat(X)``.

        Args:
            X: ``[D, k]`` columns.

        Returns:
            The symmetric ``[k, k]`` matrix.
        """
        X = self._check_columns(X)
        self.matvecs += X.shape[1]
        self._lin.use_dual = not has_backward_hooks(self.model)
        self._reset()
        V = split_columns(X, self.param_shapes)
        k = X.shape[1]
        total = X.new_zeros(k, k)
        with forward_context(self.model), torch.enable_grad():
            for Xb, yb, scale in self._data():
                f, JV = self._lin.output_and_jvp_columns(Xb, V)
                lam = self._output_curvature(f.detach(), yb, scale)
                total += JV.reshape(k, -1) @ lam(JV).reshape(k, -1).T
        return total

    def _matmat_batch(self, X, y, scale, V):
        if V[0].shape[0] == 1:  # one pass gives f (with graph) and J v
            f, jv = self._lin.output_and_jvp(X, [v[0] for v in V])
            JV = jv.unsqueeze(0)
        else:  # one graph for all columns; J v for all columns at once
            f = self.model(X)
            JV = self._lin.jvp_columns(X, V, f)
        lam = self._output_curvature(f.detach(), y, scale)
        return self._lin.vjp_columns(f, lam(JV))


class GGNOperator(_GaussNewtonForm):
    r"""Generalised Gauss-Newton :math:`\sum_n J_n^\top \nabla^2_f \ell_n J_n` (any loss)."""

    def _output_curvature(self, f, y, scale):
        return oc.ggn_curvature(self.loss_func, f, y, scale)


class FisherOperator(GGNOperator):
    """Type-2 Fisher: the GGN of a likelihood loss (MSE, cross-entropy, BCE-with-logits)."""


class MCFisherOperator(_GaussNewtonForm):
    r"""Monte Carlo Fisher :math:`c\sum_n J_n^\top \frac1M\sum_m s_{nm}s_{nm}^\top J_n`.

    A generator seeded with ``seed`` at the start of every product draws the
    samples batch after batch, so every product uses the same samples (the
    operator is one fixed symmetric matrix). The stream matches curvlinops'
    ``FisherMCLinearOperator`` for the same seed and device.
    """

    def __init__(self, *args, mc_samples: int = 1, seed: int = 0, **kwargs):
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ShapeError(
                "mc_samples must be a positive int (or None for the exact Fisher), got "
                f"{mc_samples!r}."
            )
        super().__init__(*args, **kwargs)
        self.mc_samples = mc_samples
        self.seed = seed
        self._generator = None

    def _reset(self):
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)

    def _output_curvature(self, f, y, scale):
        return oc.mc_fisher_curvature(self.loss_func, f, y, scale, self.mc_samples, self._generator)


class EmpiricalFisherOperator(_GaussNewtonForm):
    r"""Empirical Fisher :math:`R\sum_n \nabla\ell_n \nabla\ell_n^\top` at the true labels."""

    def _output_curvature(self, f, y, scale):
        return oc.empirical_fisher_curvature(self.loss_func, f, y, scale)


# -- public constructors ------------------------------------------------------------------


def hessian(
    model: nn.Module, loss_func, data, params=None, blocks: str = "layer"
) -> HessianOperator:
    r"""The Hessian :math:`\nabla^2_\theta L` of the data-set loss (any model, any loss).

    Args:
        model: Differentiable network, ``model(X)`` gives the output.
        loss_func: Loss module (``reduction`` ``"mean"`` or ``"sum"``).
        data: ``(X, y)`` or an iterable of such batches.
        params: Parameters (default: all with ``requires_grad``), flat order.
        blocks: ``"layer"`` or ``"param"`` block naming.

    Returns:
        A :class:`HessianOperator`.

    Raises:
        ShapeError: For bad ``params``, ``data`` or ``blocks``.
        UnsupportedLossError: For ``reduction="none"``.

    Example:
        >>> import torch, curvkit as ck
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
        >>> H = ck.hessian(model, nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1)))
        >>> H.shape, H.block_names
        ((11, 11), ['0', '2'])
        >>> (H @ torch.ones(11)).shape
        torch.Size([11])
    """
    return HessianOperator(model, loss_func, data, params=params, blocks=blocks)


def ggn(model: nn.Module, loss_func, data, params=None, blocks: str = "layer") -> GGNOperator:
    r"""The generalised Gauss-Newton matrix :math:`\sum_n J_n^\top \nabla_f^2\ell_n J_n`.

    Positive semi-definite for convex losses. Same arguments, returns and
    errors as :func:`hessian`.

    Example:
        >>> import torch, curvkit as ck
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> G = ck.ggn(model, nn.CrossEntropyLoss(), data)
        >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-6)
        True
    """
    return GGNOperator(model, loss_func, data, params=params, blocks=blocks)


def fisher(
    model: nn.Module,
    loss_func,
    data,
    mc_samples: int | None = None,
    seed: int = 0,
    params=None,
    blocks: str = "layer",
) -> CurvatureOperator:
    r"""The Fisher information of a likelihood loss.

    Args:
        model: Differentiable network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: ``(X, y)`` or an iterable of such batches.
        mc_samples: ``None``: the exact type-2 Fisher (equal to the GGN for these
            losses). An int ``M``: the Monte Carlo Fisher with ``M`` labels
            sampled per example from the model's predictive distribution.
        seed: Seed of the Monte Carlo samples (the same samples at every product).
        params: Parameters (default: all with ``requires_grad``), flat order.
        blocks: ``"layer"`` or ``"param"`` block naming.

    Returns:
        A :class:`FisherOperator` or :class:`MCFisherOperator`.

    Raises:
        UnsupportedLossError: For other losses, class weights or label smoothing.
        ShapeError: For a bad ``mc_samples`` (or as in :func:`hessian`).

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> F = ck.fisher(model, torch.nn.CrossEntropyLoss(), data, mc_samples=4, seed=1)
        >>> v = torch.randn(8)
        >>> torch.equal(F @ v, F @ v)
        True
    """
    what = "Fisher" if mc_samples is None else "Monte Carlo Fisher"
    oc.check_likelihood_loss(loss_func, what)
    if mc_samples is None:
        return FisherOperator(model, loss_func, data, params=params, blocks=blocks)
    return MCFisherOperator(
        model, loss_func, data, params=params, blocks=blocks, mc_samples=mc_samples, seed=seed
    )


def empirical_fisher(
    model: nn.Module, loss_func, data, params=None, blocks: str = "layer"
) -> EmpiricalFisherOperator:
    r"""The empirical Fisher :math:`R\sum_n \nabla_\theta\ell_n \nabla_\theta\ell_n^\top`.

    :math:`\ell_n` is the loss on example :math:`n` alone (with the true label),
    :math:`L = R\sum_n\ell_n` (docs/conventions.md). Works for any loss that is a mean or
    sum over examples. Same arguments, returns and errors as :func:`hessian`.
    For ``MSELoss``/``BCEWithLogitsLoss`` with ``reduction="mean"`` it is
    :math:`1/C` times curvlinops' ``EFLinearOperator`` (``C`` outputs per example),
    which treats the mean over outputs as a scale on the summed likelihood.

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 1)
        >>> data = (torch.randn(5, 3), torch.randn(5, 1))
        >>> E = ck.empirical_fisher(model, torch.nn.MSELoss(reduction="sum"), data)
        >>> E.shape
        (4, 4)
    """
    return EmpiricalFisherOperator(model, loss_func, data, params=params, blocks=blocks)


def loss_and_gradient(model: nn.Module, loss_func, data, params=None) -> tuple[Tensor, Tensor]:
    r"""The data-set loss :math:`L` and its flat gradient :math:`\nabla_\theta L`.

    Batches are rescaled as the operators do, so the result equals the loss
    and gradient on the concatenated data.

    Args:
        model: Differentiable network.
        loss_func: Loss module (``reduction`` ``"mean"`` or ``"sum"``).
        data: ``(X, y)`` or an iterable of such batches.
        params: Parameters (default: all with ``requires_grad``), flat order.

    Returns:
        ``(loss, gradient)``: a detached scalar and a ``[D]`` tensor on the
        parameters' device.

    Example:
        >>> import torch, curvkit as ck
        >>> model = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(6, 3), torch.randn(6, 1)
        >>> data = [(X[:2], y[:2]), (X[2:], y[2:])]
        >>> loss, g = ck.operators.exact.loss_and_gradient(model, torch.nn.MSELoss(), data)
        >>> torch.allclose(loss, torch.nn.MSELoss()(model(X), y))
        True
    """
    params, _ = resolve_params(model, params)
    batches = as_batches(data)
    scales = batch_scales(loss_func, [X.shape[0] for X, _ in batches])
    device = params[0].device
    total_loss = torch.zeros((), dtype=params[0].dtype, device=device)
    total_grad = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
    with forward_context(model), torch.enable_grad():
        for (X, y), scale in zip(batches, scales):
            loss = scale * loss_func(model(_to(X, device)), _to(y, device))
            grads = torch.autograd.grad(loss, params, materialize_grads=True)
            total_loss += loss.detach()
            total_grad += torch.cat([g.reshape(-1) for g in grads])
    return total_loss, total_grad
