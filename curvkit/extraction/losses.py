r"""Loss functions seen from the model output: value, gradient, Hessian square roots.

Index conventions: ``n`` batch, ``c``/``k`` output entries (``C`` of them), ``m``
Monte Carlo sample (``M`` of them). The model output ``f`` is ``[N, C]``.

The batch loss is :math:`L = R\sum_n \ell_n` with :math:`R = 1/N` ("mean") or
:math:`1` ("sum"), where :math:`\ell_n` is the user's loss on the single example
``n``. ``MSELoss`` and ``BCEWithLogitsLoss`` with ``"mean"`` also average over
the ``C`` output entries, so their :math:`\ell_n` carry a factor
:math:`1/C_{\text{eff}}` with :math:`C_{\text{eff}} = C` ("mean") or :math:`1`
("sum"); the curvature of exactly the loss the user wrote is approximated.

Per example, every handler provides

- the gradient of :math:`L` (the ``R`` included) w.r.t. ``f`` — the true-label row;
- an exact square root :math:`S_n` (``[C, C]``, columns first) of the unreduced loss
  Hessian :math:`\Lambda_n = \nabla_f^2 \ell_n = S_n S_n^\top`;
- Monte Carlo columns: gradients of :math:`\ell_n` at labels sampled from the
  model's predictive distribution, scaled by :math:`1/\sqrt M` so that
  :math:`\mathbb E[\sum_m s_m s_m^\top] = \Lambda_n`;
- the batch average :math:`\frac1N\sum_n\Lambda_n` (KFRA's starting matrix).

All three losses have a target-independent, positive semi-definite :math:`\Lambda_n`
(Martens & Grosse 2015, §3; Botev et al. 2017, §2), so the square roots are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import ShapeError, UnsupportedLossError

_SUPPORTED = "MSELoss, CrossEntropyLoss (class-index targets), BCEWithLogitsLoss"


class LossHandler:
    """Base class: one loss function evaluated at one batch.

    Args:
        loss_func: The user's loss module.
        output: Model output ``[N, C]`` (detached).
        y: Targets.

    Attributes:
        R: Reduction factor ``1/N`` or ``1``.
        N: Batch size.
        C: Output dimension.
    """

    def __init__(self, loss_func: nn.Module, output: Tensor, y: Tensor):
        self.loss_func = loss_func
        self.output = output
        self.y = y
        self.N, self.C = output.shape
        self.R = 1.0 / self.N if loss_func.reduction == "mean" else 1.0

    def _elementwise_targets(self, name: str) -> None:
        """Check targets shaped like the output; set ``c_eff`` (``C`` for "mean", else 1)."""
        if self.y.shape != self.output.shape:
            raise ShapeError(
                f"{name} needs targets shaped like the output {tuple(self.output.shape)}, "
                f"got {tuple(self.y.shape)}."
            )
        self.c_eff = self.C if self.loss_func.reduction == "mean" else 1

    def value(self) -> Tensor:
        """The loss the user wrote, detached."""
        return self.loss_func(self.output, self.y).detach()

    def grad(self) -> Tensor:
        """Gradient of the batch loss w.r.t. the output, ``[N, C]`` (includes ``R``)."""
        raise NotImplementedError

    def sqrt_hessian(self) -> Tensor:
        r"""Exact square root of :math:`\Lambda_n`: ``[C, N, C]``, column ``c`` first."""
        raise NotImplementedError

    def sqrt_hessian_sampled(self, mc_samples: int, generator: torch.Generator | None) -> Tensor:
        r"""Monte Carlo square root ``[M, N, C]``: sampled-label gradients over :math:`\sqrt M`."""
        raise NotImplementedError

    def hessian_mean(self) -> Tensor:
        r""":math:`\frac1N\sum_n \Lambda_n`, ``[C, C]``."""
        raise NotImplementedError


class MSELossHandler(LossHandler):
    r"""``MSELoss``: :math:`\ell_n = \frac{1}{C_{\text{eff}}}\lVert f_n - y_n\rVert^2`.

    :math:`\Lambda_n = \frac{2}{C_{\text{eff}}} I`. Monte Carlo labels are Gaussian,
    :math:`\hat y \sim \mathcal N(f_n, \frac{C_{\text{eff}}}{2} I)`, the distribution
    whose sampled gradients :math:`\frac{2}{C_{\text{eff}}}(f_n - \hat y)` have
    covariance :math:`\Lambda_n` (PyTorch's ``MSELoss`` has no :math:`\frac12`).
    """

    def __init__(self, loss_func, output, y):
        super().__init__(loss_func, output, y)
        self._elementwise_targets("MSELoss")

    def grad(self) -> Tensor:
        """See :meth:`LossHandler.grad`."""
        return (self.output - self.y) * (2.0 * self.R / self.c_eff)

    def sqrt_hessian(self) -> Tensor:
        """See :meth:`LossHandler.sqrt_hessian`."""
        eye = torch.eye(self.C, dtype=self.output.dtype, device=self.output.device)
        return (eye * math.sqrt(2.0 / self.c_eff))[:, None, :].expand(-1, self.N, -1)

    def sqrt_hessian_sampled(self, mc_samples, generator):
        """See :meth:`LossHandler.sqrt_hessian_sampled`."""
        shape = (mc_samples, *self.output.shape)
        eps = torch.randn(
            shape, generator=generator, dtype=self.output.dtype, device=self.output.device
        )
        # f - y_hat = -sqrt(C_eff / 2) eps, formed without the cancellation
        return eps.mul_(-math.sqrt(2.0 / self.c_eff / mc_samples))

    def hessian_mean(self):
        """See :meth:`LossHandler.hessian_mean`."""
        eye = torch.eye(self.C, dtype=self.output.dtype, device=self.output.device)
        return eye * (2.0 / self.c_eff)


class CrossEntropyLossHandler(LossHandler):
    r"""``CrossEntropyLoss`` with class-index targets: :math:`\ell_n = -\log p_{n,y_n}`.

    :math:`\Lambda_n = \operatorname{diag}(p_n) - p_n p_n^\top` with
    :math:`p_n = \operatorname{softmax}(f_n)`; its square root
    :math:`S_n = \operatorname{diag}(\sqrt{p_n}) - p_n \sqrt{p_n}^\top` (uses
    :math:`\sum_c p_{n,c} = 1`). Monte Carlo labels are categorical,
    :math:`\hat y \sim \operatorname{Cat}(p_n)`, gradients :math:`p_n - e_{\hat y}`.
    """

    def __init__(self, loss_func, output, y):
        super().__init__(loss_func, output, y)
        if y.dim() != 1 or y.shape[0] != self.N or y.is_floating_point():
            raise UnsupportedLossError(
                "CrossEntropyLoss is supported with 2-D logits [N, C] and class-index "
                f"targets [N] only; got targets of shape {tuple(y.shape)} and dtype {y.dtype}."
            )
        if bool(((y < 0) | (y >= self.C)).any()):
            raise UnsupportedLossError(
                "CrossEntropyLoss targets must be class indices in [0, C); ignored "
                "targets (ignore_index) are not supported."
            )
        self.probs = output.softmax(dim=1)

    def grad(self) -> Tensor:
        """See :meth:`LossHandler.grad`."""
        onehot = F.one_hot(self.y, self.C).to(self.probs.dtype)
        return (self.probs - onehot).mul_(self.R)

    def sqrt_hessian(self) -> Tensor:
        """See :meth:`LossHandler.sqrt_hessian`."""
        # S[c, n, k] = sqrt(p_nc) (delta_kc - p_nk)
        sqrt_p = self.probs.sqrt()
        eye = torch.eye(self.C, dtype=self.probs.dtype, device=self.probs.device)
        return sqrt_p.T[:, :, None] * (eye[:, None, :] - self.probs[None])

    def sqrt_hessian_sampled(self, mc_samples, generator):
        """See :meth:`LossHandler.sqrt_hessian_sampled`."""
        labels = torch.multinomial(self.probs, mc_samples, replacement=True, generator=generator)
        onehot = F.one_hot(labels.T, self.C).to(self.probs.dtype)  # [M, N, C]
        return (self.probs[None] - onehot) / math.sqrt(mc_samples)

    def hessian_mean(self):
        """See :meth:`LossHandler.hessian_mean`."""
        p = self.probs
        return (torch.diag(p.sum(0)) - p.T @ p) / self.N


class BCEWithLogitsLossHandler(LossHandler):
    r"""``BCEWithLogitsLoss``: :math:`\ell_n = \frac{1}{C_{\text{eff}}}\sum_c \mathrm{bce}_{nc}`.

    :math:`\Lambda_n = \operatorname{diag}(\sigma_n(1 - \sigma_n)) / C_{\text{eff}}`.
    Monte Carlo labels are Bernoulli, :math:`\hat y \sim \mathrm{Bern}(\sigma_n)`;
    the gradient :math:`(\sigma_n - \hat y)/C_{\text{eff}}` is rescaled by
    :math:`\sqrt{C_{\text{eff}}}` so that its covariance is :math:`\Lambda_n` (as
    curvlinops does for "mean").
    """

    def __init__(self, loss_func, output, y):
        super().__init__(loss_func, output, y)
        self._elementwise_targets("BCEWithLogitsLoss")
        self.sig = output.sigmoid()

    def grad(self) -> Tensor:
        """See :meth:`LossHandler.grad`."""
        return (self.sig - self.y) * (self.R / self.c_eff)

    def sqrt_hessian(self) -> Tensor:
        """See :meth:`LossHandler.sqrt_hessian`."""
        d = (self.sig * (1.0 - self.sig) / self.c_eff).sqrt()  # [N, C]
        eye = torch.eye(self.C, dtype=d.dtype, device=d.device)
        return eye[:, None, :] * d[None]

    def sqrt_hessian_sampled(self, mc_samples, generator):
        """See :meth:`LossHandler.sqrt_hessian_sampled`."""
        probs = self.sig[None].expand(mc_samples, -1, -1)
        y_hat = torch.bernoulli(probs, generator=generator)
        return (self.sig[None] - y_hat) / math.sqrt(self.c_eff * mc_samples)

    def hessian_mean(self):
        """See :meth:`LossHandler.hessian_mean`."""
        return torch.diag((self.sig * (1.0 - self.sig)).mean(0) / self.c_eff)


#: Loss type -> handler (exact type match).
LOSS_HANDLERS: dict[type, type[LossHandler]] = {
    nn.MSELoss: MSELossHandler,
    nn.CrossEntropyLoss: CrossEntropyLossHandler,
    nn.BCEWithLogitsLoss: BCEWithLogitsLossHandler,
}


def check_loss(loss_func: nn.Module) -> type[LossHandler]:
    """Validate the loss module and return its handler class.

    Raises:
        UnsupportedLossError: For an unsupported loss type, reduction or option.
    """
    handler = LOSS_HANDLERS.get(type(loss_func))
    if handler is None:
        raise UnsupportedLossError(
            f"Loss {type(loss_func).__name__} is not supported; supported: {_SUPPORTED}."
        )
    name = type(loss_func).__name__
    if loss_func.reduction not in ("mean", "sum"):
        raise UnsupportedLossError(
            f"{name}(reduction={loss_func.reduction!r}) is not supported; use 'mean' or 'sum'."
        )
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if loss_func.weight is not None:
            raise UnsupportedLossError("CrossEntropyLoss with class weights is not supported.")
        if loss_func.label_smoothing != 0.0:
            raise UnsupportedLossError("CrossEntropyLoss with label_smoothing is not supported.")
        if loss_func.ignore_index != -100:
            raise UnsupportedLossError(
                "CrossEntropyLoss with a custom ignore_index is not supported."
            )
    if isinstance(loss_func, nn.BCEWithLogitsLoss) and (
        loss_func.weight is not None or loss_func.pos_weight is not None
    ):
        raise UnsupportedLossError("BCEWithLogitsLoss with weight or pos_weight is not supported.")
    return handler


def make_loss_handler(loss_func: nn.Module, output: Tensor, y: Tensor) -> LossHandler:
    """Handler for ``loss_func`` at ``(output, y)``.

    Args:
        loss_func: The user's loss module.
        output: Model output; must be ``[N, C]``.
        y: Targets.

    Returns:
        The loss handler.

    Raises:
        UnsupportedLossError: See :func:`check_loss`.
        ShapeError: If the output is not 2-D or the targets do not fit it.
    """
    handler = check_loss(loss_func)
    if output.dim() != 2:
        raise ShapeError(
            f"The model output must be 2-D [N, C] for {type(loss_func).__name__}, "
            f"got shape {tuple(output.shape)}."
        )
    return handler(loss_func, output, y)
