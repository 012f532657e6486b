r"""Damping and step-size rules of Martens & Grosse (2015), as pure functions.

Nothing here holds state: the optimiser passes its state in and stores what
comes out, so each rule can be tested on constructed numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def lm_omega(T1: int, base: float = 19.0 / 20.0) -> float:
    r"""Levenberg–Marquardt factor :math:`\omega_1 = (19/20)^{T_1}` (M&G §6.5)."""
    return base**T1


def levenberg_marquardt(
    damping: float, rho: float, omega: float, min_damping: float = 1e-8, max_damping: float = 1e8
) -> float:
    r"""M&G §6.5 rule: shrink :math:`\lambda` when the quadratic model is trusted.

    :math:`\rho > 3/4 \Rightarrow \lambda \leftarrow \omega_1 \lambda`,
    :math:`\rho < 1/4 \Rightarrow \lambda \leftarrow \lambda / \omega_1`, otherwise unchanged.
    A non-finite :math:`\rho` counts as a failed model (damping raised).

    Args:
        damping: Current :math:`\lambda`.
        rho: Reduction ratio :math:`\rho = (L(\theta+\delta) - L(\theta)) / (M(\delta) - M(0))`.
        omega: :math:`\omega_1 \in (0, 1)`.
        min_damping: Lower clamp.
        max_damping: Upper clamp.
    """
    if not 0.0 < omega < 1.0:
        raise ValueError(f"levenberg_marquardt: omega must lie in (0, 1), got {omega}.")
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / omega
    elif rho > 0.75:
        damping = damping * omega
    return float(min(max(damping, min_damping), max_damping))


def reduction_ratio(loss_new: float, loss_old: float, model_change: float) -> float:
    r""":math:`\rho = (L(\theta+\delta) - L(\theta)) / (M(\delta) - M(0))`.

    ``model_change`` is :math:`M(\delta) - M(0) = M(\delta)` (negative for a
    descent step). Returns ``nan`` where the ratio is undefined.
    """
    if model_change == 0.0 or not math.isfinite(model_change):
        return float("nan")
    return (loss_new - loss_old) / model_change


@dataclass
class QuadraticStep:
    r"""Solution of M&G §7's 2x2 problem for :math:`\delta = \alpha\Delta + \mu\delta_0`.

    Attributes:
        alpha: Coefficient of the proposal :math:`\Delta`.
        mu: Coefficient of the previous update :math:`\delta_0` (0 on the first step).
        model_change: :math:`M(\delta) - M(0)` at the optimum (≤ 0 when the system is PD).
    """

    alpha: float
    mu: float
    model_change: float


def solve_alpha_mu(
    dCd: float, dCp: float, pCp: float, gd: float, gp: float, has_previous: bool
) -> QuadraticStep:
    r"""Minimise the quadratic model over the step coefficients :math:`(\alpha, \mu)`.

    :math:`M(\delta) = \tfrac12 \delta^\top C \delta + g^\top\delta`.

    With :math:`\delta = \alpha\Delta + \mu\delta_0` and :math:`C = F + (\lambda + \eta) I`
    (M&G §7, eq. for the re-scaling and momentum), the minimiser solves

    .. math::
        \begin{bmatrix} \Delta^\top C \Delta & \Delta^\top C \delta_0 \\
                        \delta_0^\top C \Delta & \delta_0^\top C \delta_0 \end{bmatrix}
        \begin{bmatrix} \alpha \\ \mu \end{bmatrix}
        = -\begin{bmatrix} g^\top \Delta \\ g^\top \delta_0 \end{bmatrix},

    and :math:`M(\delta^*) = \tfrac12 [\alpha, \mu] \cdot [g^\top\Delta, g^\top\delta_0]`.
    Without a previous update (or when the 2x2 system is singular) only
    :math:`\alpha = -g^\top\Delta / \Delta^\top C\Delta` is used.

    Args:
        dCd: :math:`\Delta^\top C \Delta`.
        dCp: :math:`\Delta^\top C \delta_0`.
        pCp: :math:`\delta_0^\top C \delta_0`.
        gd: :math:`g^\top \Delta`.
        gp: :math:`g^\top \delta_0`.
        has_previous: Whether :math:`\delta_0` exists.
    """
    if has_previous:
        det = dCd * pCp - dCp * dCp
        scale = abs(dCd * pCp) + 1e-300
        if det / scale > 1e-10 and math.isfinite(det):
            alpha = (-gd * pCp + gp * dCp) / det
            mu = (-gp * dCd + gd * dCp) / det
            return QuadraticStep(alpha, mu, 0.5 * (alpha * gd + mu * gp))
    if dCd <= 0 or not math.isfinite(dCd):
        return QuadraticStep(0.0, 0.0, 0.0)
    alpha = -gd / dCd
    return QuadraticStep(alpha, 0.0, 0.5 * alpha * gd)


def kl_clip_factor(lr: float, precond_dot_grad: float, kl_clip: float) -> float:
    r"""KL-clipping factor :math:`\nu = \min(1, \sqrt{\kappa / (\eta^2 \sum_l \Delta_l^\top g_l)})`.

    Ba, Grosse & Martens (2017), distributed K-FAC; ``precond_dot_grad`` is
    :math:`|\Delta^\top g|` with :math:`\Delta = \hat F^{-1} g`.
    """
    denom = lr * lr * abs(precond_dot_grad)
    if denom <= 0 or not math.isfinite(denom):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / denom))
