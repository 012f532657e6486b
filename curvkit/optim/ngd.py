r"""Exact natural-gradient descent: the reference K-FAC approximates.

Each step solves :math:`(F + \lambda I)\,\delta = \nabla L` with the exact Fisher
(the GGN for MSE / cross-entropy / BCE, M&G §3) of the current batch, by a dense
solve for small models or by conjugate gradients with Fisher-vector products,
and moves :math:`\theta \leftarrow \theta - \eta\,\delta` (with optional momentum).
Works for any differentiable model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError
from curvkit.optim.capture import capture_batch, preserved_buffers
from curvkit.optim.config import check_number
from curvkit.optim.preconditioner import all_finite

SOLVERS = ("cg", "dense")
CURVATURES = ("ggn", "empirical")


class NaturalGradient(torch.optim.Optimizer):
    r"""Damped natural gradient with the exact Fisher of each batch.

    Args:
        model: Any differentiable model.
        loss_func: Loss module with ``reduction`` ``"mean"`` or ``"sum"``.
        params: Parameters (default: the model's trainable ones); one group.
        lr: Step size :math:`\eta`.
        damping: Tikhonov damping :math:`\lambda > 0`.
        momentum: Heavy-ball momentum on the natural-gradient direction.
        solver: ``"cg"`` (matrix-free) or ``"dense"`` (``eigh`` of the dense Fisher).
        curvature: ``"ggn"`` (exact type-2 Fisher) or ``"empirical"`` (empirical Fisher).
        cg_tol: Relative tolerance of CG.
        cg_maxiter: Iteration limit of CG.

    Attributes:
        last_info: Solver information of the last step (CG iterations and residuals).

    Raises:
        ConfigError: For an unknown solver or curvature, a ``lr``, ``damping`` or
            ``momentum`` out of range (NaN, infinite, negative), a parameter listed
            twice, or more than one parameter group.

    Example:
        >>> import torch, curvkit as ck
        >>> _ = torch.manual_seed(0)
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> loss_func = nn.CrossEntropyLoss()
        >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> opt = ck.optim.NaturalGradient(model, loss_func, lr=0.5, damping=1e-2)
        >>> first = float(opt.step(lambda: loss_func(model(X), y)))
        >>> last = [float(opt.step(lambda: loss_func(model(X), y))) for _ in range(5)][-1]
        >>> last < first
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        params=None,
        *,
        lr: float = 1.0,
        damping: float = 1e-3,
        momentum: float = 0.0,
        solver: str = "cg",
        curvature: str = "ggn",
        cg_tol: float = 1e-6,
        cg_maxiter: int = 250,
    ):
        if solver not in SOLVERS:
            raise ConfigError(
                f"NaturalGradient: solver={solver!r} is not supported; use {SOLVERS}."
            )
        if curvature not in CURVATURES:
            raise ConfigError(
                f"NaturalGradient: curvature={curvature!r} is not supported; use {CURVATURES}."
            )
        check_number("NaturalGradient", "lr", lr)
        check_number("NaturalGradient", "damping", damping)
        check_number("NaturalGradient", "momentum", momentum, positive=False)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        params = list(params)
        if len({id(p) for p in params}) != len(params):
            raise ConfigError(
                "NaturalGradient: a parameter is listed twice; list each parameter once (a "
                "weight tied between modules is one parameter)."
            )
        super().__init__(params, dict(lr=lr, damping=damping, momentum=momentum))
        if len(self.param_groups) != 1:
            raise ConfigError("NaturalGradient: one parameter group (the Fisher couples them all).")
        self.model, self.loss_func = model, loss_func
        self.solver, self.curvature = solver, curvature
        self.cg_tol, self.cg_maxiter = cg_tol, cg_maxiter
        self.last_info = None

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One natural-gradient step; ``closure`` runs the forward pass and returns the loss.

        The model's buffers (BatchNorm running statistics) move once per step, by the
        closure's forward pass; a batch whose loss, gradient or direction is not finite
        leaves the parameters, the momentum buffer and the buffers as they were.
        """
        from curvkit.operators.exact import empirical_fisher, ggn, loss_and_gradient

        group = self.param_groups[0]
        params = group["params"]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        X, y = capture_batch(self.model, self.loss_func, closure)
        with preserved_buffers(self.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is in training mode.*")
            loss, grad = loss_and_gradient(self.model, self.loss_func, (X, y), params)
            finite = all_finite([loss, grad])
            if finite:
                build = ggn if self.curvature == "ggn" else empirical_fisher
                F = build(self.model, self.loss_func, (X, y), params=params)
                if self.solver == "dense":
                    inv = F.inverse(damping=group["damping"], method="dense")
                else:
                    inv = F.inverse(
                        damping=group["damping"], tol=self.cg_tol, maxiter=self.cg_maxiter
                    )
                direction = inv @ grad
                self.last_info = getattr(inv, "info", None)
                finite = all_finite([direction])
        if not finite:
            with torch.no_grad():
                for b, value in buffers:
                    b.copy_(value)
            return loss
        if group["momentum"]:
            buf = self.state["ngd"].get("momentum_buffer")
            buf = direction if buf is None else buf.mul(group["momentum"]).add_(direction)
            self.state["ngd"]["momentum_buffer"] = buf
            direction = buf
        with torch.no_grad():
            offset = 0
            for p in params:
                n = p.numel()
                p.add_(direction[offset : offset + n].view_as(p), alpha=-group["lr"])
                offset += n
        return loss
