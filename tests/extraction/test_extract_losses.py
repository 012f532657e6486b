"""Loss handlers against autograd and BackPACK's loss derivatives."""

import pytest
import torch
from backpack import extend
from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
from backpack.core.derivatives.crossentropyloss import CrossEntropyLossDerivatives
from backpack.core.derivatives.mseloss import MSELossDerivatives

from curvkit.extraction.losses import make_loss_handler
from tests.extraction.cases import LOSS_CASES
from tests.reference import assert_allclose_report, make_problem

BACKPACK_DERIVATIVES = {
    "mse": MSELossDerivatives,
    "ce": CrossEntropyLossDerivatives,
    "bce": BCELossWithLogitsDerivatives,
}


def _output(loss, device, C=3):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(6, C, dtype=torch.float64, generator=gen).to(device)


@pytest.mark.parametrize("loss,reduction,device", LOSS_CASES)
def test_value_grad_hessian_against_autograd(loss, reduction, device):
    _, loss_func, _, y = make_problem("mlp", loss, reduction, device)
    f = _output(loss, device)
    h = make_loss_handler(loss_func, f, y)
    assert_allclose_report(h.value(), loss_func(f, y), 1e-13, 1e-15, "value")
    expected_grad = torch.func.grad(lambda t: loss_func(t, y))(f)
    assert_allclose_report(h.grad(), expected_grad, 1e-12, 1e-15, "grad")
    # exact square root: sum_c S S^T = Hessian of the unreduced per-example loss
    S = h.sqrt_hessian()
    lam = torch.stack(
        [
            torch.func.hessian(lambda t, yy=yn: loss_func(t[None], yy[None]))(fn)
            for fn, yn in zip(f, y)
        ]
    )
    assert_allclose_report(torch.einsum("cnk,cnj->nkj", S, S), lam, 1e-12, 1e-15, "sqrt")
    assert_allclose_report(h.hessian_mean(), lam.mean(0), 1e-12, 1e-15, "mean Hessian")


@pytest.mark.parametrize("loss,reduction,device", LOSS_CASES)
def test_sqrt_hessian_matches_backpack(loss, reduction, device):
    """BackPACK's ``sqrt_hessian`` includes sqrt(R); ours is of the unreduced loss."""
    C = 1 if loss == "bce" else 3  # BackPACK's BCE derivatives need [N, 1]
    _, loss_func, _, y = make_problem("mlp", loss, reduction, device, d_out=C)
    f = _output(loss, device, C)
    bp_loss = extend(loss_func)
    bp_loss(f, y)  # stores input0/input1 on the module
    expected = BACKPACK_DERIVATIVES[loss]().sqrt_hessian(bp_loss, None, None)
    h = make_loss_handler(loss_func, f, y)
    assert_allclose_report(h.sqrt_hessian() * h.R**0.5, expected, 1e-12, 1e-15)
