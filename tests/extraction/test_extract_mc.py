"""Monte Carlo quantities: sampling distributions and convergence to the exact ones."""

import pytest
import torch

from curvkit.extraction import extract
from curvkit.extraction.losses import make_loss_handler
from tests.extraction.cases import LOSS_CASES
from tests.reference import assert_allclose_report, make_problem


def _loss_hessians(loss_func, out, y):
    return torch.stack(
        [
            torch.func.hessian(lambda f, yy=yn: loss_func(f[None], yy[None]))(fn)
            for fn, yn in zip(out, y)
        ]
    )


@pytest.mark.parametrize("loss,reduction,device", LOSS_CASES)
def test_sampled_sqrt_covariance_is_loss_hessian(loss, reduction, device):
    """E[sum_m s_m s_m^T] = Λ_n: the sampling distribution matches the loss (incl. its scaling)."""
    _, loss_func, _, y = make_problem("mlp", loss, reduction, device, n=3)
    out = torch.randn(3, 3, dtype=torch.float64, device=device, generator=None)
    handler = make_loss_handler(loss_func, out, y)
    gen = torch.Generator(device).manual_seed(1)
    M = 200_000
    S = handler.sqrt_hessian_sampled(M, gen)  # [M, N, C]
    estimate = torch.einsum("mnc,mnd->ncd", S, S)
    expected = _loss_hessians(loss_func, out, y)
    # Monte Carlo error of a sum of M i.i.d. terms / M: a few standard deviations.
    scale = expected.abs().max().item()
    assert_allclose_report(estimate, expected, 0, 8 * scale / M**0.5, "MC covariance")
    exact = handler.sqrt_hessian()
    assert_allclose_report(torch.einsum("cnk,cnj->nkj", exact, exact), expected, 1e-12, 1e-14)


@pytest.mark.parametrize("loss,reduction,device", LOSS_CASES)
def test_kfac_and_diag_ggn_mc_converge_to_exact(loss, reduction, device):
    net, loss_func, X, y = make_problem("deep_mlp", loss, reduction, device, n=4)
    exact = extract(net, loss_func, X, y, ("kflr", "diag_ggn", "cross"))
    errors = []
    for M in (20, 20_000):
        gen = torch.Generator(device).manual_seed(0)
        mc = extract(net, loss_func, X, y, ("kfac", "diag_ggn_mc", "cross"), M, generator=gen)
        assert mc.mc_samples == M
        err = 0.0
        for r, e in zip(mc, exact):
            assert_allclose_report(r.A, e.A, 1e-12, 1e-14, "A does not depend on sampling")
            for got, ref in [
                (r.G["kfac"], e.G["kflr"]),
                (r.diag_ggn_mc[0], e.diag_ggn[0]),
                (r.cross_G.get("kfac"), e.cross_G.get("kflr")),
            ]:
                if ref is not None:
                    err = max(err, ((got - ref).abs().max() / ref.abs().max()).item())
        errors.append(err)
    assert errors[1] < errors[0] / 5, errors
    assert errors[1] < 0.05, errors


def test_mc_is_reproducible_with_generator():
    net, loss_func, X, y = make_problem("mlp", "ce", "mean")
    a, b = (
        extract(net, loss_func, X, y, ("kfac",), 3, generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    )
    c = extract(net, loss_func, X, y, ("kfac",), 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0].G["kfac"], b[0].G["kfac"])
    assert not torch.equal(a[0].G["kfac"], c[0].G["kfac"])
