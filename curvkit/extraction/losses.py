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

from curvkit.errors import NonFiniteError, ShapeError, UnsupportedLossError

_SUPPORTED = "MSELoss, CrossEntropyLoss (class-index targets), BCEWithLogitsLoss"

#: Losses that are negative log-likelihoods of a distribution over the target.
LIKELIHOOD_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


def check_likelihood_options(loss_func: nn.Module, what: str) -> None:
    """Raise unless ``loss_func``'s options keep it a negative log-likelihood.

    Class weights, ``pos_weight`` and label smoothing change the loss into one that
    is no longer the likelihood the Monte Carlo labels are drawn from.

    Args:
        loss_func: A loss from :data:`LIKELIHOOD_LOSSES`.
        what: The computation, for the message.

    Raises:
        UnsupportedLossError: Naming the loss and the option.
    """
    name = type(loss_func).__name__
    if (
        getattr(loss_func, "weight", None) is not None
        or getattr(loss_func, "pos_weight", None) is not None
    ):
        raise UnsupportedLossError(
            f"{what}: {name} with class weights (weight / pos_weight) is not a likelihood; "
            "use weight=None and pos_weight=None (or curvkit.ggn for the weighted loss)."
        )
    if isinstance(loss_func, nn.CrossEntropyLoss) and loss_func.label_smoothing != 0:
        raise UnsupportedLossError(
            f"{what}: {name} with label_smoothing={loss_func.label_smoothing} is not a "
            "likelihood; use label_smoothing=0 (or curvkit.ggn for the smoothed loss)."
        )


def sample_labels(
    loss_func: nn.Module,
    output: Tensor,
    mc_samples: int,
    generator: torch.Generator | None,
    probs: Tensor | None = None,
) -> Tensor:
    r"""Labels drawn from the model's predictive distribution (the one owner of this draw).

    The extraction's Monte Carlo factors and the Monte Carlo Fisher operator both
    draw here, so they consume ``generator`` with the same calls (those of
    curvlinops' ``FisherMCLinearOperator``) and give the same labels for the same seed.

    - ``MSELoss``: standard normal noise :math:`arepsilon`, ``[M, *output.shape]``
      (the label is :math:`\hat y = f + \sigmaarepsilon`; each caller applies its
      :math:`\sigma`);
    - ``CrossEntropyLoss``: class indices ``[M, N]`` from
      :math:`\operatorname{Cat}(\operatorname{softmax} f_n)`;
    - ``BCEWithLogitsLoss``: labels in :math:`\{0, 1\}`, ``[M, *output.shape]``, from
      :math:`\mathrm{Bern}(\sigma(f))`.

    Args:
        loss_func: A loss from :data:`LIKELIHOOD_LOSSES`.
        output: Model output (``[N, C]`` for cross-entropy), detached.
        mc_samples: Labels per example ``M``.
        generator: Random generator.
        probs: ``softmax(output, 1)`` (cross-entropy) or ``sigmoid(output)`` (BCE)
            if the caller has it already.

    Returns:
        The draws described above.

    Raises:
        NonFiniteError: If ``output`` has NaN or infinite entries (there is no
            distribution to sample from); the generator is left untouched.
    """
    if not bool(torch.isfinite(output).all()):
        raise NonFiniteError(
            f"Monte Carlo labels for {type(loss_func).__name__}: the model output has NaN or "
            "infinite entries, so its predictive distribution is undefined."
        )
    if isinstance(loss_func, nn.MSELoss):
        shape = (mc_samples, *output.shape)
        return torch.randn(shape, generator=generator, dtype=output.dtype, device=output.device)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        p = output.softmax(dim=1) if probs is None else probs
        return torch.multinomial(p, mc_samples, replacement=True, generator=generator).T
    p = output.sigmoid() if probs is None else probs
    return torch.bernoulli(p[None].expand(mc_samples, *p.shape), generator=generator)


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
        if self.N == 0:
            raise ShapeError(f"The batch is empty: {type(loss_func).__name__} got 0 examples.")
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
        eps = sample_labels(self.loss_func, self.output, mc_samples, generator)
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
        labels = sample_labels(self.loss_func, self.output, mc_samples, generator, self.probs)
        onehot = F.one_hot(labels, self.C).to(self.probs.dtype)  # [M, N, C]
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
        y_hat = sample_labels(self.loss_func, self.output, mc_samples, generator, self.sig)
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
    check_likelihood_options(loss_func, "extract")
    if isinstance(loss_func, nn.CrossEntropyLoss) and loss_func.ignore_index != -100:
        raise UnsupportedLossError("CrossEntropyLoss with a custom ignore_index is not supported.")
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
