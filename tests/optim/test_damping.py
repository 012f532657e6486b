import math

import pytest
import torch

from curvkit.operators import kron_math as km
from curvkit.optim.damping import (
    kl_clip_factor,
    levenberg_marquardt,
    lm_omega,
    reduction_ratio,
    solve_alpha_mu,
)


@pytest.mark.parametrize(
    "rho, expected",
    [(0.9, "down"), (0.5, "same"), (0.1, "up"), (-3.0, "up"), (float("nan"), "up")],
    ids=["trusted", "neutral", "poor", "increase", "nan"],
)
def test_levenberg_marquardt_moves_damping_the_right_way(rho, expected):
    omega = lm_omega(5)
    assert math.isclose(omega, (19 / 20) ** 5)
    new = levenberg_marquardt(1.0, rho, omega)
    if expected == "down":
        assert math.isclose(new, omega)
    elif expected == "up":
        assert math.isclose(new, 1.0 / omega)
    else:
        assert new == 1.0


def test_levenberg_marquardt_clamps_and_rejects_bad_omega():
    assert levenberg_marquardt(1e-8, 0.9, 0.5, min_damping=1e-8) == 1e-8
    with pytest.raises(ValueError, match="omega"):
        levenberg_marquardt(1.0, 0.5, 1.5)


def test_reduction_ratio():
    assert reduction_ratio(0.5, 1.0, -0.5) == 1.0
    assert math.isnan(reduction_ratio(0.5, 1.0, 0.0))


def test_factored_pi_matches_formula():
    """The π of the damping rules lives in kron_math (one implementation)."""
    A = torch.diag(torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64))
    G = torch.diag(torch.tensor([2.0, 6.0], dtype=torch.float64))
    assert math.isclose(km.factored_pi(A, G), math.sqrt((9 / 3) / (8 / 2)))
    assert km.factored_pi(torch.zeros(2, 2), G) == 1.0


def _random_problem(seed, D=6):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(D, D, generator=gen, dtype=torch.float64)
    C = B @ B.T + 0.1 * torch.eye(D, dtype=torch.float64)
    g, Delta, prev = (torch.randn(D, generator=gen, dtype=torch.float64) for _ in range(3))
    return C, g, Delta, prev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_mu_minimise_dense_quadratic_model(seed):
    C, g, Delta, prev = _random_problem(seed)
    step = solve_alpha_mu(
        float(Delta @ C @ Delta),
        float(Delta @ C @ prev),
        float(prev @ C @ prev),
        float(g @ Delta),
        float(g @ prev),
        has_previous=True,
    )

    def M(a, m):
        d = a * Delta + m * prev
        return float(0.5 * d @ C @ d + g @ d)

    # independent reference: least squares on the 2-D subspace
    basis = torch.stack([Delta, prev], 1)
    coef = torch.linalg.solve(basis.T @ C @ basis, -basis.T @ g)
    assert math.isclose(step.alpha, float(coef[0]), rel_tol=1e-9)
    assert math.isclose(step.mu, float(coef[1]), rel_tol=1e-9)
    assert math.isclose(step.model_change, M(step.alpha, step.mu), rel_tol=1e-9)
    for da, dm in [(1e-3, 0), (0, 1e-3), (-1e-3, 1e-3)]:
        assert M(step.alpha + da, step.mu + dm) > step.model_change


def test_alpha_only_without_previous_update():
    C, g, Delta, _ = _random_problem(3)
    step = solve_alpha_mu(float(Delta @ C @ Delta), 0.0, 0.0, float(g @ Delta), 0.0, False)
    assert step.mu == 0.0
    assert math.isclose(step.alpha, float(-(g @ Delta) / (Delta @ C @ Delta)), rel_tol=1e-12)
    assert step.model_change <= 0


def test_alpha_mu_singular_falls_back_to_alpha():
    C, g, Delta, _ = _random_problem(4)
    # previous update collinear with Delta: singular 2x2 system
    dCd = float(Delta @ C @ Delta)
    step = solve_alpha_mu(dCd, 2 * dCd, 4 * dCd, float(g @ Delta), float(2 * g @ Delta), True)
    assert step.mu == 0.0 and math.isclose(step.alpha, float(-(g @ Delta) / dCd), rel_tol=1e-12)


def test_kl_clip_factor():
    assert kl_clip_factor(0.1, 1.0, 1.0) == 1.0
    assert math.isclose(kl_clip_factor(1.0, 4.0, 1e-2), math.sqrt(1e-2 / 4.0))
