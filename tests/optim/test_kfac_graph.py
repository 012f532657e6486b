"""ck.optim.KFAC on models the graph path extracts (residual blocks, transformers)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ConfigError
from tests.extraction.graph_models import problem
from tests.operators.test_graph_kfac import make
from tests.reference import assert_allclose_report

DT = torch.float64


def _steps(opt, model, loss_func, X, y, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tri-diagonal fallback pairs
        return [float(opt.step(lambda: loss_func(model(X), y))) for _ in range(n)]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(structure="tridiagonal"),
        dict(ekfac=True),
        dict(kind="kflr", damping_mode="exact"),
    ],
    ids=["block-diagonal", "tridiagonal", "ekfac", "kflr-exact"],
)
@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_kfac_reduces_the_loss(name, options):
    """The automatic step (M&G §7, exact quadratic model) on a ResNet block and a tiny GPT."""
    model, loss_func, X, y = problem(name, "ce", n=16)
    if name == "resnet" and not options.get("ekfac"):  # EKFAC: per-example gradients
        model.train()  # batch statistics (kfac rows are defined; examples interact)
    opt = ck.optim.KFAC(model, loss_func, fallback=None, T_inv=2, **options)
    losses = _steps(opt, model, loss_func, X, y, 12)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not [e for e in opt.events if e["event"] == "rejected"]
    blocks = {layer.block for layer in opt.preconditioner.layers}
    assert "dense" in blocks and (name == "resnet" or "embedding" in blocks)


def _direction(opt_kwargs, model, loss_func, X, y):
    """``-Δθ`` of one step with lr = 1 (no momentum): the preconditioned gradient."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = ck.optim.KFAC(model, loss_func, fallback=None, lr=1.0, **opt_kwargs)
    _steps(opt, model, loss_func, X, y, 1)
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])


def _flat_grad(model, loss_func, X, y, params):
    model.zero_grad()
    loss_func(model(X), y).backward()
    g = torch.cat([p.grad.flatten() for p in params])
    model.zero_grad()
    return g


def _to_model_order(model, reference, op_params, v):
    """A vector over ``reference``'s ``op_params``, in ``model.parameters()`` order."""
    names = {id(p): n for n, p in reference.named_parameters()}
    pieces = {names[id(p)]: x for p, x in zip(op_params, v.split([p.numel() for p in op_params]))}
    return torch.cat([pieces[n] for n, _ in model.named_parameters()])


@pytest.mark.parametrize(
    "structure,ekfac", [("block-diagonal", False), ("tridiagonal", False), ("block-diagonal", True)]
)
@pytest.mark.parametrize("name", ["resnet", "gpt", "transposed"])
def test_direction_is_a_damped_solve_with_the_operator(name, structure, ekfac):
    """First step, lr = 1: Δθ = -(K + λI)⁻¹ g with K from ck.kfac / ck.ekfac (float64)."""
    model, loss_func, X, y = make(name, n=6)
    if name == "resnet" and not ekfac:
        model.train()
    lam = 1e-2
    reference = copy.deepcopy(model)
    rec = ck.extract(reference, loss_func, X, y, ("kflr",))
    params = rec.params
    g = _flat_grad(reference, loss_func, X, y, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ekfac:
            op = ck.ekfac(reference, loss_func, (X, y), kind="kflr")
            solve = op.inverse(lam) @ g
        elif structure == "tridiagonal":
            op = ck.kfac(reference, loss_func, (X, y), kind="kflr", structure=structure)
            solve = op.inverse(lam) @ g
        else:
            op = ck.kfac(reference, loss_func, (X, y), kind="kflr")
            D = op.to_dense()
            solve = torch.linalg.solve(D + lam * torch.eye(D.shape[0], dtype=DT), g)
    kwargs = dict(kind="kflr", damping=lam, structure=structure, ekfac=ekfac)
    if structure == "block-diagonal" and not ekfac:
        kwargs["damping_mode"] = "exact"
    got = _direction(kwargs, model, loss_func, X, y)
    expected = _to_model_order(model, reference, list(params), solve)
    assert_allclose_report(got, expected, rtol=1e-8, atol=1e-11)


def test_batchnorm_in_train_mode_refuses_per_example_statistics_at_construction():
    model, loss_func, X, y = problem("resnet", "ce", n=8)
    model.train()
    state = copy.deepcopy(model.state_dict())
    for options in (dict(ekfac=True), dict(kind="empirical")):
        with pytest.raises(ck.UnsupportedModuleError, match="BatchNorm2d 'bn0'.*per-example"):
            ck.optim.KFAC(model, loss_func, **options)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.eval()  # eval-mode BatchNorm is an affine map: per-example gradients exist
    opt = ck.optim.KFAC(model, loss_func, ekfac=True, fallback=None)
    losses = _steps(opt, model, loss_func, X, y, 3)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


def test_unsupported_module_named_at_construction_and_fallback_way_out():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x):
            return x * self.s

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.block = nn.ModuleDict({"scale": Scale()})
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.block["scale"](self.inp(x))))

    torch.manual_seed(0)
    model = Net().to(DT)
    with pytest.raises(ck.UnsupportedModuleError, match="Scale 'block.scale'.*fallback='adam'"):
        ck.optim.KFAC(model, nn.CrossEntropyLoss(), fallback=None)
    X, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    loss_func = nn.CrossEntropyLoss()
    opt = ck.optim.KFAC(model, loss_func, fallback="sgd", fallback_lr=0.1)
    before = model.block["scale"].s.detach().clone()
    with pytest.warns(UserWarning, match="no Kronecker factors for Scale 'block.scale'"):
        opt.step(lambda: loss_func(model(X), y))
    assert not torch.equal(before, model.block["scale"].s)


def test_dict_input_and_statistics_of_a_subset():
    model, loss_func, X, y = problem("dict", "ce", n=16)
    opt = ck.optim.KFAC(model, loss_func, fallback=None, lr=0.1)
    losses = _steps(opt, model, loss_func, X, y, 6)
    assert losses[-1] < losses[0]
    auto = ck.optim.KFAC(model, loss_func, fallback=None)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(auto.state_dict())
    with pytest.raises(ck.ConfigError, match="automatic step.*tensor model input.*dict"):
        auto.step(lambda: loss_func(model(X), y))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert auto.state["kfac"]["step"] == 0
    # the refused step changed no optimiser state (factor averages included)
    after = auto.state_dict()
    assert torch.utils._pytree.tree_structure(after) == torch.utils._pytree.tree_structure(state)
    for a, b in zip(torch.utils._pytree.tree_leaves(after), torch.utils._pytree.tree_leaves(state)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b or (a != a and b != b), (a, b)  # NaN (no rho yet) equals NaN
    # a sequence output [N*T, C]: the statistics subset takes the rows of its examples
    model, loss_func, X, y = problem("gpt", "ce", n=16)
    opt = ck.optim.KFAC(model, loss_func, fallback=None, stats_fraction=0.5)
    losses = _steps(opt, model, loss_func, X, y, 8)
    assert losses[-1] < 0.8 * losses[0]


def test_ekfac_correction_kind_names_the_non_linear_layers():
    model, loss_func, _, _ = problem("gpt", "ce", n=4)
    with pytest.raises(
        ck.ShapeError, match="Linear layers only.*Embedding .tok., Embedding .pos., LayerNorm .ln1."
    ):
        ck.optim.KFAC(model, loss_func, ekfac=True, ekfac_correction="kind")


@pytest.mark.parametrize("name", ["gpt", "transposed"])
def test_kfac_approx_reduce_direction_is_a_damped_solve(name):
    """kfac_approx='reduce' reaches the extraction: Δθ = -(K_reduce + λI)⁻¹ g, and differs
    from the expand direction (weights shared over locations)."""
    model, loss_func, X, y = make(name, n=6)
    lam = 1e-2
    reference = copy.deepcopy(model)
    rec = ck.extract(reference, loss_func, X, y, ("kflr",))
    params = rec.params
    g = _flat_grad(reference, loss_func, X, y, params)
    directions = {}
    for approx in ("expand", "reduce"):
        op = ck.kfac(reference, loss_func, (X, y), kind="kflr", kfac_approx=approx)
        D = op.to_dense()
        solve = torch.linalg.solve(D + lam * torch.eye(D.shape[0], dtype=DT), g)
        kwargs = dict(kind="kflr", damping=lam, damping_mode="exact", kfac_approx=approx)
        got = _direction(kwargs, copy.deepcopy(model), loss_func, X, y)
        assert_allclose_report(
            got, _to_model_order(model, reference, list(params), solve), rtol=1e-8, atol=1e-11
        )
        directions[approx] = got
    assert not torch.allclose(directions["expand"], directions["reduce"], rtol=1e-3)


def test_kfac_approx_is_checked():
    model, loss_func, _, _ = make("gpt", n=2)
    with pytest.raises(ConfigError, match="kfac_approx"):
        ck.optim.KFAC(model, loss_func, kfac_approx="mean")
