"""Every supported parameter-free module, in-place modules, dropout, and an untouched model."""

import pytest
import torch
from torch import nn

from curvkit.extraction import extract
from curvkit.extraction.modules import PARAMETER_FREE
from tests.extraction.cases import flat
from tests.reference import (
    assert_allclose_report,
    brute_force_factors,
    dense_ggn,
    dense_grad,
    dense_hessian,
    trainable_params,
)

ELEMENTWISE = [
    nn.Sigmoid(),
    nn.Tanh(),
    nn.ReLU(),
    nn.LeakyReLU(0.1),
    nn.ELU(),
    nn.SELU(),
    nn.CELU(0.7),
    nn.GELU(),
    nn.SiLU(),
    nn.Mish(),
    nn.Softplus(beta=2.0),
    nn.LogSigmoid(),
    nn.Softsign(),
    nn.Tanhshrink(),
    nn.Hardtanh(-0.5, 0.5),
    nn.ReLU6(),
    nn.Hardsigmoid(),
    nn.Hardswish(),
    nn.Identity(),
    nn.Dropout(0.3).eval(),
    nn.ReLU(inplace=True),
    nn.ELU(inplace=True),
]


def _mlp(act):
    return nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3))


def _cnn2d(mod, features):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), mod, nn.Flatten(), nn.Linear(features, 3))


def _cnn1d(mod, features):
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), mod, nn.Flatten(), nn.Linear(features, 3))


MODELS = [pytest.param(_mlp, a, (4,), id=f"mlp-{a!r}") for a in ELEMENTWISE] + [
    pytest.param(_cnn2d, (nn.MaxPool2d(2), 12), (2, 4, 4), id="maxpool2d"),
    pytest.param(
        _cnn2d, (nn.MaxPool2d(3, stride=1, padding=1), 48), (2, 4, 4), id="maxpool2d-overlap"
    ),
    pytest.param(_cnn2d, (nn.AvgPool2d(2), 12), (2, 4, 4), id="avgpool2d"),
    pytest.param(_cnn2d, (nn.AdaptiveAvgPool2d(3), 27), (2, 4, 4), id="adaptiveavgpool2d"),
    pytest.param(_cnn2d, (nn.ZeroPad2d((1, 0, 2, 1)), 3 * 7 * 5), (2, 4, 4), id="zeropad2d"),
    pytest.param(_cnn1d, (nn.MaxPool1d(2, stride=1), 15), (2, 6), id="maxpool1d"),
    pytest.param(_cnn1d, (nn.AvgPool1d(3, stride=2), 6), (2, 6), id="avgpool1d"),
    pytest.param(_cnn1d, (nn.AdaptiveAvgPool1d(4), 12), (2, 6), id="adaptiveavgpool1d"),
    pytest.param(_cnn1d, (nn.ZeroPad1d(2), 30), (2, 6), id="zeropad1d"),
    pytest.param(
        lambda *a: nn.Sequential(
            nn.Linear(4, 12),
            nn.Unflatten(1, (3, 4)),
            nn.Conv1d(3, 2, 2),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        (),
        (4,),
        id="unflatten",
    ),
]


def _dense_hessian(net, loss_func, X, y):
    """Dense Hessian; for Hardsigmoid (piecewise linear, so Hessian = GGN) the GGN, since
    torch cannot double-differentiate ``hardsigmoid_backward``."""
    if any(isinstance(m, nn.Hardsigmoid) for m in net):
        return dense_ggn(net, loss_func, X, y)
    return dense_hessian(net, loss_func, X, y)


@pytest.mark.parametrize("build,args,in_shape", MODELS)
def test_module_grad_kflr_diag_hessian(build, args, in_shape):
    torch.manual_seed(0)
    net = (build(*args) if isinstance(args, tuple) else build(args)).double()
    X = torch.randn(4, *in_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    loss_func = nn.CrossEntropyLoss()
    expected_grad = dense_grad(net, loss_func, X, y)
    hess = _dense_hessian(net, loss_func, X, y)
    bf = brute_force_factors(net, loss_func, X, y, "kflr")

    rec = extract(net, loss_func, X, y, ("kflr", "diag_hessian"))

    for p, g in zip(trainable_params(net), expected_grad):
        assert_allclose_report(p.grad, g, 1e-10, 1e-13, "grad")
    for r, b in zip(rec, bf):
        assert_allclose_report(r.G["kflr"], b["G"], 1e-10, 1e-13, "G")
        assert_allclose_report(r.A, b["A"], 1e-10, 1e-13, "A")
    diag = flat(d for r in rec for d in r.diag_hessian)
    assert_allclose_report(diag, hess.diagonal(), 1e-9, 1e-12, "diag_hessian")


def test_every_table_entry_is_covered():
    covered = {type(a) for a in ELEMENTWISE} | {
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.ZeroPad2d,
        nn.MaxPool1d,
        nn.AvgPool1d,
        nn.AdaptiveAvgPool1d,
        nn.ZeroPad1d,
        nn.Unflatten,
        nn.Flatten,
    }
    assert set(PARAMETER_FREE) <= covered


def test_train_mode_dropout_masks_are_consistent():
    """Rows backpropagated through dropout use the forward pass's mask."""
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    torch.manual_seed(7)
    loss_func(net(X), y).backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    rec = extract(net, loss_func, X, y, ("batch_grad", "diag_ggn", "kflr"))
    for p, g, bg in zip(net.parameters(), expected, [g for r in rec for g in r.batch_grad]):
        assert_allclose_report(p.grad, g, 1e-10, 1e-13, "grad with the same mask")
        assert_allclose_report(bg.sum(0), g, 1e-10, 1e-13, "batch_grad with the same mask")
    # the exact-sqrt rows went through the same mask: the dropped hidden units give
    # zero rows/columns of G in the first layer exactly where the gradient is zero
    dropped = rec[0].params[0].grad.abs().sum(1) == 0
    assert dropped.any()
    assert torch.all(rec[0].G["kflr"][dropped] == 0) and torch.all(rec[0].diag_ggn[0][dropped] == 0)


def _hook_state(model):
    state = []
    for m in model.modules():
        state.append(
            (
                sorted(vars(m)),
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
        )
    for p in model.parameters():
        state.append((sorted(vars(p)), p._backward_hooks))
    return state


def test_model_unchanged_and_usable_with_torch_func():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double()
    X, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    loss_func = nn.CrossEntropyLoss()
    before = _hook_state(net)
    params_before = {k: v.clone() for k, v in net.state_dict().items()}
    h_before = dense_hessian(net, loss_func, X, y)
    extract(
        net,
        loss_func,
        X,
        y,
        tuple(q for q in ("kfac", "kflr", "cross", "diag_hessian", "batch_grad")),
    )
    assert _hook_state(net) == before
    for k, v in net.state_dict().items():
        assert torch.equal(v, params_before[k])
    # torch.func transforms work on the very same model object
    h_after = dense_hessian(net, loss_func, X, y)
    assert_allclose_report(h_after, h_before, 1e-12, 1e-14, "Hessian after extract")
