"""The BackPACK backend against the sweep, float64 references, and for hygiene and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvkit as ck
from curvkit.errors import (
    ConfigError,
    CurvkitError,
    ShapeError,
    UnsupportedModuleError,
)
from curvkit.extraction import extract
from curvkit.extraction.backpack_backend import (
    BackpackError,
    backpack_supports,
    extract_backpack,
)
from tests.reference import (
    LOSSES,
    assert_allclose_report,
    dense_ggn,
    dense_grad,
    dense_hessian,
    flatten_sequential,
    joint_block,
    kron_block,
    make_problem,
    per_example_grads,
    reduction_factor,
    sqrt_psd,
)

EXACT = (
    "kflr",
    "empirical",
    "batch_grad",
    "batch_grad_factors",
    "curvature_grad_factors",
    "diag_ggn",
    "diag_hessian",
    "cross",
)
TOL = (1e-10, 1e-12)  # float64: both passes compute the same sums in another order


def _targets(loss: str, n: int, c: int, gen: torch.Generator) -> torch.Tensor:
    if loss == "ce":
        return torch.randint(0, c, (n,), generator=gen)
    if loss == "bce":
        return torch.rand(n, c, generator=gen, dtype=torch.float64)
    return torch.randn(n, c, generator=gen, dtype=torch.float64)


def _state(model: nn.Module):
    """Hook dicts and plain attributes (names and values) of modules; parameters' names."""
    mods = [
        (
            {k: dict(v) for k, v in vars(m).items() if k.endswith("hooks") and isinstance(v, dict)},
            {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, tuple))},
        )
        for m in model.modules()
    ]
    return mods, [set(vars(p)) for p in model.parameters()]


def _compare(got, ref, tag: str) -> None:
    """Records ``got`` (BackPACK) against ``ref`` (sweep), field by field."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        name = f"{tag} {r.name}"
        assert (g.name, g.position, g.has_bias, g.joint) == (
            r.name,
            r.position,
            r.has_bias,
            r.joint,
        )
        assert math.isclose(g.bias_scale, r.bias_scale, rel_tol=1e-12)
        pairs = [("A", g.A, r.A), ("cross_A", g.cross_A, r.cross_A)]
        pairs += [(f"G[{k}]", g.G.get(k), r.G[k]) for k in r.G]
        pairs += [(f"cross_G[{k}]", g.cross_G.get(k), r.cross_G[k]) for k in r.cross_G]
        for field in ("batch_grad", "diag_ggn", "diag_hessian"):
            for i, t in enumerate(getattr(r, field) or []):
                pairs.append((f"{field}[{i}]", getattr(g, field)[i], t))
        if r.grad_factors is not None:
            pairs += [("grad_factors", torch.cat(g.grad_factors, 1), torch.cat(r.grad_factors, 1))]
        for k, (rows, a) in r.curvature_grad_factors.items():
            pairs += [(f"cgf[{k}]", g.curvature_grad_factors[k][0], rows)]
            pairs += [(f"cgf_a[{k}]", g.curvature_grad_factors[k][1], a)]
        assert set(g.G) == set(r.G)
        assert g.cross_reason == r.cross_reason
        for what, a, b in pairs:
            assert (a is None) == (b is None), f"{name} {what}"
            if b is not None:
                assert_allclose_report(a, b, *TOL, f"{name} {what}")


# -- agreement with the sweep ---------------------------------------------------------

SWEEP_CASES = [
    pytest.param(m, loss, red, id=f"{m}-{loss}-{red}")
    for m in ("mlp", "deep_mlp", "cnn")
    for loss in LOSSES
    for red in ("mean", "sum")
]


@pytest.mark.parametrize("model,loss,reduction", SWEEP_CASES)
def test_matches_sweep(model, loss, reduction):
    """Every exact quantity, both bias layouts and both conv variants, and ``.grad``."""
    # BackPACK's BCEWithLogitsLoss supports one output only
    net, loss_func, X, y = make_problem(model, loss, reduction, d_out=1 if loss == "bce" else 3)
    q = list(EXACT)
    if model != "cnn" and loss != "bce":
        q.append("kfra")
    for separate in (False, True):
        for approx in ("expand", "reduce"):
            net.zero_grad()
            got = extract_backpack(
                net, loss_func, X, y, q, separate_bias=separate, kfac_approx=approx
            )
            grads = [p.grad.clone() for p in net.parameters()]
            net.zero_grad()
            ref = extract(net, loss_func, X, y, q, separate_bias=separate, kfac_approx=approx)
            _compare(got, ref, f"sep={separate} {approx}")
            for g, p in zip(grads, net.parameters()):
                assert_allclose_report(g, p.grad, *TOL, "grad")
            assert torch.allclose(got.loss, ref.loss, rtol=1e-14)
            assert (got.batch_size, got.reduction_factor) == (ref.batch_size, ref.reduction_factor)


def test_grad_accumulates_like_backward():
    net, loss_func, X, y = make_problem("mlp", "ce", "mean")
    expected = [2 * g for g in dense_grad(net, loss_func, X, y)]
    extract_backpack(net, loss_func, X, y, ("diag_ggn",))
    extract_backpack(net, loss_func, X, y, ("kflr",))
    for p, e in zip(net.parameters(), expected):
        assert_allclose_report(p.grad, e, *TOL)


def test_factor_dtype_float32_from_float64_model():
    net, loss_func, X, y = make_problem("cnn", "ce", "mean")
    got = extract_backpack(net, loss_func, X, y, ("kflr", "diag_ggn"), factor_dtype=torch.float32)
    ref = extract(net, loss_func, X, y, ("kflr", "diag_ggn"))
    for g, r in zip(got, ref):
        assert g.A.dtype == g.G["kflr"].dtype == g.diag_ggn[0].dtype == torch.float32
        assert_allclose_report(g.A, r.A, 1e-5, 1e-7)
        assert_allclose_report(g.G["kflr"], r.G["kflr"], 1e-5, 1e-7)


# -- modules only BackPACK handles, against float64 references ------------------------


def _conv3d():
    return nn.Sequential(
        nn.Conv3d(2, 3, 2, padding=1),
        nn.Sigmoid(),
        nn.Conv3d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ), (2, 3, 3, 3)


def _convt2d():
    return nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2),
        nn.Tanh(),
        nn.ZeroPad2d(1),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(32, 3),
    ), (2, 3, 3)


def _convt1d():
    return nn.Sequential(
        nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(21, 3),
    ), (2, 4)


def _convt3d():
    return nn.Sequential(nn.ConvTranspose3d(2, 2, 2, bias=False), nn.Flatten(), nn.Linear(54, 3)), (
        2,
        2,
        2,
        2,
    )


BACKPACK_ONLY = {"conv3d": _conv3d, "convt2d": _convt2d, "convt1d": _convt1d, "convt3d": _convt3d}


def _problem(name: str, loss: str, reduction: str, n: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    net, in_shape = BACKPACK_ONLY[name]()
    net = net.double()
    c = 1 if loss == "bce" else 3
    if c == 1:
        last = net[-1]
        net[-1] = nn.Linear(last.in_features, 1).double()
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *in_shape, generator=gen, dtype=torch.float64)
    return net, LOSSES[loss](reduction=reduction), X, _targets(loss, n, c, gen)


def _weight_matrix_axis(layer: nn.Module) -> int:
    """Axis of ``weight`` that indexes the Kronecker block's rows (outputs)."""
    return (
        1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    )


def reference_factors(model, loss_func, X, y, pos, kind, approx, joint):
    r"""KFC factors of the layer at leaf position ``pos`` by Jacobians (no unfolding).

    Patches: :math:`u_{n,t} = \partial z_{n,0,t} / \partial W_{0,:}` (the weight as the
    ``[out, in]`` matrix of the Kronecker block); output gradients: the columns of
    :math:`J_{n,t}^\top \Lambda_n^{1/2}` (``"kflr"``) or :math:`J_{n,t}^\top \nabla_f \ell_n`
    (``"empirical"``), :math:`J_{n,t} = \partial f_n / \partial z_{n,:,t}`.
    """
    leaves = [m for _, m in flatten_sequential(model)]
    prefix, layer, suffix = leaves[:pos], leaves[pos], nn.Sequential(*leaves[pos + 1 :])
    N, R = X.shape[0], reduction_factor(loss_func, X.shape[0])
    x = X
    with torch.no_grad():
        for m in prefix:
            x = m(x)
    W = layer.weight.detach()
    jac = jacrev(lambda w: functional_call(layer, {"weight": w}, (x,)))(W)  # [N, O, *sp, *W]
    z = layer(x).detach()
    sp = z.dim() - 2
    axis = _weight_matrix_axis(layer)
    T = z.shape[2:].numel() if sp else 1
    u = jac[:, 0].select(1 + sp + axis, 0).reshape(N, T, -1)  # [N, T, in]
    if joint:
        u = torch.cat([u, torch.ones_like(u[..., :1])], dim=2)
    rows = []
    for n in range(N):
        J = jacrev(lambda zz: suffix(zz[None])[0])(z[n]).reshape(-1, z.shape[1], T)  # [C, O, T]
        f = suffix(z[n][None])[0].detach()

        def ell(ff, yy=y[n]):
            return loss_func(ff[None], yy[None])

        S = sqrt_psd(hessian(ell)(f)) if kind == "kflr" else torch.func.grad(ell)(f)[:, None]
        rows.append(torch.einsum("kot,kc->cot", J, S))  # [cols, O, T]
    if approx == "expand":
        A = R * torch.einsum("ntk,ntl->kl", u, u)
        G = sum(torch.einsum("cot,cpt->op", s, s) for s in rows) / (N * T)
    else:
        um = u.mean(1)
        A = R * um.T @ um
        G = sum(s.sum(2).T @ s.sum(2) for s in rows) / N
    return A, G


ONLY_CASES = [
    pytest.param(m, loss, red, id=f"{m}-{loss}-{red}")
    for m in BACKPACK_ONLY
    for loss in LOSSES
    for red in ("mean", "sum")
    if red == "mean" or loss == "ce"
]


@pytest.mark.parametrize("model,loss,reduction", ONLY_CASES)
def test_backpack_only_modules_against_references(model, loss, reduction):
    """Conv3d, ConvTranspose1d/2d/3d, ZeroPad2d: factors, diagonals, per-example gradients."""
    net, loss_func, X, y = _problem(model, loss, reduction)
    q = ("kflr", "empirical", "batch_grad", "diag_ggn", "diag_hessian")
    ggn, hess = dense_ggn(net, loss_func, X, y), dense_hessian(net, loss_func, X, y)
    bgrads = per_example_grads(net, loss_func, X, y)
    grads = dense_grad(net, loss_func, X, y)
    positions = [i for i, (_, m) in enumerate(flatten_sequential(net)) if list(m.parameters())]
    for separate, approx in ((False, "expand"), (True, "reduce")):
        net.zero_grad()
        rec = extract_backpack(net, loss_func, X, y, q, separate_bias=separate, kfac_approx=approx)
        diag_g = torch.cat([d.flatten() for r in rec for d in r.diag_ggn])
        diag_h = torch.cat([d.flatten() for r in rec for d in r.diag_hessian])
        assert_allclose_report(diag_g, ggn.diagonal(), *TOL, "diag_ggn")
        assert_allclose_report(diag_h, hess.diagonal(), *TOL, "diag_hessian")
        got_b = [b for r in rec for b in r.batch_grad]
        for g, e in zip(got_b, bgrads):
            assert_allclose_report(g, e, *TOL, "batch_grad")
        for p, e in zip(net.parameters(), grads):
            assert_allclose_report(p.grad, e, *TOL, "grad")
        for r, pos in zip(rec, positions):
            for kind in ("kflr", "empirical"):
                A, G = reference_factors(net, loss_func, X, y, pos, kind, approx, r.joint)
                assert_allclose_report(r.A, A, *TOL, f"{r.name} A {approx}")
                assert_allclose_report(r.G[kind], G, *TOL, f"{r.name} G[{kind}] {approx}")


def test_single_location_conv3d_kflr_is_exact_ggn_block():
    """With one example and one output location a conv layer is a Linear one: exact."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2)).double()
    X = torch.randn(1, 2, 2, 2, 2, dtype=torch.float64)
    y = torch.tensor([1])
    loss_func = nn.CrossEntropyLoss()
    ggn = dense_ggn(net, loss_func, X, y)
    rec = extract_backpack(net, loss_func, X, y, ("kflr",))
    for r in rec:
        expected = joint_block(ggn, net, r.name)
        assert_allclose_report(kron_block(r.G["kflr"], r.A), expected, *TOL, r.name)


def test_pooling_3d_diagonals_and_batch_grads():
    """MaxPool3d (no Kronecker rule in BackPACK): diagonals and BatchGrad; KFLR raises."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv3d(2, 3, 2, padding=1), nn.ReLU(), nn.MaxPool3d(2), nn.Flatten(), nn.Linear(24, 3)
    ).double()
    X = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    rec = extract_backpack(net, loss_func, X, y, ("batch_grad", "diag_ggn", "diag_hessian"))
    ggn, hess = dense_ggn(net, loss_func, X, y), dense_hessian(net, loss_func, X, y)
    assert_allclose_report(
        torch.cat([d.flatten() for r in rec for d in r.diag_ggn]), ggn.diagonal()
    )
    assert_allclose_report(
        torch.cat([d.flatten() for r in rec for d in r.diag_hessian]), hess.diagonal()
    )
    for g, e in zip(
        [b for r in rec for b in r.batch_grad], per_example_grads(net, loss_func, X, y)
    ):
        assert_allclose_report(g, e, *TOL)
    with pytest.raises(BackpackError, match='MaxPool3d.*backend="sweep"'):
        extract_backpack(net, loss_func, X, y, ("kflr",))


# -- Monte Carlo quantities ----------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kfac_unbiased_for_kflr(loss):
    """``G["kfac"]`` is a mean of ``M N`` sampled outer products with mean ``G["kflr"]``.

    The sampled rows come back as ``curvature_grad_factors``; their empirical standard
    error bounds the deviation: 6 standard errors per entry (two-sided normal tail
    2e-9; 57 entries). ``G["kfac"]`` is also checked to be exactly their Gram matrix.
    """
    net, loss_func, X, y = make_problem("deep_mlp", loss, "mean", n=8)
    M = 4000
    gen = torch.Generator().manual_seed(0)
    q = ("kfac", "kflr", "curvature_grad_factors")
    rec = extract_backpack(net, loss_func, X, y, q, mc_samples=M, generator=gen)
    R, N = rec.reduction_factor, rec.batch_size
    for r in rec:
        rows = r.curvature_grad_factors["kfac"][0] / R * math.sqrt(M)  # unscaled samples
        outer = torch.einsum("mni,mnj->mnij", rows, rows).reshape(M * N, *r.G["kfac"].shape)
        assert_allclose_report(r.G["kfac"], outer.mean(0), 1e-10, 1e-13, f"{r.name} gram")
        se = outer.std(0) / math.sqrt(M * N)
        err = (r.G["kfac"] - r.G["kflr"]).abs()
        assert bool((err <= 6 * se + 1e-12).all()), f"{r.name}: {float((err / se).max()):.2f} SE"


def test_diag_ggn_mc_unbiased():
    """Mean of 16 independent ``diag_ggn_mc`` runs within 6 standard errors of ``diag_ggn``.

    The runs are independent (distinct seeds), so the standard error of their mean is
    their sample standard deviation over 4; a t-distribution with 15 degrees of freedom
    exceeds 6 with probability 3e-5 per entry.
    """
    net, loss_func, X, y = make_problem("mlp", "ce", "sum", n=6)
    exact = extract_backpack(net, loss_func, X, y, ("diag_ggn",))
    runs = []
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        rec = extract_backpack(net, loss_func, X, y, ("diag_ggn_mc",), mc_samples=50, generator=gen)
        runs.append(torch.cat([d.flatten() for r in rec for d in r.diag_ggn_mc]))
    runs = torch.stack(runs)
    target = torch.cat([d.flatten() for r in exact for d in r.diag_ggn])
    se = runs.std(0) / 4
    err = (runs.mean(0) - target).abs()
    assert bool((err <= 6 * se + 1e-12).all())
    assert bool((runs >= 0).all())


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_conv_unbiased_for_kflr(approx):
    """Conv layers ("expand" ``G`` from the backpropagated samples): 16 independent runs.

    Their mean lies within 6 standard errors (sample standard deviation over 4) of
    ``G["kflr"]`` (t-distribution, 15 degrees of freedom: 3e-5 per entry); ``A`` is
    the same as KFLR's.
    """
    net, loss_func, X, y = make_problem("cnn", "ce", "mean")
    exact = extract_backpack(net, loss_func, X, y, ("kflr",), kfac_approx=approx)
    runs = []
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        rec = extract_backpack(
            net, loss_func, X, y, ("kfac",), mc_samples=20, generator=gen, kfac_approx=approx
        )
        for r, e in zip(rec, exact):
            assert_allclose_report(r.A, e.A, *TOL)
        runs.append(torch.cat([r.G["kfac"].flatten() for r in rec]))
    runs = torch.stack(runs)
    target = torch.cat([r.G["kflr"].flatten() for r in exact])
    err = (runs.mean(0) - target).abs()
    assert bool((err <= 6 * runs.std(0) / 4 + 1e-12).all())


def test_mc_reproducible_and_global_rng_untouched():
    net, loss_func, X, y = make_problem("mlp", "ce", "mean")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = [
        extract_backpack(
            net,
            loss_func,
            X,
            y,
            ("kfac",),
            mc_samples=3,
            generator=torch.Generator().manual_seed(5),
        )
        for _ in range(2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    other = extract_backpack(
        net, loss_func, X, y, ("kfac",), mc_samples=3, generator=torch.Generator().manual_seed(6)
    )
    for a, b, c in zip(*runs, other):
        assert torch.equal(a.G["kfac"], b.G["kfac"])
        assert not torch.equal(a.G["kfac"], c.G["kfac"])


# -- hygiene --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_model_left_unchanged(model):
    net, loss_func, X, y = make_problem(model, "ce", "mean")
    before = _state(net)
    everything = ("kflr", "kfac", "batch_grad", "diag_ggn", "diag_ggn_mc", "diag_hessian", "cross")
    extract_backpack(net, loss_func, X, y, everything + ("empirical",))
    assert _state(net) == before
    assert not any(hasattr(m, "input0") or hasattr(m, "output") for m in net.modules())
    # exact operators (torch.func) work on the model afterwards
    assert_allclose_report(
        ck.ggn(net, loss_func, (X, y)).to_dense(), dense_ggn(net, loss_func, X, y)
    )


def test_failure_leaves_model_and_grads_unchanged():
    """BackPACK fails mid-backward (BCE with several outputs): nothing changes."""
    net, loss_func, X, y = make_problem("mlp", "bce", "mean")
    net(X).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    before = _state(net)
    with pytest.raises(BackpackError, match='scalar-valued.*backend="sweep"'):
        extract_backpack(net, loss_func, X, y, ("kflr",))
    assert _state(net) == before
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g)
    net.zero_grad()
    extract(net, loss_func, X, y, ("kflr",))  # the sweep still works on the model


# -- converter ------------------------------------------------------------------------


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.act(self.inp(x)) + x)


class _Functional(_Residual):
    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


def test_converter_residual_model_against_dense():
    torch.manual_seed(3)
    net = _Residual().double()
    loss_func = nn.CrossEntropyLoss()
    X, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    before = _state(net)
    rec = extract_backpack(net, loss_func, X, y, ("kflr", "diag_ggn"), use_converter=True)
    assert _state(net) == before
    assert [r.name for r in rec] == ["inp", "out"]
    ggn = dense_ggn(net, loss_func, X, y)
    for r in rec:  # one example: KFLR is the exact GGN block of a Linear layer
        expected = joint_block(ggn, net, r.name)
        assert_allclose_report(kron_block(r.G["kflr"], r.A), expected, *TOL, r.name)
    diag = torch.cat([d.flatten() for r in rec for d in r.diag_ggn])
    assert_allclose_report(diag, ggn.diagonal(), *TOL)


def test_converter_failure_is_clear_and_harmless():
    net = _Functional().double()
    X, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    before = _state(net)
    with pytest.raises(BackpackError, match='BackPACK failed.*backend="sweep"'):
        extract_backpack(net, nn.CrossEntropyLoss(), X, y, ("kflr",), use_converter=True)
    assert _state(net) == before
    assert all(p.grad is None for p in net.parameters())


# -- errors ---------------------------------------------------------------------------


def test_errors_before_any_change():
    net, loss_func, X, y = make_problem("mlp", "ce", "mean")
    cases = [
        (dict(q=("nope",)), ShapeError, "Unknown quantities"),
        (dict(q=("kflr",), mc_samples=0), ShapeError, "mc_samples"),
        (dict(q=("kflr",), kfac_approx="x"), ShapeError, "kfac_approx"),
        (dict(q=("kflr",), unsupported="gradient"), BackpackError, "unsupported='gradient'"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            extract_backpack(net, loss_func, X, y, **kwargs)
    with pytest.raises(UnsupportedModuleError, match="nn.Sequential"):
        extract_backpack(_Residual(), loss_func, X.float()[:, :4], y, ("kflr",))
    ln = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with pytest.raises(BackpackError, match='LayerNorm.*backend="sweep"'):
        extract_backpack(ln, loss_func, X, y, ("diag_ggn",))
    assert backpack_supports(ln, ("diag_ggn",)) is not None
    assert backpack_supports(net, ("kflr", "diag_hessian")) is None
    cnn, cl, Xc, yc = make_problem("cnn", "ce", "mean")
    with pytest.raises(BackpackError, match="KFRA.*Conv2d"):
        extract_backpack(cnn, cl, Xc, yc, ("kfra",))
    with pytest.raises(ConfigError, match="class indices"):  # out of range: a bad value
        extract_backpack(net, loss_func, X, y + 3, ("kflr",))
    with pytest.raises(ShapeError, match="targets shaped like the output"):
        extract_backpack(net, nn.MSELoss(), X, y, ("kflr",))
    assert all(p.grad is None for p in [*net.parameters(), *ln.parameters(), *cnn.parameters()])


def test_kfra_bce_error_names_alternative():
    net, loss_func, X, y = make_problem("mlp", "bce", "mean", d_out=1)
    with pytest.raises(BackpackError, match="KFRA|NotImplementedError") as info:
        extract_backpack(net, loss_func, X, y, ("kfra",))
    assert isinstance(info.value, CurvkitError) and isinstance(info.value, NotImplementedError)
    assert 'backend="sweep"' in str(info.value)
    assert all(p.grad is None for p in net.parameters())


def test_inplace_activation_error_and_model_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = _state(net)
    with pytest.raises(BackpackError, match='forward pass.*inplace.*backend="sweep"'):
        extract_backpack(net, nn.CrossEntropyLoss(), X, y, ("kflr",))
    assert _state(net) == before
    assert all(p.grad is None for p in net.parameters())
    net[1].inplace = False
    before = _state(net)
    with pytest.raises(ShapeError, match="needs 2-D input"):
        extract_backpack(net, nn.CrossEntropyLoss(), X[:, None], y, ("batch_grad",))
    assert _state(net) == before
    assert all(p.grad is None for p in net.parameters())


def test_converter_restores_inplace_flags():
    """BackPACK's converter turns in-place activations off; the user's model keeps them."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = _state(net)
    got = extract_backpack(net, nn.CrossEntropyLoss(), X, y, ("kflr",), use_converter=True)
    assert net[1].inplace and _state(net) == before
    net[1].inplace = False
    ref = extract(net, nn.CrossEntropyLoss(), X, y, ("kflr",))
    for g, r in zip(got, ref):
        assert_allclose_report(kron_block(g.G["kflr"], g.A), kron_block(r.G["kflr"], r.A), *TOL)
