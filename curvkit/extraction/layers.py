r"""Parametrised layers of the extraction sweep: ``Linear``, ``Conv1d``, ``Conv2d``.

Index conventions: ``v`` row of the backpropagated stack, ``n`` example, ``o``
output feature/channel, ``k`` input feature (``C_in * prod(kernel)`` for conv),
``t`` output location (conv only; ``T`` of them, ``T = 1`` for ``Linear``).

A layer node stores its input at forward time. At backward time it turns an
output-gradient stack ``[V, N, *out_shape]`` into

- *feature rows* ``[P, K]`` (``P = N`` for ``Linear`` and conv "reduce",
  ``P = N*T`` for conv "expand"; "reduce" averages the patches over ``t``), whose
  Gram matrix gives the input factor :math:`A`;
- *gradient rows* ``[V*P, O]`` (conv "reduce" sums over ``t``), whose Gram
  matrix over ``P`` gives the output factor :math:`G` (KFC, Grosse & Martens
  2016, §3; Eschenhagen et al. 2023, §3 for expand/reduce);
- weight/bias gradients, per-example gradients and squared per-example
  gradients (diagonals), and the transposed Jacobian ``jac_t`` w.r.t. the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.extraction.gram import assemble_homogeneous, gram, homogeneous_gram

_DIAG_CHUNK = 2**24  # entries of the largest per-(row, example) gradient tensor at once


class LinearNode:
    """``nn.Linear`` on 2-D input ``[N, in]``.

    Args:
        module: The layer.
        x: Its input ``[N, in]``.
    """

    def __init__(self, module: nn.Linear, x: Tensor):
        self.module = module
        self.a = x
        self.N = x.shape[0]
        self.out = F.linear(x, module.weight, module.bias)

    def features(self, approx: str) -> Tensor:
        """Feature rows ``[N, in]`` (the same for "expand" and "reduce")."""
        return self.a

    def grad_rows(self, block: Tensor, approx: str) -> Tensor:
        """``[V, N, out]`` -> ``[V*N, out]``."""
        return block.reshape(-1, block.shape[-1])

    def rows_per_example(self, approx: str) -> int:
        """Feature rows per example (``1``)."""
        return 1

    def input_factor(self, approx: str, scale: float, homogeneous: bool, dtype) -> Tensor:
        r""":math:`A = s \sum_n \bar a_n \bar a_n^\top`."""
        return homogeneous_gram(self.a.to(dtype), scale, homogeneous)

    def output_factor(self, block: Tensor, approx: str, scale: float, dtype) -> Tensor:
        r""":math:`s \sum_{v,n} g_{vn} g_{vn}^\top` of rows ``[V, N, out]``."""
        return gram(self.grad_rows(block, approx).to(dtype), scale)

    def weight_grad(self, g0: Tensor) -> Tensor:
        r""":math:`\sum_n g_n a_n^\top` from the true-label row ``g0`` ``[N, out]``."""
        return g0.T @ self.a

    def bias_grad(self, g0: Tensor) -> Tensor:
        """Sum of ``g0`` over examples."""
        return g0.sum(0)

    def batch_grads(self, g0: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example weight ``[N, out, in]`` and bias ``[N, out]`` gradients."""
        return torch.einsum("no,ni->noi", g0, self.a), g0.clone()

    def diag(self, blocks: list[tuple[Tensor, float]]) -> tuple[Tensor, Tensor]:
        r"""Weighted sums of squared per-(row, example) gradients.

        For ``Linear`` the square factorises:
        :math:`\sum_{v,n} (s_{vn} a_n^\top)^{\odot 2} = (\sum_v s_{vn}^{\odot 2})^\top a^{\odot 2}`.

        Args:
            blocks: ``(rows [k, N, out], weight)`` pairs.

        Returns:
            Weight ``[out, in]`` and bias ``[out]`` diagonals.
        """
        ss = sum(w * B.square().sum(0) for B, w in blocks)  # [N, out]
        return ss.T @ self.a.square(), ss.sum(0)

    def jac_t(self, stack: Tensor) -> Tensor:
        """``[V, N, out]`` -> ``[V, N, in]`` (multiplication with ``W``)."""
        V, N, out = stack.shape
        return (stack.reshape(V * N, out) @ self.module.weight).reshape(V, N, -1)


def conv_padding(module: nn.Module) -> tuple[int, ...] | None:
    """Explicit symmetric padding of a conv layer, or ``None`` if it has none.

    ``"valid"`` is zero padding; ``"same"`` is symmetric when every
    ``dilation * (kernel - 1)`` is even.
    """
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in totals):
            return None
        return tuple(t // 2 for t in totals)
    return tuple(module.padding)


class ConvNode:
    """``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``, zero padding).

    Args:
        module: The layer.
        x: Its input ``[N, C_in, *spatial]``.
    """

    def __init__(self, module: nn.Module, x: Tensor):
        self.module = module
        self.x = x
        self.N = x.shape[0]
        self.one_d = isinstance(module, nn.Conv1d)
        self.padding = conv_padding(module)
        self.out = module(x)
        self.T = self.out.shape[2:].numel()
        self._U = None

    def _conv2d_args(self) -> tuple[tuple[int, int], ...]:
        m = self.module
        if self.one_d:
            return (1, m.kernel_size[0]), (1, m.stride[0]), (0, self.padding[0]), (1, m.dilation[0])
        return m.kernel_size, m.stride, self.padding, m.dilation

    def unfolded(self) -> Tensor:
        """Patches ``[N, K, T]`` (cached), rows ordered like ``weight[o].flatten()``."""
        if self._U is None:
            k, s, p, d = self._conv2d_args()
            x = self.x[:, :, None] if self.one_d else self.x
            self._U = F.unfold(x, k, dilation=d, padding=p, stride=s)
        return self._U

    def features(self, approx: str) -> Tensor:
        """``[N*T, K]`` ("expand") or patches averaged over ``t`` ``[N, K]`` ("reduce")."""
        U = self.unfolded()
        if approx == "reduce":
            return U.mean(2)
        return U.transpose(1, 2).reshape(-1, U.shape[1])

    def grad_rows(self, block: Tensor, approx: str) -> Tensor:
        """``[V, N, C_out, *spatial]`` -> ``[V*N*T, C_out]`` ("reduce": summed over ``t``)."""
        B = block.flatten(3)
        c_out = B.shape[2]
        if approx == "reduce":
            return B.sum(3).reshape(-1, c_out)
        return B.transpose(2, 3).reshape(-1, c_out)

    def rows_per_example(self, approx: str) -> int:
        """``T`` ("expand") or ``1`` ("reduce")."""
        return self.T if approx == "expand" else 1

    def input_factor(self, approx: str, scale: float, homogeneous: bool, dtype) -> Tensor:
        r""":math:`A = s \sum_{n,t} \bar u_{n,t} \bar u_{n,t}^\top` ("expand") or of the means.

        "expand" contracts the patches ``[N, K, T]`` per example with a batched
        product (no transposed copy of the patches).
        """
        U = self.unfolded().to(dtype)
        if approx == "reduce":
            return homogeneous_gram(U.mean(2), scale, homogeneous)
        A = torch.bmm(U, U.transpose(1, 2)).sum(0)
        if not homogeneous:
            return A.mul_(scale)
        return assemble_homogeneous(A, U.sum((0, 2)), U.shape[0] * U.shape[2], scale)

    def output_factor(self, block: Tensor, approx: str, scale: float, dtype) -> Tensor:
        r""":math:`s \sum_{v,n,t} g_{vnt} g_{vnt}^\top` ("expand"), or of the sums over ``t``."""
        B = block.reshape(-1, block.shape[2], self.T).to(dtype)
        if approx == "reduce":
            return gram(B.sum(2), scale)
        return torch.bmm(B, B.transpose(1, 2)).sum(0).mul_(scale)

    def weight_grad(self, g0: Tensor) -> Tensor:
        r""":math:`\sum_{n,t} g_{n,t} u_{n,t}^\top`, shaped like the weight (conv backward)."""
        m = self.module
        conv_weight = torch.nn.grad.conv1d_weight if self.one_d else torch.nn.grad.conv2d_weight
        return conv_weight(self.x, m.weight.shape, g0, m.stride, self.padding, m.dilation, 1)

    def bias_grad(self, g0: Tensor) -> Tensor:
        """Sum of ``g0`` over examples and locations."""
        return g0.flatten(2).sum((0, 2))

    def batch_grads(self, g0: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example weight ``[N, *weight.shape]`` and bias ``[N, C_out]`` gradients."""
        g = g0.reshape(self.N, g0.shape[1], -1)
        gw = torch.einsum("not,nkt->nok", g, self.unfolded())
        return gw.reshape(self.N, *self.module.weight.shape), g.sum(2)

    def diag(self, blocks: list[tuple[Tensor, float]]) -> tuple[Tensor, Tensor]:
        """Weighted sums of squared per-(row, example) gradients (explicit, chunked over rows).

        Args:
            blocks: ``(rows [k, N, C_out, *spatial], weight)`` pairs.

        Returns:
            Weight (shaped like the weight) and bias ``[C_out]`` diagonals.
        """
        U = self.unfolded()
        c_out, K = self.module.weight.shape[0], U.shape[1]
        dw = U.new_zeros(c_out, K)
        db = U.new_zeros(c_out)
        per_row = self.N * c_out * K
        for B, w in blocks:
            B = B.flatten(3)
            for chunk in B.split(max(1, _DIAG_CHUNK // per_row), dim=0):
                gw = torch.einsum("vnot,nkt->vnok", chunk, U)
                dw += w * gw.square().sum((0, 1))
                db += w * chunk.sum(3).square().sum((0, 1))
        return dw.reshape(self.module.weight.shape), db

    def jac_t(self, stack: Tensor) -> Tensor:
        """``[V, N, C_out, *out_spatial]`` -> ``[V, N, C_in, *in_spatial]`` (transposed conv)."""
        V, m = stack.shape[0], self.module
        flat = stack.reshape(V * self.N, *stack.shape[2:])
        in_shape = (V * self.N, *self.x.shape[1:])
        grad_input = torch.nn.grad.conv1d_input if self.one_d else torch.nn.grad.conv2d_input
        res = grad_input(in_shape, m.weight, flat, m.stride, self.padding, m.dilation, 1)
        return res.reshape(V, *self.x.shape)


#: Parametrised module type -> node class (exact type match).
PARAMETRISED: dict[type, type] = {
    nn.Linear: LinearNode,
    nn.Conv1d: ConvNode,
    nn.Conv2d: ConvNode,
}
