r"""Curvature of the loss with respect to the model output, one batch at a time.

The GGN, the Fisher (type-2 and Monte Carlo) and the empirical Fisher share the
form :math:`\sum_n J_n^\top \Lambda_n J_n` and differ only in the output-space
matrix :math:`\Lambda_n` (MATH.md, "Exact matrices"). This module builds
:math:`\Lambda` for one batch as a function acting on ``U`` of shape
``[k, *f.shape]`` (``k`` output-space columns), with the batch's share of the
data-set loss scaling already included.

Monte Carlo Fisher scaling (as in curvlinops). For ``reduction="mean"`` the
batch loss is :math:`c_b \sum_t \tilde\ell_t` over its *loss terms* :math:`t`:
examples for cross-entropy, output entries for ``MSELoss`` and
``BCEWithLogitsLoss`` (whose mean also divides by the output dimension ``C``);
:math:`\tilde\ell` is the negative log-likelihood (``MSELoss``:
:math:`(f-y)^2`, a Gaussian of variance :math:`1/2`). After the rescaling of
each batch to the data set, :math:`c = 1/N` (cross-entropy) or :math:`c = 1/(NC)`
(MSE, BCE); :math:`c = 1` for ``"sum"``. The MC Fisher is
:math:`c\sum_n J_n^\top \frac1M\sum_m \nabla\tilde\ell(f_n,\hat y_{nm})
\nabla\tilde\ell(f_n,\hat y_{nm})^\top J_n`; its expectation is the GGN.

Empirical Fisher scaling (MATH.md): :math:`R\sum_n \nabla\ell_n\nabla\ell_n^\top`
with :math:`\ell_n` the user's loss on example :math:`n` alone, so
:math:`L = R\sum_n \ell_n`. For ``MSELoss``/``BCEWithLogitsLoss`` with ``"mean"``
this :math:`\ell_n` includes the :math:`1/C` of the mean over outputs, and the
result is :math:`1/C` times curvlinops' ``EFLinearOperator`` (which uses
:math:`c\sum_n \nabla\tilde\ell_n\nabla\tilde\ell_n^\top`); the two agree
for cross-entropy and for ``"sum"``.
"""

from __future__ import annotations

from collections.abc import Callable
from math import sqrt

import torch
from torch import Tensor, nn

from curvkit.errors import ShapeError, UnsupportedLossError
from curvkit.extraction.losses import LIKELIHOOD_LOSSES, check_likelihood_options, sample_labels

OutputCurvature = Callable[[Tensor], Tensor]


def check_likelihood_loss(loss_func, what: str) -> None:
    """Raise unless ``loss_func`` is a negative log-likelihood the Fisher supports.

    The options are checked by :func:`curvkit.extraction.losses.check_likelihood_options`,
    the same check as the extraction's.

    Raises:
        UnsupportedLossError: Naming the loss and the supported ones.
    """
    supported = ", ".join(c.__name__ for c in LIKELIHOOD_LOSSES)
    if not isinstance(loss_func, LIKELIHOOD_LOSSES):
        raise UnsupportedLossError(
            f"{what} needs a likelihood loss; got {type(loss_func).__name__}. Supported: "
            f"{supported}. The GGN (curvkit.ggn) and Hessian (curvkit.hessian) accept any loss."
        )
    check_likelihood_options(loss_func, what)


def term_scale(loss_func, f: Tensor, scale: float) -> float:
    r"""The factor :math:`c` multiplying the sum of per-term negative log-likelihoods.

    Args:
        loss_func: A loss from :data:`LIKELIHOOD_LOSSES`.
        f: The batch's output.
        scale: The batch's rescaling to the data set (``N_b / N`` or 1).
    """
    if loss_func.reduction == "sum":
        return 1.0
    terms = f.shape[0] if isinstance(loss_func, nn.CrossEntropyLoss) else f.numel()
    return scale / terms


def _check_ce_output(f: Tensor, y: Tensor, what: str) -> None:
    if f.ndim != 2 or y.ndim != 1 or y.is_floating_point():
        raise ShapeError(
            f"{what}: CrossEntropyLoss needs logits [N, C] and class indices [N]; got output "
            f"{tuple(f.shape)} and target {tuple(y.shape)} ({y.dtype})."
        )


def _per_example(U: Tensor) -> Tensor:
    """``[k, N, ...]`` to ``[k, N, C]``."""
    return U.reshape(U.shape[0], U.shape[1], -1)


# -- GGN (= type-2 Fisher for the likelihood losses) ---------------------------------


def ggn_curvature(loss_func, f: Tensor, y: Tensor, scale: float) -> OutputCurvature:
    r""":math:`\Lambda = \nabla_f^2 (\text{scale}\cdot\text{loss\_func}(f, y))`.

    Closed forms for ``MSELoss`` (:math:`2c I`), ``CrossEntropyLoss``
    (:math:`c(\operatorname{diag} p - p p^\top)`, :math:`p = \operatorname{softmax} f`)
    and ``BCEWithLogitsLoss`` (:math:`c\,\sigma(f)(1-\sigma(f))`); any other loss
    (or option, e.g. class weights) uses autograd's Hessian-vector product of the
    loss with respect to the output.
    """
    f = f.detach()
    plain = (
        getattr(loss_func, "weight", None) is None
        and getattr(loss_func, "pos_weight", None) is None
    )
    if type(loss_func) is nn.MSELoss:
        c = term_scale(loss_func, f, scale)
        return lambda U: (2.0 * c) * U
    if type(loss_func) is nn.BCEWithLogitsLoss and plain:
        s = torch.sigmoid(f)
        d = term_scale(loss_func, f, scale) * s * (1 - s)
        return lambda U: d * U
    if (
        type(loss_func) is nn.CrossEntropyLoss
        and plain
        and loss_func.label_smoothing == 0
        and f.ndim == 2
        and y.ndim == 1
        and not y.is_floating_point()
    ):
        p = torch.softmax(f, dim=1)
        valid = (y != loss_func.ignore_index).to(f.dtype)
        # torch's mean averages over the examples whose label is not ignored
        w = valid * (scale / valid.sum()) if loss_func.reduction == "mean" else valid
        w = w.unsqueeze(1)
        return lambda U: w * (p * U - p * (p * U).sum(-1, keepdim=True))
    return _autograd_curvature(loss_func, f, y, scale)


def _autograd_curvature(loss_func, f: Tensor, y: Tensor, scale: float) -> OutputCurvature:
    f_leaf = f.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(scale * loss_func(f_leaf, y), f_leaf, create_graph=True)

    def apply(U: Tensor) -> Tensor:
        if not g.requires_grad:  # loss linear in the output
            return torch.zeros_like(U)
        cols = [
            torch.autograd.grad(g, f_leaf, U[j], retain_graph=True, materialize_grads=True)[0]
            for j in range(U.shape[0])
        ]
        return torch.stack(cols)

    return apply


# -- Monte Carlo Fisher ---------------------------------------------------------------


def sample_scores(
    loss_func, f: Tensor, y: Tensor, mc_samples: int, generator: torch.Generator
) -> Tensor:
    r"""``[M, *f.shape]``: scores :math:`\nabla_f\tilde\ell(f, \hat y_m)`, :math:`\hat y_m \sim p`.

    The draws consume ``generator`` in the same order and with the same calls
    as curvlinops' ``FisherMCLinearOperator`` (one stream per product, batches
    in order), so both give the same matrix for the same seed.

    - ``MSELoss``: :math:`\hat y \sim \mathcal N(f, \tfrac12 I)`, score :math:`2(f-\hat y)`.
    - ``CrossEntropyLoss``: :math:`\hat y \sim \operatorname{Cat}(\operatorname{softmax} f)`,
      score :math:`p - e_{\hat y}`.
    - ``BCEWithLogitsLoss``: :math:`\hat y \sim \operatorname{Bernoulli}(\sigma(f))`,
      score :math:`\sigma(f) - \hat y`.
    """
    f = f.detach()
    if isinstance(loss_func, nn.CrossEntropyLoss):
        _check_ce_output(f, y, "Monte Carlo Fisher")
    draws = sample_labels(loss_func, f, mc_samples, generator)  # the one owner of the draw
    if isinstance(loss_func, nn.MSELoss):
        std = torch.as_tensor(sqrt(0.5), device=f.device)
        return 2 * draws.mul_(std)  # 2 (f - y_hat), y_hat = f + std * eps
    if isinstance(loss_func, nn.CrossEntropyLoss):
        p = torch.softmax(f, dim=1)
        onehot = nn.functional.one_hot(draws, num_classes=f.shape[1]).to(f.dtype)
        return p.unsqueeze(0) - onehot
    return torch.sigmoid(f).unsqueeze(0) - draws


def factored_curvature(S: Tensor, c: float) -> OutputCurvature:
    r""":math:`\Lambda_n = \frac{c}{M} \sum_m s_{nm} s_{nm}^\top` for scores ``S`` [M, N, ...]."""
    M = S.shape[0]
    S2 = S.reshape(M, S.shape[1], -1)

    def apply(U: Tensor) -> Tensor:
        coeff = torch.einsum("mnc,knc->kmn", S2, _per_example(U))
        return (c / M) * torch.einsum("kmn,mnc->knc", coeff, S2).reshape(U.shape)

    return apply


def mc_fisher_curvature(
    loss_func, f: Tensor, y: Tensor, scale: float, mc_samples: int, generator: torch.Generator
) -> OutputCurvature:
    """Monte Carlo Fisher output curvature (draws from ``generator``)."""
    S = sample_scores(loss_func, f, y, mc_samples, generator)
    return factored_curvature(S, term_scale(loss_func, f, scale))


# -- empirical Fisher -----------------------------------------------------------------


def empirical_fisher_curvature(loss_func, f: Tensor, y: Tensor, scale: float) -> OutputCurvature:
    r""":math:`\Lambda_n = R\,\nabla_f\ell_n \nabla_f\ell_n^\top` at the true labels.

    The gradient of the rescaled batch loss with respect to example :math:`n`'s
    output is :math:`R\,\nabla_f \ell_n`, so :math:`\Lambda_n = g_n g_n^\top / R`
    for any loss that is a mean or sum of per-example terms.
    """
    f_leaf = f.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(scale * loss_func(f_leaf, y), f_leaf)
    R = scale / f.shape[0] if getattr(loss_func, "reduction", "mean") == "mean" else 1.0
    return factored_curvature((g / R).unsqueeze(0), R)
