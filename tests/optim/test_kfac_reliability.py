"""K-FAC under bad data and bad calls: rejected steps and failing calls change nothing."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ShapeError, UnsupportedModuleError

DT = torch.float64


def _mlp(seed=0, batchnorm=False, dtype=DT):
    torch.manual_seed(seed)
    mods = [nn.Linear(4, 6)]
    if batchnorm:
        mods.append(nn.BatchNorm1d(6))
    mods += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*mods).to(dtype)


def _batch(loss, N=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 4, generator=gen, dtype=DT)
    if loss == "ce":
        return nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=gen)
    if loss == "bce":
        return nn.BCEWithLogitsLoss(), X, torch.rand(N, 3, generator=gen, dtype=DT).round()
    return nn.MSELoss(), X, torch.randn(N, 3, generator=gen, dtype=DT)


def _assert_same(a, b, path="state"):
    """Bit-exact equality of nested state (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), path
        assert torch.equal(a.isnan(), b.isnan()), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def _snapshot(opt, model):
    return (
        copy.deepcopy(opt.state_dict()),
        [p.detach().clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
    )


def _assert_unchanged(before, opt, model):
    state, params, buffers = before
    _assert_same(state, opt.state_dict())
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    for b, c in zip(buffers, model.buffers()):
        assert torch.equal(b, c)


# -- NaN / Inf data ----------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "bce", "mse"])
@pytest.mark.parametrize("lr", [None, 0.1])
def test_nan_batch_is_rejected_not_a_crash(loss, lr):
    """Default kind='kfac' samples labels: a NaN output must give the documented rejection."""
    loss_func, X, y = _batch(loss)
    model = _mlp()
    opt = ck.optim.KFAC(model, loss_func, lr=lr, momentum=0.9 if lr else 0.0)
    for _ in range(2):
        opt.step(lambda: loss_func(model(X), y))
    state, params, _ = _snapshot(opt, model)
    bad = X.clone()
    bad[3, 1] = float("nan")
    out = opt.step(lambda: loss_func(model(bad), y))
    assert not torch.isfinite(out)
    assert opt.events[-1]["event"] == "rejected" and opt.events[-1]["step"] == 3
    assert "non-finite" in opt.events[-1]["reason"]
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    after = opt.state_dict()
    # what a rejection changes by design: λ raised (γ with it), the step counted,
    # the momentum of the automatic step (previous update) dropped, the inverse rebuilt
    assert after["state"]["kfac"]["damping"] > state["state"]["kfac"]["damping"]
    assert after["state"]["kfac"]["step"] == 3
    for key in ("A", "G", "bias_scale", "updates"):
        _assert_same(state["preconditioner"][key], after["preconditioner"][key], key)
    assert torch.equal(state["generator"], after["generator"])
    for k, v in state["state"].items():
        if k != "kfac":
            _assert_same(v, after["state"][k], f"state[{k}]")
    opt.step(lambda: loss_func(model(X), y))  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_batch_leaves_batchnorm_statistics_and_fallback_state():
    loss_func, X, y = _batch("ce")
    model = _mlp(batchnorm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ck.optim.KFAC(model, loss_func)
        opt.step(lambda: loss_func(model(X), y))
        before = _snapshot(opt, model)
        bad = X.clone()
        bad[0, 0] = float("inf")
        opt.step(lambda: loss_func(model(bad), y))
    assert opt.events[-1]["event"] == "rejected"
    state, _, buffers = before
    for b, c in zip(buffers, model.buffers()):
        assert torch.equal(b, c)  # no NaN in the running statistics
    after = opt.state_dict()["state"]
    assert any(k != "kfac" for k in state["state"])  # the fallback (Adam) has state
    for k, v in state["state"].items():
        if k != "kfac":
            _assert_same(v, after[k], f"state[{k}]")


@pytest.mark.parametrize("lr", [None, 0.1])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(ekfac=True), dict(structure="tridiagonal")],
    ids=["block", "ekfac", "tri"],
)
def test_rejected_update_does_not_fold_factors_or_momentum(lr, options):
    """A step rejected after the statistics pass keeps the averages and buffers as they were."""
    loss_func, X, y = _batch("ce")
    model = _mlp()
    opt = ck.optim.KFAC(
        model, loss_func, lr=lr, momentum=0.9 if lr else 0.0, kind="kflr", T_inv=1, **options
    )
    for _ in range(2):
        opt.step(lambda: loss_func(model(X), y))
    state, params, _ = _snapshot(opt, model)
    broken = opt.preconditioner.apply
    opt.preconditioner.apply = lambda g: torch.full_like(broken(g), float("nan"))
    opt.step(lambda: loss_func(model(1.5 * X), y))  # new factors that must not stay
    del opt.preconditioner.apply
    assert opt.events[-1]["reason"] == "non-finite update"
    after = opt.state_dict()
    keys = ("A", "G", "cross_A", "cross_G", "bias_scale", "updates", "bases", "S", "scale_updates")
    for key in keys:
        _assert_same(state["preconditioner"][key], after["preconditioner"][key], key)
    for k, v in state["state"].items():
        if k != "kfac":
            _assert_same(v, after["state"][k], f"state[{k}]")
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)


# -- BatchNorm statistics ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(), dict(T1=1), dict(T2=1), dict(stats_fraction=0.5), dict(lr=0.1)],
    ids=["automatic", "rho-every-step", "gamma-reselection", "stats-subset", "fixed-lr"],
)
def test_batchnorm_statistics_move_once_per_step(options):
    loss_func, X, y = _batch("ce")
    model = _mlp(batchnorm=True)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ck.optim.KFAC(model, loss_func, **options)
        opt.step(lambda: loss_func(model(X), y))
    plain(X)  # one forward pass in training mode
    assert model[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var, rtol=0, atol=0)


# -- validation before any change -------------------------------------------------------


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(lr=0.1, kl_clip=-1.0), "kl_clip"),
        (dict(lr=0.1, kl_clip=float("nan")), "kl_clip"),
        (dict(l2=-1e-3), "l2"),
        (dict(damping=float("nan")), "damping"),
        (dict(damping=float("inf")), "damping"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=0.1, momentum=-0.5), "momentum"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(min_damping=1.0, max_damping=0.1), "min_damping"),
        (dict(ema_max=1.0), "ema_max"),
        (dict(fallback_lr=0.0), "fallback_lr"),
    ],
)
def test_bad_arguments_raise_a_clear_error(options, name):
    with pytest.raises(ShapeError, match=name):
        ck.optim.KFAC(_mlp(), nn.CrossEntropyLoss(), **options)


def test_param_group_mixing_automatic_and_fixed_lr_raises():
    model = _mlp()
    groups = [
        {"params": list(model[0].parameters()), "lr": None},
        {"params": list(model[2].parameters())},
    ]
    with pytest.raises(ShapeError, match="lr=None"):
        ck.optim.KFAC(model, nn.CrossEntropyLoss(), groups, lr=0.1)
    opt = ck.optim.KFAC(model, nn.CrossEntropyLoss(), list(model[0].parameters()), lr=0.1)
    with pytest.raises(ShapeError, match="lr=None"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": None})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda groups: groups[0].update(kl_clip=-1.0),
        lambda groups: groups[1].update(lr=None),
        lambda groups: groups[0].update(lr=float("nan")),
        lambda groups: groups[1].update(momentum=float("nan")),
    ],
    ids=["negative-kl_clip", "group-lr-None", "lr-nan", "momentum-nan"],
)
def test_step_with_invalid_groups_changes_nothing(change):
    """Groups changed after construction (by hand or by a scheduler) are checked first."""
    loss_func, X, y = _batch("ce")
    model = _mlp()
    groups = [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": 0.05},
    ]
    opt = ck.optim.KFAC(model, loss_func, groups, lr=0.1, momentum=0.5, kl_clip=1e-2)
    for _ in range(2):
        opt.step(lambda: loss_func(model(X), y))
    change(opt.param_groups)
    before = _snapshot(opt, model)
    with pytest.raises(ShapeError):
        opt.step(lambda: loss_func(model(X), y))
    _assert_unchanged(before, opt, model)


def test_lr_scheduler_on_the_automatic_step_raises():
    loss_func, X, y = _batch("ce")
    model = _mlp()
    opt = ck.optim.KFAC(model, loss_func)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ShapeError, match="scheduler"):
        opt.step(lambda: loss_func(model(X), y))
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))


def test_empty_batch_raises_and_changes_nothing():
    loss_func, X, y = _batch("ce")
    model = _mlp(batchnorm=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ck.optim.KFAC(model, loss_func)
        opt.step(lambda: loss_func(model(X), y))
    before = _snapshot(opt, model)
    with pytest.raises(ShapeError, match="empty"):
        opt.step(lambda: loss_func(model(X[:0]), y[:0]))
    _assert_unchanged(before, opt, model)


def test_closure_calling_backward_raises_and_changes_nothing():
    loss_func, X, y = _batch("ce")
    model = _mlp(batchnorm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ck.optim.KFAC(model, loss_func)
        opt.step(lambda: loss_func(model(X), y))
    before = _snapshot(opt, model)

    def closure():
        loss = loss_func(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(ShapeError, match="backward"):
        opt.step(closure)
    _assert_unchanged(before, opt, model)  # BatchNorm statistics included


# -- checkpoints -------------------------------------------------------------------------


def _trained(structure, seed=0):
    loss_func, X, y = _batch("ce")
    model = _mlp(seed)
    opt = ck.optim.KFAC(model, loss_func, structure=structure)
    for _ in range(2):
        opt.step(lambda: loss_func(model(X), y))
    return model, opt


@pytest.mark.parametrize(
    "source, target",
    [("tridiagonal", "block-diagonal"), ("block-diagonal", "tridiagonal")],
)
def test_failed_load_changes_nothing(source, target):
    _, donor = _trained(source)
    buffer = io.BytesIO()
    torch.save(donor.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, opt = _trained(target, seed=1)
    twin_model, twin = _trained(target, seed=1)  # never sees the failed load
    before = _snapshot(opt, model)
    with pytest.raises(ShapeError, match="structure"):
        opt.load_state_dict(checkpoint)
    _assert_unchanged(before, opt, model)
    # and the next step is the one the optimiser would have taken anyway
    _, X, y = _batch("ce", seed=2)
    opt.step(lambda: opt.loss_func(model(X), y))
    twin.step(lambda: twin.loss_func(twin_model(X), y))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_load_of_a_fixed_lr_state_into_the_automatic_step_raises():
    model, opt = _trained("block-diagonal")
    fixed_model = _mlp()
    fixed = ck.optim.KFAC(fixed_model, nn.CrossEntropyLoss(), lr=0.1)
    before = _snapshot(opt, model)
    with pytest.raises(ShapeError, match="fixed-lr"):
        opt.load_state_dict(fixed.state_dict())
    _assert_unchanged(before, opt, model)


# -- tied and repeated parameters ----------------------------------------------------------


def test_tied_weight_raises_naming_both_modules():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    b.weight = a.weight
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), a, nn.Tanh(), b, nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'2.weight'.*'4.weight'"):
        ck.optim.KFAC(model, nn.CrossEntropyLoss())
    same = nn.Linear(5, 5)
    twice = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), same, nn.Tanh(), same, nn.Linear(5, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'2.weight'.*'4.weight'"):
        ck.optim.KFAC(twice, nn.CrossEntropyLoss())


def test_parameter_listed_twice_raises():
    model = _mlp()
    w = model[0].weight
    with pytest.raises(ShapeError, match=r"params\[1\] is params\[0\]"):
        ck.optim.KFAC(model, nn.CrossEntropyLoss(), [w, w], lr=0.1)


# -- precision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_factor_dtype_defaults_to_the_parameters(dtype, expected):
    opt = ck.optim.KFAC(_mlp(dtype=dtype), nn.CrossEntropyLoss())
    assert opt.preconditioner.factor_dtype == expected


def test_float64_model_gets_float64_factors_and_steps():
    loss_func, X, y = _batch("ce")
    model = _mlp()
    opt = ck.optim.KFAC(model, loss_func, kind="kflr")
    opt.step(lambda: loss_func(model(X), y))
    assert all(A.dtype == torch.float64 for A in opt.preconditioner.A)
    assert all(G.dtype == torch.float64 for G in opt.preconditioner.G)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    ],
    ids=["StepLR", "OneCycleLR", "CosineAnnealingLR"],
)
def test_schedulers_cannot_switch_the_automatic_step(make):
    """OneCycleLR writes a number into lr: that must not silently turn into the fixed-lr mode."""
    loss_func, X, y = _batch("ce")
    model = _mlp()
    opt = ck.optim.KFAC(model, loss_func)
    make(opt)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ShapeError, match="lr"):
        opt.step(lambda: loss_func(model(X), y))
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert opt.state["kfac"]["step"] == 0 and opt.preconditioner.updates == 0
