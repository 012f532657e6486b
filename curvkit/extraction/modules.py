r"""Parameter-free modules of the extraction sweep: forward state and transposed Jacobians.

Each supported module type maps (explicit table :data:`PARAMETER_FREE`) to a
node class. A node is created at forward time from ``(module, x)``; it holds the
output ``out`` and whatever the backward sweep needs, and offers

- ``jac_t(stack)``: apply the transposed input-output Jacobian to a stack
  ``[V, N, *out_shape]`` of output-gradient rows (``V`` rows, ``N`` examples),
  returning ``[V, N, *in_shape]``;
- for element-wise functions :math:`\phi`: ``d1()`` (:math:`\phi'(x)`, ``[N, *shape]``)
  and ``d2()`` (:math:`\phi''(x)`, or ``None`` when it vanishes), used by KFRA
  (Botev et al. 2017, eq. 10) and by the Hessian diagonal's residual terms
  (BackPACK's ``DiagHessian``, Dangel et al. 2020, App. A.3).

Non-element-wise modules (pooling, padding, train-mode dropout, ...) are
piecewise linear: their transposed Jacobian comes from ``torch.func.vjp`` taken at
forward time and applied to the whole stack with ``torch.vmap``, so random masks
stay those of the forward pass; their second derivative vanishes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _run(module: nn.Module, x: Tensor) -> Tensor:
    """Call ``module`` out of place (in-place modules get a copy of their input)."""
    if getattr(module, "inplace", False):
        x = x.clone()
    return module(x)


class Node:
    """Base class of a parameter-free node.

    Attributes:
        out: The module's output.
        elementwise: Whether the module is an element-wise function (KFRA-compatible).
    """

    elementwise = False

    def __init__(self, module: nn.Module, x: Tensor):
        self.module = module
        self.in_shape = x.shape
        self.out = _run(module, x)

    def jac_t(self, stack: Tensor) -> Tensor:
        """Transposed Jacobian applied to ``[V, N, *out_shape]`` rows."""
        raise NotImplementedError

    def d2(self) -> Tensor | None:
        """Second derivative ``[N, *shape]`` of an element-wise function (``None``: zero)."""
        return None


class IdentityNode(Node):
    """``Identity`` and dropout in evaluation mode (or with ``p = 0``)."""

    elementwise = True

    def __init__(self, module, x):
        self.module = module
        self.in_shape = x.shape
        self.out = x

    def jac_t(self, stack):
        """See :meth:`Node.jac_t`."""
        return stack

    def d1(self):
        """First derivative (``None``: identically one)."""
        return None  # multiplication by one


class ElementwiseNode(Node):
    r"""Element-wise activation :math:`\phi` with analytic derivatives (subclasses)."""

    elementwise = True

    def __init__(self, module, x):
        super().__init__(module, x)
        self._d1 = None

    def d1(self) -> Tensor:
        r""":math:`\phi'(x)`, ``[N, *shape]`` (cached)."""
        if self._d1 is None:
            self._d1 = self._first()
        return self._d1

    def _first(self) -> Tensor:
        raise NotImplementedError

    def jac_t(self, stack):
        r"""Multiply by :math:`\phi'` in place (the sweep owns its stacks)."""
        return stack.mul_(self.d1())


class SigmoidNode(ElementwiseNode):
    r""":math:`\sigma' = \sigma(1-\sigma)`, :math:`\sigma'' = \sigma'(1-2\sigma)`."""

    def _first(self):
        return self.out * (1.0 - self.out)

    def d2(self):
        """See :meth:`Node.d2`."""
        return self.d1() * (1.0 - 2.0 * self.out)


class TanhNode(ElementwiseNode):
    r""":math:`\tanh' = 1-\tanh^2`, :math:`\tanh'' = -2\tanh\,\tanh'`."""

    def _first(self):
        return 1.0 - self.out.square()

    def d2(self):
        """See :meth:`Node.d2`."""
        return -2.0 * self.out * self.d1()


class ReLUNode(ElementwiseNode):
    """``ReLU``: derivative is the indicator of a positive output; second derivative zero."""

    def _first(self):
        return (self.out > 0).to(self.out.dtype)


class LeakyReLUNode(ElementwiseNode):
    """``LeakyReLU``: derivative 1 or ``negative_slope``; second derivative zero."""

    def __init__(self, module, x):
        super().__init__(module, x)
        self.positive = x > 0

    def _first(self):
        slope = torch.tensor(
            self.module.negative_slope, dtype=self.out.dtype, device=self.out.device
        )
        return torch.where(self.positive, torch.ones_like(self.out), slope)


class AutogradElementwiseNode(ElementwiseNode):
    r"""Element-wise activation whose derivatives come from autograd.

    For element-wise :math:`\phi`, :math:`\phi'(x) = \nabla_x \sum \phi(x)` and
    :math:`\phi''(x) = \nabla_x \sum \phi'(x)`.
    """

    def __init__(self, module, x):
        super().__init__(module, x)
        self.x = x
        self._d2 = None

    def _derivatives(self, second: bool) -> None:
        with torch.enable_grad():
            xx = self.x.detach().requires_grad_(True)
            (d1,) = torch.autograd.grad(_run(self.module, xx).sum(), xx, create_graph=second)
            if second:
                (d2,) = torch.autograd.grad(d1.sum(), xx, allow_unused=True)
                self._d2 = torch.zeros_like(self.x) if d2 is None else d2.detach()
        self._d1 = d1.detach()

    def _first(self):
        self._derivatives(second=False)
        return self._d1

    def d2(self):
        """See :meth:`Node.d2`."""
        if self._d2 is None:
            self._derivatives(second=True)
        return self._d2


class PiecewiseLinearNode(AutogradElementwiseNode):
    """Piecewise-linear element-wise function: autograd first derivative, zero second one."""

    def d2(self):
        """Zero (returned as ``None``)."""
        return None


class FlattenNode(Node):
    """``Flatten`` over non-batch dimensions: the transposed Jacobian is a reshape."""

    def jac_t(self, stack):
        """See :meth:`Node.jac_t`."""
        return stack.reshape(stack.shape[0], *self.in_shape)


class VJPNode(Node):
    """Piecewise-linear module: ``torch.func.vjp`` at forward time, ``vmap`` over the stack."""

    def __init__(self, module, x):
        self.module = module
        self.in_shape = x.shape
        with torch.enable_grad():
            self.out, self._vjp = torch.func.vjp(lambda t: _run(module, t), x)
        self.out = self.out.detach()

    def jac_t(self, stack):
        """See :meth:`Node.jac_t`."""
        if stack.shape[0] == 1:
            return self._vjp(stack[0])[0][None]
        return torch.vmap(self._vjp)(stack)[0]


class ParamVJPNode(Node):
    """Any module, parameters included, through autograd (``extract(..., unsupported="gradient")``).

    The module runs once with autograd at forward time (side effects such as
    BatchNorm's running statistics happen once, as in a plain forward pass); the
    stack passes through its exact transposed Jacobian, and its trainable
    parameters get the gradient of the loss (row 0), but no curvature.
    """

    def __init__(self, module, x):
        self.module = module
        self.in_shape = x.shape
        self.params = [p for p in module.parameters() if p.requires_grad]
        with torch.enable_grad():
            self._x = x.detach().requires_grad_(True)
            self._out = _run(module, self._x)
        self.out = self._out.detach()

    def jac_t(self, stack):
        """See :meth:`Node.jac_t`."""
        (res,) = torch.autograd.grad(
            self._out, self._x, stack, retain_graph=True, is_grads_batched=True
        )
        return res

    def param_grads(self, g0: Tensor) -> tuple[Tensor, ...]:
        """Gradients of the trainable parameters for the output gradient ``g0``."""
        if not self.params:
            return ()
        return torch.autograd.grad(self._out, self.params, g0, retain_graph=True)


class MaxPoolNode(Node):
    """``MaxPool1d/2d``: scatter the rows to the arg-max positions (overlaps accumulate)."""

    def __init__(self, module, x):
        self.module = module
        self.in_shape = x.shape
        m = module
        pool = F.max_pool1d if isinstance(m, nn.MaxPool1d) else F.max_pool2d
        out = pool(
            x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
        )
        self.out, self.indices = out

    def jac_t(self, stack):
        """See :meth:`Node.jac_t`."""
        V = stack.shape[0]
        N, C = self.in_shape[:2]
        spatial = self.in_shape[2:].numel()
        idx = self.indices.reshape(1, N, C, -1).expand(V, -1, -1, -1)
        res = stack.new_zeros(V, N, C, spatial)
        res.scatter_add_(3, idx, stack.reshape(V, N, C, -1))
        return res.reshape(V, *self.in_shape)


def _dropout_node(module: nn.Module, x: Tensor) -> Node:
    if not module.training or module.p == 0.0:
        return IdentityNode(module, x)
    return VJPNode(module, x)


def _flatten_node(module: nn.Module, x: Tensor) -> Node:
    start = module.start_dim % x.dim()
    if start == 0:
        return VJPNode(module, x)  # merges the batch dimension: caught by the batch check
    return FlattenNode(module, x)


_AUTOGRAD_ELEMENTWISE = (
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardswish,
)
_PIECEWISE_LINEAR = (nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid)

#: Parameter-free module type -> node factory ``(module, x) -> Node`` (exact type match).
PARAMETER_FREE: dict[type, object] = {
    nn.Sigmoid: SigmoidNode,
    nn.Tanh: TanhNode,
    nn.ReLU: ReLUNode,
    nn.LeakyReLU: LeakyReLUNode,
    **dict.fromkeys(_AUTOGRAD_ELEMENTWISE, AutogradElementwiseNode),
    **dict.fromkeys(_PIECEWISE_LINEAR, PiecewiseLinearNode),
    nn.Identity: IdentityNode,
    nn.Dropout: _dropout_node,
    nn.Flatten: _flatten_node,
    nn.Unflatten: VJPNode,
    nn.MaxPool1d: MaxPoolNode,
    nn.MaxPool2d: MaxPoolNode,
    nn.AvgPool1d: VJPNode,
    nn.AvgPool2d: VJPNode,
    nn.AdaptiveAvgPool1d: VJPNode,
    nn.AdaptiveAvgPool2d: VJPNode,
    nn.ZeroPad1d: VJPNode,
    nn.ZeroPad2d: VJPNode,
}
