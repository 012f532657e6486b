"""KFACConfig: one place that validates K-FAC's settings, saved with the state."""

import copy
import dataclasses
import io
import warnings

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ConfigError, ShapeError
from curvkit.optim import KFAC, KFACConfig
from curvkit.optim.config import STRUCTURAL

DT = torch.float64


def _problem(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    mods = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if batchnorm else []) + [nn.Tanh()]
    model = nn.Sequential(*mods, nn.Linear(6, 3)).to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(16, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, nn.CrossEntropyLoss(), X, y


def _train(opt, model, loss_func, X, y, steps=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's announcement
        for _ in range(steps):
            opt.step(lambda: loss_func(model(X), y))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


SETTINGS = [
    dict(),
    dict(structure="tridiagonal", T_inv=2),
    dict(lr=0.1, momentum=0.9, fallback="sgd", kl_clip=1e-2),
    dict(ekfac=True, T2=2, T1=2),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s) or "defaults")
def test_config_and_keywords_train_identically(settings):
    """KFAC(config=KFACConfig(**s)) and KFAC(**s) take bit-identical steps."""
    model_a, loss_func, X, y = _problem(batchnorm=True)
    model_b = copy.deepcopy(model_a)
    a = KFAC(model_a, loss_func, **settings)
    b = KFAC(model_b, loss_func, config=KFACConfig(**settings))
    assert a.config == b.config == KFACConfig(**settings)
    assert torch.equal(_train(a, model_a, loss_func, X, y), _train(b, model_b, loss_func, X, y))


def test_keywords_replace_config_fields():
    model, loss_func, *_ = _problem()
    cfg = KFACConfig(structure="tridiagonal", damping=1e-1)
    opt = KFAC(model, loss_func, config=cfg, damping=1e-3)
    assert opt.config == dataclasses.replace(cfg, damping=1e-3)
    assert opt.structure == "tridiagonal" and opt.damping == 1e-3
    assert cfg.damping == 1e-1  # the given config is not changed


def test_config_is_frozen():
    cfg = KFACConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.damping = 1.0


@pytest.mark.parametrize(
    "name, value",
    [
        ("structure", "dense"),
        ("kind", "kfra"),
        ("damping_mode", "tikhonov"),
        ("T_cov", 0),
        ("T_inv", 1.5),
        ("T2", -1),
        ("mc_samples", True),
        ("damping", float("nan")),
        ("lr", -0.1),
        ("momentum", float("inf")),
        ("stats_fraction", 0.0),
        ("ema_max", 1.0),
        ("max_damping", 0.0),
        ("fallback", "rmsprop"),
        ("fallback_lr", 0.0),
        ("factor_dtype", torch.float16),
        ("ekfac_correction", "fisher"),
        ("ekfac", "yes"),
        ("adapt_damping", "on"),
        ("seed", 1.5),
    ],
)
def test_bad_values_are_named(name, value):
    """Each bad setting raises ConfigError (still a ShapeError) naming the field."""
    with pytest.raises(ConfigError, match=name):
        KFACConfig(**{name: value})
    model, loss_func, *_ = _problem()
    with pytest.raises(ShapeError, match=name):  # the deprecated base class still catches it
        KFAC(model, loss_func, **{name: value})


def test_combinations_are_checked():
    with pytest.raises(ConfigError, match="tridiagonal"):
        KFACConfig(structure="tridiagonal", damping_mode="exact")
    with pytest.raises(ConfigError, match="ekfac"):
        KFACConfig(structure="tridiagonal", ekfac=True)
    with pytest.raises(ConfigError, match="exceeds"):
        KFACConfig(min_damping=1.0, max_damping=0.5)


def test_unknown_keyword_is_a_type_error_and_builds_nothing():
    model, loss_func, *_ = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="dampng"):
        KFAC(model, loss_func, dampng=1e-2)
    with pytest.raises(ConfigError, match="dampng"):
        KFAC(model, loss_func, dampng=1e-2)
    with pytest.raises(ConfigError, match="KFACConfig"):
        KFAC(model, loss_func, config={"damping": 1e-2})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_dict_round_trip():
    cfg = KFACConfig(structure="tridiagonal", factor_dtype=torch.float64, lr=0.1, T2=None)
    values = cfg.to_dict()
    assert values["factor_dtype"] == "float64"
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in values.values())
    assert KFACConfig.from_dict(values) == cfg
    with pytest.raises(ConfigError, match="factor_dtype"):
        KFACConfig.from_dict({**values, "factor_dtype": "int8"})


def test_state_dict_carries_the_config_and_loads_with_weights_only():
    model, loss_func, X, y = _problem()
    opt = KFAC(model, loss_func, structure="tridiagonal", T_inv=3)
    _train(opt, model, loss_func, X, y, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert KFACConfig.from_dict(state["config"]) == opt.config
    twin_model = copy.deepcopy(model)
    twin = KFAC(twin_model, loss_func, config=opt.config)
    twin.load_state_dict(state)
    theta = _train(opt, model, loss_func, X, y)
    assert torch.equal(theta, _train(twin, twin_model, loss_func, X, y))


@pytest.mark.parametrize("name", STRUCTURAL)
def test_structural_mismatch_raises_before_anything_changes(name):
    """A state saved under another structural setting is refused; nothing changes."""
    other = {
        "structure": "tridiagonal",
        "kind": "kflr",
        "damping_mode": "exact",
        "ekfac": True,
        "ekfac_correction": "kind",
        "fallback": "sgd",
    }[name]
    model, loss_func, X, y = _problem()
    donor_model = copy.deepcopy(model)
    donor = KFAC(donor_model, loss_func, **{name: other})
    _train(donor, donor_model, loss_func, X, y, steps=2)
    opt = KFAC(model, loss_func)
    _train(opt, model, loss_func, X, y, steps=2)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=f"{name}="):
        opt.load_state_dict(donor.state_dict())
    after = opt.state_dict()
    assert after["config"] == before["config"]
    counters, old = after["state"]["kfac"], before["state"]["kfac"]
    assert [counters[k] for k in ("step", "damping", "gamma")] == [
        old[k] for k in ("step", "damping", "gamma")
    ]
    assert torch.equal(counters["prev_update"], old["prev_update"])
    assert torch.equal(after["generator"], before["generator"])
    for a, b in zip(after["preconditioner"]["A"], before["preconditioner"]["A"]):
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_other_settings_may_change_on_load():
    """Damping, intervals and the like are not structural: a state loads across them."""
    model, loss_func, X, y = _problem()
    donor = KFAC(copy.deepcopy(model), loss_func, T_inv=5, damping=1e-1)
    opt = KFAC(model, loss_func, T_inv=2, damping=1e-3)
    opt.load_state_dict(donor.state_dict())
    assert opt.config.T_inv == 2  # the settings are this optimiser's
    assert opt.damping == 1e-1  # the current damping is the state's


def test_exported():
    assert ck.optim.KFACConfig is KFACConfig
