r"""Loss functions seen from the model output: value, gradient, Hessian square roots.

Index conventions: ``n`` example (``N`` of them), ``t`` position of an output with
extra dimensions (``T`` of them), ``c``/``k`` output entries of one position
(``C`` of them), ``m`` Monte Carlo sample (``M`` of them).

Output layouts (those of PyTorch's losses, and of curvlinops):

- ``CrossEntropyLoss``: logits ``[N, C]`` with class indices ``[N]``, or the
  K-dimensional layout ``[N, C, d1, ..., dK]`` with targets ``[N, d1, ..., dK]``
  (``T = d1 ⋯ dK`` positions, e.g. a language model's ``[N, V, T]``);
- ``MSELoss`` and ``BCEWithLogitsLoss``: outputs ``[N, d1, ..., dK, C]`` with
  targets of the same shape (the last dimension holds the ``C`` entries of a
  position, ``T = d1 ⋯ dK``; ``T = 1`` for ``[N, C]``).

Internally every handler views the output as ``[N, T, C]``, position-major per
example (curvlinops' ``batch c ... -> (batch ...) c`` and ``batch ... c -> (batch
...) c``), and returns rows in the output's own layout ``[k, *output.shape]``.

The batch loss is :math:`L = R\sum_n \ell_n` with :math:`R = 1/N` ("mean") or
:math:`1` ("sum"), where :math:`\ell_n` is example ``n``'s share of the loss the
user wrote, :math:`\ell_n = \sum_t w_{nt}\,\tilde\ell_{nt}` with
:math:`\tilde\ell_{nt}` the negative log-likelihood of position ``t``:

- the position weight :math:`w_{nt} = 1/T_{\text{eff}}`, :math:`T_{\text{eff}} = T`
  ("mean", which PyTorch averages over the ``N T`` positions) or :math:`1` ("sum");
- for cross-entropy with targets equal to ``ignore_index``: :math:`w_{nt} = 0` at the
  ignored positions and, for "mean", :math:`w_{nt} = N / N_{\text{valid}}` at the
  others (PyTorch averages over the :math:`N_{\text{valid}}` counted positions);
- ``MSELoss`` and ``BCEWithLogitsLoss`` with "mean" also average over the ``C``
  entries: :math:`\tilde\ell_{nt}` carries :math:`1/C_{\text{eff}}`,
  :math:`C_{\text{eff}} = C` ("mean") or :math:`1` ("sum").

So the curvature of exactly the loss the user wrote is approximated, and the
per-example quantities (``batch_grad``, the empirical Fisher, the diagonals) are
per example ``n`` (a whole sequence), not per position.

Per batch, every handler provides (rows ``[k, *output.shape]``)

- the gradient of :math:`L` (the ``R`` included) w.r.t. the output — the true-label row;
- the *shared* square root: ``C`` rows, row ``c`` holding column ``c`` of
  :math:`\sqrt{w_{nt}}\,S_{nt}` at every position at once, with :math:`S_{nt}
  S_{nt}^\top = \nabla^2\tilde\ell_{nt}` (curvlinops' type-2 K-FAC backpropagates
  exactly these columns); exact for :math:`T = 1`;
- the *block* square root: ``T*C`` rows, row ``(t, c)`` holding that column at
  position ``t`` only; :math:`\Lambda_n = \nabla^2 \ell_n` is block diagonal over
  the positions, so these rows are an exact square root of it (what the GGN
  diagonal needs; ``T`` times the rows of the shared one);
- Monte Carlo rows: gradients of :math:`\ell_n` at labels sampled from the
  model's predictive distribution independently at every position, scaled by
  :math:`1/\sqrt M`, so that :math:`\mathbb E[\sum_m s_m s_m^\top] = \Lambda_n`
  (the cross terms of different positions vanish in expectation);
- the batch average :math:`\frac1N\sum_n\Lambda_n` (KFRA's starting matrix; ``T = 1`` only).

All three losses have a target-independent, positive semi-definite
:math:`\nabla^2\tilde\ell_{nt}` (Martens & Grosse 2015, §3; Botev et al. 2017, §2),
so the square roots are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.errors import ConfigError, NonFiniteError, ShapeError, UnsupportedLossError

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


def positions_last(loss_func: nn.Module, output: Tensor) -> Tensor:
    """The output as ``[N, T, C]`` (a view where possible; positions row-major).

    Cross-entropy's class dimension is dimension 1 (``[N, C, d1, ...]``); the other
    losses' is the last one (``[N, d1, ..., C]``).

    Raises:
        ShapeError: If the output has fewer than two dimensions.
    """
    if output.dim() < 2:
        raise ShapeError(
            f"The model output must be [N, C] or have extra dimensions for "
            f"{type(loss_func).__name__}, got shape {tuple(output.shape)}."
        )
    if isinstance(loss_func, nn.CrossEntropyLoss):
        output = output.movedim(1, -1)
    return output.reshape(output.shape[0], math.prod(output.shape[1:-1]), output.shape[-1])


def output_layout(loss_func: nn.Module, rows: Tensor, shape: torch.Size) -> Tensor:
    """Rows ``[k, N, T, C]`` back to the output's layout ``[k, *shape]``."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        N, C, *extra = shape
        return rows.reshape(rows.shape[0], N, *extra, C).movedim(-1, 2)
    return rows.reshape(rows.shape[0], *shape)


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
    curvlinops' ``FisherMCLinearOperator`` on the output flattened to ``[N*T, C]``)
    and give the same labels for the same seed.

    - ``MSELoss``: standard normal noise :math:`\varepsilon`, ``[M, *output.shape]``
      (the label is :math:`\hat y = f + \sigma\varepsilon`; each caller applies its
      :math:`\sigma`);
    - ``CrossEntropyLoss``: class indices ``[M, N, d1, ...]`` (targets' layout) from
      :math:`\operatorname{Cat}(\operatorname{softmax} f_{nt})`, independent over
      the positions;
    - ``BCEWithLogitsLoss``: labels in :math:`\{0, 1\}`, ``[M, *output.shape]``, from
      :math:`\mathrm{Bern}(\sigma(f))`.

    Args:
        loss_func: A loss from :data:`LIKELIHOOD_LOSSES`.
        output: Model output (``[N, C, d1, ...]`` for cross-entropy), detached.
        mc_samples: Labels per position ``M``.
        generator: Random generator.
        probs: ``softmax`` over the classes as ``[N, T, C]`` (cross-entropy) or
            ``sigmoid(output)`` (BCE) if the caller has it already.

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
        p = positions_last(loss_func, output).softmax(dim=-1) if probs is None else probs
        flat = p.reshape(-1, p.shape[-1])  # [N*T, C], curvlinops' order
        labels = torch.multinomial(flat, mc_samples, replacement=True, generator=generator).T
        return labels.reshape(mc_samples, output.shape[0], *output.shape[2:])
    p = output.sigmoid() if probs is None else probs
    return torch.bernoulli(p[None].expand(mc_samples, *p.shape), generator=generator)


class LossHandler:
    """Base class: one loss function evaluated at one batch.

    Args:
        loss_func: The user's loss module.
        output: Model output (detached), ``[N, C]`` or with extra dimensions
            (see the module docstring for the layouts).
        y: Targets.

    Attributes:
        R: Reduction factor ``1/N`` or ``1``.
        N: Batch size (examples).
        T: Positions per example (``1`` for ``[N, C]``).
        C: Output entries per position (classes for cross-entropy).
        f: The output as ``[N, T, C]``.
    """

    def __init__(self, loss_func: nn.Module, output: Tensor, y: Tensor):
        self.loss_func = loss_func
        self.output = output
        self.y = y
        self.f = positions_last(loss_func, output)
        self.N, self.T, self.C = self.f.shape
        if self.N == 0:
            raise ShapeError(f"The batch is empty: {type(loss_func).__name__} got 0 examples.")
        if self.C == 0:
            raise ShapeError(f"{type(loss_func).__name__}: the output has no entries per position.")
        self.mean = loss_func.reduction == "mean"
        self.R = 1.0 / self.N if self.mean else 1.0

    def _elementwise_targets(self, name: str) -> None:
        """Check targets shaped like the output; set ``c_eff`` and ``w`` (position weight)."""
        if self.y.shape != self.output.shape:
            raise ShapeError(
                f"{name} needs targets shaped like the output {tuple(self.output.shape)}, "
                f"got y of shape {tuple(self.y.shape)}."
            )
        self.c_eff = self.C if self.mean else 1
        self.w = 1.0 / self.T if self.mean else 1.0

    def _layout(self, rows: Tensor) -> Tensor:
        """``[k, N, T, C]`` -> ``[k, *output.shape]``."""
        return output_layout(self.loss_func, rows, self.output.shape)

    def value(self) -> Tensor:
        """The loss the user wrote, detached."""
        return self.loss_func(self.output, self.y).detach()

    def grad(self) -> Tensor:
        """Gradient of the batch loss w.r.t. the output, ``output.shape`` (includes ``R``)."""
        raise NotImplementedError

    def _shared_sqrt(self) -> Tensor:
        r"""``[C, N, T, C]``: column ``c`` of :math:`\sqrt{w_{nt}} S_{nt}` at every ``(n, t)``."""
        raise NotImplementedError

    def sqrt_hessian(self) -> Tensor:
        r"""Shared square root: ``[C, *output.shape]``, column ``c`` at every position.

        Exact square root of :math:`\Lambda_n` for ``T = 1``; for ``T > 1`` the rows
        curvlinops' type-2 K-FAC backpropagates (see the module docstring).
        """
        return self._layout(self._shared_sqrt())

    def sqrt_hessian_blocks(self) -> Tensor:
        r"""Exact square root of the block-diagonal :math:`\Lambda_n`: ``[T*C, *output.shape]``.

        Row ``t*C + c`` is column ``c`` of :math:`\sqrt{w_{nt}} S_{nt}` at position
        ``t`` and zero at the other positions. Equal to :meth:`sqrt_hessian` for ``T = 1``.
        """
        S = self._shared_sqrt()
        if self.T == 1:
            return self._layout(S)
        eye = torch.eye(self.T, dtype=S.dtype, device=S.device)
        blocks = torch.einsum("cntk,ts->tcnsk", S, eye)
        return self._layout(blocks.reshape(self.T * self.C, self.N, self.T, self.C))

    def sqrt_hessian_sampled(self, mc_samples: int, generator: torch.Generator | None) -> Tensor:
        r"""Monte Carlo rows ``[M, *output.shape]``: sampled gradients over :math:`\sqrt M`."""
        raise NotImplementedError

    def hessian_mean(self) -> Tensor:
        r""":math:`\frac1N\sum_n \Lambda_n`, ``[C, C]`` (outputs ``[N, C]`` only).

        Raises:
            ShapeError: For outputs with extra dimensions.
        """
        if self.T != 1:
            raise ShapeError(
                "KFRA's output-space matrix needs a model output [N, C]; got "
                f"{tuple(self.output.shape)} with {self.T} positions per example."
            )
        return self._hessian_mean()

    def _hessian_mean(self) -> Tensor:
        raise NotImplementedError


class MSELossHandler(LossHandler):
    r"""``MSELoss``: :math:`\tilde\ell_{nt} = \lVert f_{nt} - y_{nt}\rVert^2 / C_{\text{eff}}`.

    :math:`\nabla^2\tilde\ell_{nt} = \frac{2}{C_{\text{eff}}} I`. Monte Carlo labels are
    Gaussian, :math:`\hat y \sim \mathcal N(f_{nt}, \frac{C_{\text{eff}}}{2w} I)`, the
    distribution whose sampled gradients :math:`\frac{2w}{C_{\text{eff}}}(f_{nt} - \hat y)`
    have covariance :math:`w\nabla^2\tilde\ell_{nt}` (PyTorch's ``MSELoss`` has no
    :math:`\frac12`).
    """

    def __init__(self, loss_func, output, y):
        super().__init__(loss_func, output, y)
        self._elementwise_targets("MSELoss")

    def grad(self) -> Tensor:
        """See :meth:`LossHandler.grad`."""
        return (self.output - self.y) * (2.0 * self.R * self.w / self.c_eff)

    def _shared_sqrt(self) -> Tensor:
        eye = torch.eye(self.C, dtype=self.output.dtype, device=self.output.device)
        eye = eye * math.sqrt(2.0 * self.w / self.c_eff)
        return eye[:, None, None, :].expand(-1, self.N, self.T, -1)

    def sqrt_hessian_sampled(self, mc_samples, generator):
        """See :meth:`LossHandler.sqrt_hessian_sampled`."""
        eps = sample_labels(self.loss_func, self.output, mc_samples, generator)
        # f - y_hat = -sqrt(C_eff / (2 w)) eps, formed without the cancellation
        return eps.mul_(-math.sqrt(2.0 * self.w / self.c_eff / mc_samples))

    def _hessian_mean(self):
        eye = torch.eye(self.C, dtype=self.output.dtype, device=self.output.device)
        return eye * (2.0 / self.c_eff)


class CrossEntropyLossHandler(LossHandler):
    r"""``CrossEntropyLoss``, class-index targets: :math:`\tilde\ell_{nt} = -\log p_{nt,y_{nt}}`.

    :math:`\nabla^2\tilde\ell_{nt} = \operatorname{diag}(p_{nt}) - p_{nt} p_{nt}^\top` with
    :math:`p_{nt} = \operatorname{softmax}(f_{nt})`; its square root
    :math:`S_{nt} = \operatorname{diag}(\sqrt{p_{nt}}) - p_{nt} \sqrt{p_{nt}}^\top` (uses
    :math:`\sum_c p_{nt,c} = 1`). Monte Carlo labels are categorical,
    :math:`\hat y \sim \operatorname{Cat}(p_{nt})`, gradients :math:`p_{nt} - e_{\hat y}`.
    Targets equal to ``ignore_index`` get weight zero (see the module docstring).
    """

    def __init__(self, loss_func, output, y):
        super().__init__(loss_func, output, y)
        expected = (self.N, *output.shape[2:])
        if y.shape != expected or y.is_floating_point() or y.dtype == torch.bool:
            raise UnsupportedLossError(
                "CrossEntropyLoss is supported with class-index targets: logits [N, C] with "
                "targets [N], or logits [N, C, d1, ...] with targets [N, d1, ...]; for logits "
                f"{tuple(output.shape)} the targets y must be an integer tensor of shape "
                f"{expected}, got shape {tuple(y.shape)} and dtype {y.dtype}."
            )
        labels = y.reshape(self.N, self.T)
        valid = labels != loss_func.ignore_index
        if bool(((labels[valid] < 0) | (labels[valid] >= self.C)).any()):
            raise ConfigError(
                f"CrossEntropyLoss targets y must be class indices in [0, {self.C}) or "
                f"ignore_index={loss_func.ignore_index}; got values "
                f"{sorted(set(labels[valid].tolist()) - set(range(self.C)))[:5]}."
            )
        n_valid = int(valid.sum())
        if self.mean and n_valid == 0:
            raise ConfigError(
                f"CrossEntropyLoss(reduction='mean'): every target in y equals ignore_index="
                f"{loss_func.ignore_index}, so the loss is 0/0 (NaN)."
            )
        self.labels = labels.masked_fill(~valid, 0)
        w = valid.to(output.dtype)
        self.w = w * (self.N / n_valid) if self.mean else w  # [N, T]
        self.probs = self.f.softmax(dim=-1)  # [N, T, C]

    def grad(self) -> Tensor:
        """See :meth:`LossHandler.grad`."""
        onehot = F.one_hot(self.labels, self.C).to(self.probs.dtype)
        g = (self.probs - onehot).mul_((self.R * self.w)[..., None])
        return self._layout(g[None])[0]

    def _shared_sqrt(self) -> Tensor:
        # S[c, n, t, k] = sqrt(w_nt p_ntc) (delta_kc - p_ntk)
        p = self.probs
        sqrt_wp = (p * self.w[..., None]).sqrt()
        eye = torch.eye(self.C, dtype=p.dtype, device=p.device)
        return sqrt_wp.permute(2, 0, 1)[..., None] * (eye[:, None, None, :] - p[None])

    def sqrt_hessian_sampled(self, mc_samples, generator):
        """See :meth:`LossHandler.sqrt_hessian_sampled`."""
        labels = sample_labels(self.loss_func, self.output, mc_samples, generator, self.probs)
        onehot = F.one_hot(labels.reshape(mc_samples, self.N, self.T), self.C)
        rows = (self.probs[None] - onehot.to(self.probs.dtype)) * (
            self.w[None, :, :, None] / mc_samples
        ).sqrt()
        return self._layout(rows)

    def _hessian_mean(self):
        p, w = self.probs[:, 0], self.w[:, :1]
        return (torch.diag((w * p).sum(0)) - (w * p).T @ p) / self.N


class BCEWithLogitsLossHandler(LossHandler):
    r"""``BCEWithLogitsLoss``: :math:`\tilde\ell_{nt} = \sum_c \mathrm{bce}_{ntc} / C_{\text{eff}}`.

    :math:`\nabla^2\tilde\ell_{nt} = \operatorname{diag}(\sigma_{nt}(1 - \sigma_{nt})) /
    C_{\text{eff}}`. Monte Carlo labels are Bernoulli, :math:`\hat y \sim
    \mathrm{Bern}(\sigma_{nt})`; the gradient :math:`(\sigma_{nt} - \hat y)/C_{\text{eff}}`
    is rescaled by :math:`\sqrt{C_{\text{eff}}}` so that its covariance is
    :math:`\nabla^2\tilde\ell_{nt}` (as curvlinops does for "mean").
    """

    def __init__(self, loss_func, output, y):
        super().__init__(loss_func, output, y)
        self._elementwise_targets("BCEWithLogitsLoss")
        self.sig = output.sigmoid()

    def grad(self) -> Tensor:
        """See :meth:`LossHandler.grad`."""
        return (self.sig - self.y) * (self.R * self.w / self.c_eff)

    def _shared_sqrt(self) -> Tensor:
        s = self.sig.reshape(self.N, self.T, self.C)
        d = (s * (1.0 - s) * (self.w / self.c_eff)).sqrt()  # [N, T, C]
        eye = torch.eye(self.C, dtype=d.dtype, device=d.device)
        return eye[:, None, None, :] * d[None]

    def sqrt_hessian_sampled(self, mc_samples, generator):
        """See :meth:`LossHandler.sqrt_hessian_sampled`."""
        y_hat = sample_labels(self.loss_func, self.output, mc_samples, generator, self.sig)
        return (self.sig[None] - y_hat) * math.sqrt(self.w / (self.c_eff * mc_samples))

    def _hessian_mean(self):
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
    return handler


def make_loss_handler(loss_func: nn.Module, output: Tensor, y: Tensor) -> LossHandler:
    """Handler for ``loss_func`` at ``(output, y)``.

    Args:
        loss_func: The user's loss module.
        output: Model output: ``[N, C]``, or with extra dimensions (``[N, C, d1, ...]``
            for cross-entropy, ``[N, d1, ..., C]`` otherwise).
        y: Targets.

    Returns:
        The loss handler.

    Raises:
        UnsupportedLossError: See :func:`check_loss`; also for cross-entropy targets
            that are not class indices of the right shape.
        ConfigError: For class indices out of range, or every target ignored with "mean".
        ShapeError: If the output has fewer than two dimensions or the targets do
            not fit it.
    """
    handler = check_loss(loss_func)
    return handler(loss_func, output, y)
