r"""Curvature of the loss with respect to the model output, one batch at a time.

The GGN, the Fisher (type-2 and Monte Carlo) and the empirical Fisher share the
form :math:`\sum_n J_n^\top \Lambda_n J_n` and differ only in the output-space
matrix :math:`\Lambda_n` (docs/operators.md, "Conventions"). This module builds
:math:`\Lambda` for one batch as a function acting on ``U`` of shape
``[k, *f.shape]`` (``k`` output-space columns), with the batch's share of the
data-set loss scaling already included.

Outputs with extra dimensions: cross-entropy logits ``[N, C, d1, ...]`` with
targets ``[N, d1, ...]`` (PyTorch's K-dimensional layout) and MSE/BCE outputs
``[N, d1, ..., C]``; ``T = d1 ⋯`` positions per example (``T = 1`` for ``[N, C]``).

Monte Carlo Fisher scaling (as in curvlinops). For ``reduction="mean"`` the
batch loss is :math:`c_b \sum_t \tilde\ell_t` over its *loss terms* :math:`t`:
positions ``(n, t)`` for cross-entropy (those whose target is not
``ignore_index``), output entries for ``MSELoss`` and ``BCEWithLogitsLoss``
(whose mean also divides by ``C``); :math:`\tilde\ell` is the negative
log-likelihood (``MSELoss``: :math:`(f-y)^2`, a Gaussian of variance :math:`1/2`).
After the rescaling of each batch to the data set, :math:`c = 1/(NT)`
(cross-entropy) or :math:`c = 1/(NTC)` (MSE, BCE); :math:`c = 1` for ``"sum"``.
The MC Fisher is :math:`c\sum_{n,t} J_{nt}^\top \frac1M\sum_m
\nabla\tilde\ell(f_{nt},\hat y_{ntm}) \nabla\tilde\ell(f_{nt},\hat y_{ntm})^\top
J_{nt}` with labels drawn independently per position, one outer product per
position (curvlinops flattens the positions into the batch); its expectation is
the GGN.

Empirical Fisher scaling (docs/conventions.md): :math:`R\sum_n \nabla\ell_n\nabla\ell_n^\top`
with :math:`\ell_n` the user's loss on example :math:`n` alone, so
:math:`L = R\sum_n \ell_n`. For ``MSELoss``/``BCEWithLogitsLoss`` with ``"mean"``
this :math:`\ell_n` includes the :math:`1/C` of the mean over outputs, and the
result is :math:`1/C` times curvlinops' ``EFLinearOperator`` (which uses
:math:`c\sum_n \nabla\tilde\ell_n\nabla\tilde\ell_n^\top`); the two agree
for cross-entropy and for ``"sum"`` on ``[N, C]`` outputs. With extra dimensions
:math:`\ell_n` is the whole example's (sequence's) share of the loss, so the
gradients of its positions are summed before the outer product; curvlinops'
``EFLinearOperator`` instead takes one outer product per position.
"""

from __future__ import annotations

from collections.abc import Callable
from math import sqrt

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError, ShapeError, UnsupportedLossError
from curvkit.extraction.losses import (
    LIKELIHOOD_LOSSES,
    check_likelihood_options,
    output_layout,
    sample_labels,
)

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


def term_scale(loss_func, f: Tensor, scale: float, y: Tensor | None = None) -> float:
    r"""The factor :math:`c` multiplying the sum of per-term negative log-likelihoods.

    Args:
        loss_func: A loss from :data:`LIKELIHOOD_LOSSES`.
        f: The batch's output.
        scale: The batch's rescaling to the data set (``N_b / N`` or 1).
        y: Cross-entropy targets (positions equal to ``ignore_index`` are not terms).
    """
    if loss_func.reduction == "sum":
        return 1.0
    if isinstance(loss_func, nn.CrossEntropyLoss):
        terms = f.numel() // f.shape[1] if y is None else int(_valid(loss_func, y).sum())
    else:
        terms = f.numel()
    return scale / terms


def _valid(loss_func, y: Tensor) -> Tensor:
    return y != loss_func.ignore_index


def _is_class_index_target(f: Tensor, y: Tensor) -> bool:
    return (
        f.ndim >= 2
        and y.shape == (f.shape[0], *f.shape[2:])
        and not y.is_floating_point()
        and y.dtype != torch.bool
    )


def _check_ce_output(f: Tensor, y: Tensor, what: str) -> None:
    if not _is_class_index_target(f, y):
        raise ShapeError(
            f"{what}: CrossEntropyLoss needs logits [N, C] with class indices [N], or "
            f"[N, C, d1, ...] with class indices [N, d1, ...]; got output {tuple(f.shape)} "
            f"and target y of shape {tuple(y.shape)} ({y.dtype})."
        )


def _per_example(U: Tensor) -> Tensor:
    """``[k, N, ...]`` to ``[k, N, C]``."""
    return U.reshape(U.shape[0], U.shape[1], -1)


def _per_position(loss_func, f: Tensor):
    """``[k, *f.shape]`` <-> ``[k, N*T, C]`` (one row per position, curvlinops' order)."""
    ce = isinstance(loss_func, nn.CrossEntropyLoss)
    C = f.shape[1] if ce else f.shape[-1]

    def to_terms(U: Tensor) -> Tensor:
        return (U.movedim(2, -1) if ce else U).reshape(U.shape[0], -1, C)

    def back(Z: Tensor) -> Tensor:
        return output_layout(loss_func, Z.reshape(Z.shape[0], f.shape[0], -1, C), f.shape)

    return to_terms, back


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
        and _is_class_index_target(f, y)
    ):
        p = torch.softmax(f, dim=1)  # [N, C, d1, ...]
        valid = _valid(loss_func, y).to(f.dtype)
        # torch's mean averages over the positions whose label is not ignored
        w = valid * (scale / valid.sum()) if loss_func.reduction == "mean" else valid
        w = w.unsqueeze(1)
        return lambda U: w * (p * U - p * (p * U).sum(2, keepdim=True))
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
    - ``CrossEntropyLoss``: :math:`\hat y \sim \operatorname{Cat}(\operatorname{softmax} f)`
      per position, score :math:`p - e_{\hat y}` (zero where the target is
      ``ignore_index``: that position is no loss term).
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
        onehot = nn.functional.one_hot(draws, num_classes=f.shape[1]).to(f.dtype).movedim(-1, 2)
        return (p.unsqueeze(0) - onehot) * _valid(loss_func, y).unsqueeze(1).to(f.dtype)
    return torch.sigmoid(f).unsqueeze(0) - draws


def factored_curvature(S: Tensor, c: float, terms=None) -> OutputCurvature:
    r""":math:`\Lambda_n = \frac{c}{M} \sum_m s_{nm} s_{nm}^\top` for scores ``S`` [M, N, ...].

    The returned function also carries ``root``: the square-root factor's
    coefficients, so that a dense :math:`\sum_n J_n^\top\Lambda_n J_n` is one
    ``D x MP`` product with its transpose (``c >= 0``).

    Args:
        S: Scores ``[M, *f.shape]``.
        c: The scale.
        terms: ``(to_terms, back)`` mapping ``[k, *f.shape]`` to ``[k, P, C]`` loss
            terms and back (default: one term per example, all its entries).
    """
    M = S.shape[0]
    if terms is None:
        to_terms, back = _per_example, lambda Z, shape: Z.reshape(shape)
    else:
        to_terms, back = terms[0], lambda Z, shape: terms[1](Z)
    S2 = to_terms(S)

    def apply(U: Tensor) -> Tensor:
        coeff = torch.einsum("mnc,knc->kmn", S2, to_terms(U))
        return back((c / M) * torch.einsum("kmn,mnc->knc", coeff, S2), U.shape)

    def root(U: Tensor) -> Tensor:
        """``[k, M, P]`` with ``root(U1)·root(U2) = U1ᵀ Λ U2`` (summed over the last two)."""
        return sqrt(c / M) * torch.einsum("mnc,knc->kmn", S2, to_terms(U))

    apply.root = root  # Λ = R Rᵀ with M·P columns: dense forms from thin products
    return apply


def mc_fisher_curvature(
    loss_func, f: Tensor, y: Tensor, scale: float, mc_samples: int, generator: torch.Generator
) -> OutputCurvature:
    """Monte Carlo Fisher output curvature (draws from ``generator``)."""
    S = sample_scores(loss_func, f, y, mc_samples, generator)
    _check_terms(loss_func, y)
    c = term_scale(loss_func, f, scale, y)
    return factored_curvature(S, c, _per_position(loss_func, f))


def _check_terms(loss_func, y: Tensor) -> None:
    """Raise if a mean cross-entropy batch has no counted target (its loss is NaN)."""
    if (
        isinstance(loss_func, nn.CrossEntropyLoss)
        and loss_func.reduction == "mean"
        and not bool(_valid(loss_func, y).any())
    ):
        raise ConfigError(
            f"Monte Carlo Fisher: every target in y equals ignore_index={loss_func.ignore_index}, "
            "so CrossEntropyLoss(reduction='mean') of this batch is 0/0 (NaN)."
        )


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
