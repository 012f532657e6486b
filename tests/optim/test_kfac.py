"""K-FAC optimiser against plain dense reference computations on tiny models."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import curvkit as ck
from curvkit.errors import ShapeError
from tests.conftest import DEVICES
from tests.reference import brute_force_factors, dense_ggn, joint_block, kron_block, param_layers

DT = torch.float64


def _mlp(seed=0, widths=(4, 6, 5, 3), act=nn.Tanh, device="cpu"):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(device=device, dtype=torch.float64)


def _data(N=16, d_in=4, C=3, seed=1, device="cpu", loss="ce"):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d_in, generator=gen, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, C, (N,), generator=gen)
    else:
        y = torch.randn(N, C, generator=gen, dtype=torch.float64)
    return X.to(device), y.to(device)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _flat_grad(model, loss_func, X, y):
    model.zero_grad()
    loss_func(model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return g


def _dense_blockdiag(model, loss_func, X, y, kind="kflr", facs=None):
    """Dense block-diagonal F̂ in flat order from brute-force (or given) factors."""
    if facs is None:
        facs = brute_force_factors(model, loss_func, X, y, kind=kind)
    D = sum(p.numel() for p in model.parameters())
    # joint_block(M) = M[idx][:, idx]; recover idx by applying it to an index matrix
    F = torch.zeros(D, D, dtype=torch.float64, device=X.device)
    idx_mat = torch.arange(D * D, device=X.device).reshape(D, D)
    blocks = []
    for (name, _), f in zip(param_layers(model), facs):
        idx = joint_block(idx_mat, model, name)
        F.view(-1)[idx.reshape(-1)] = kron_block(f["G"], f["A"]).reshape(-1)
        blocks.append((name, idx, f))
    return F, blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_first_step_is_dense_damped_blockdiag_direction(mode, device):
    model = _mlp(device=device)
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(device=device)
    lam, lr = 0.05, 0.3
    F, blocks = _dense_blockdiag(model, loss_func, X, y)
    D = F.shape[0]
    if mode == "exact":
        C = F + lam * torch.eye(D, device=device, dtype=DT)
    else:  # M&G factored Tikhonov, dense
        C = torch.zeros_like(F)
        for _, idx, f in blocks:
            A, G = f["A"], f["G"]
            pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
            IA, IG = (
                torch.eye(A.shape[0], device=device, dtype=DT),
                torch.eye(G.shape[0], device=device, dtype=DT),
            )
            Cb = kron_block(G + math.sqrt(lam) / pi * IG, A + pi * math.sqrt(lam) * IA)
            C.view(-1)[idx.reshape(-1)] = Cb.reshape(-1)
    g = _flat_grad(model, loss_func, X, y)
    expected = _flat(model) - lr * torch.linalg.solve(C, g)
    opt = ck.optim.KFAC(
        model,
        loss_func,
        kind="kflr",
        lr=lr,
        damping=lam,
        damping_mode=mode,
        factor_dtype=torch.float64,
    )
    opt.step(lambda: loss_func(model(X), y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)


def _dense_tridiag_inverse(facs, lam, device):
    """M&G §4.3 F̆⁻¹ = Ξᵀ Λ Ξ with plain torch.linalg, in joint layer order."""
    L = len(facs)
    A, G = [], []
    for f in facs:
        a, g = f["A"], f["G"]
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        A.append(a + pi * math.sqrt(lam) * torch.eye(a.shape[0], device=device, dtype=DT))
        G.append(g + math.sqrt(lam) / pi * torch.eye(g.shape[0], device=device, dtype=DT))
    F = [[None] * L for _ in range(L)]
    for i in range(L):
        F[i][i] = kron_block(G[i], A[i])
    for i in range(L - 1):
        F[i][i + 1] = kron_block(facs[i]["cross_G"], facs[i]["cross_A"])
    Psi = [F[i][i + 1] @ torch.linalg.inv(F[i + 1][i + 1]) for i in range(L - 1)]
    Sigma = [F[i][i] - Psi[i] @ F[i + 1][i + 1] @ Psi[i].T for i in range(L - 1)] + [
        F[L - 1][L - 1]
    ]
    sizes = [s.shape[0] for s in Sigma]
    D = sum(sizes)
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    Xi = torch.eye(D, device=device, dtype=DT)
    Lam = torch.zeros(D, D, dtype=DT, device=device)
    for i in range(L):
        Lam[offs[i] : offs[i + 1], offs[i] : offs[i + 1]] = torch.linalg.inv(Sigma[i])
        if i < L - 1:
            Xi[offs[i] : offs[i + 1], offs[i + 1] : offs[i + 2]] = -Psi[i]
    return Xi.T @ Lam @ Xi


@pytest.mark.parametrize("device", DEVICES)
def test_first_step_is_dense_tridiagonal_direction(device):
    model = _mlp(device=device)
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=32, device=device)
    lam, lr = 0.05, 0.3
    facs = brute_force_factors(model, loss_func, X, y, kind="kflr")
    Finv = _dense_tridiag_inverse(facs, lam, device)
    D = Finv.shape[0]
    idx_mat = torch.arange(D * D, device=device).reshape(D, D)
    names = [n for n, _ in param_layers(model)]
    order = torch.cat([joint_block(idx_mat, model, n)[:, 0] // D for n in names])
    g = _flat_grad(model, loss_func, X, y)
    direction = torch.empty_like(g)
    direction[order] = Finv @ g[order]
    expected = _flat(model) - lr * direction
    opt = ck.optim.KFAC(
        model,
        loss_func,
        kind="kflr",
        structure="tridiagonal",
        lr=lr,
        damping=lam,
        factor_dtype=torch.float64,
    )
    opt.step(lambda: loss_func(model(X), y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-8, atol=1e-10)


def test_tridiagonal_equals_blockdiagonal_on_one_layer():
    loss_func = nn.MSELoss()
    X, y = _data(loss="mse")
    out = []
    for structure in ("block-diagonal", "tridiagonal"):
        torch.manual_seed(0)
        model = nn.Linear(4, 3).double()
        model = nn.Sequential(model)
        opt = ck.optim.KFAC(
            model,
            loss_func,
            structure=structure,
            kind="kflr",
            damping=1e-2,
            factor_dtype=torch.float64,
        )
        for _ in range(3):
            opt.step(lambda m=model: loss_func(m(X), y))
        out.append(_flat(model))
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-12)


def test_linear_least_squares_one_step_is_newton():
    """KFLR of a linear model with MSE is its exact Hessian: lr 1, ~0 damping lands on LS."""
    gen = torch.Generator().manual_seed(0)
    N, d, C = 64, 5, 2
    X = torch.randn(N, d, generator=gen, dtype=DT)
    Wtrue = torch.randn(C, d, generator=gen, dtype=DT)
    y = X @ Wtrue.T + 0.1 * torch.randn(N, C, generator=gen, dtype=DT)
    model = nn.Sequential(nn.Linear(d, C)).double()
    loss_func = nn.MSELoss()
    opt = ck.optim.KFAC(
        model,
        loss_func,
        kind="kflr",
        lr=1.0,
        damping=1e-12,
        damping_mode="exact",
        factor_dtype=torch.float64,
    )
    opt.step(lambda: loss_func(model(X), y))
    Xh = torch.cat([X, torch.ones(N, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(Xh, y).solution.T  # [C, d+1]
    torch.testing.assert_close(model[0].weight.detach(), sol[:, :d], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(model[0].bias.detach(), sol[:, d], rtol=1e-8, atol=1e-9)


def test_automatic_step_solves_dense_quadratic_model():
    """α (first step) minimises the exact quadratic model along Δ (dense GGN reference)."""
    model = _mlp()
    loss_func = nn.CrossEntropyLoss()
    X, y = _data()
    lam = 0.1
    ref = copy.deepcopy(model)
    F, _ = _dense_blockdiag(ref, loss_func, X, y)
    Ggn = dense_ggn(ref, loss_func, X, y)
    g = _flat_grad(ref, loss_func, X, y)
    D = F.shape[0]
    Delta = -torch.linalg.solve(F + lam * torch.eye(D, dtype=DT), g)
    Cmat = Ggn + lam * torch.eye(D, dtype=DT)
    alpha = -(g @ Delta) / (Delta @ Cmat @ Delta)
    opt = ck.optim.KFAC(
        model, loss_func, kind="kflr", damping=lam, damping_mode="exact", factor_dtype=torch.float64
    )
    opt.step(lambda: loss_func(model(X), y))
    torch.testing.assert_close(_flat(model), _flat(ref) + alpha * Delta, rtol=1e-8, atol=1e-10)
    # second step: α, μ from the 2x2 system with the previous update δ0
    prev = alpha * Delta
    g2 = _flat_grad(model, loss_func, X, y)
    G2 = dense_ggn(model, loss_func, X, y) + lam * torch.eye(D, dtype=DT)
    # the factors' moving average after two updates: decay min(1 - 1/2, 0.95) = 0.5
    f1 = brute_force_factors(ref, loss_func, X, y, kind="kflr")
    f2 = brute_force_factors(model, loss_func, X, y, kind="kflr")
    avg = [{k: 0.5 * a[k] + 0.5 * b[k] for k in ("A", "G")} for a, b in zip(f1, f2)]
    Favg, _ = _dense_blockdiag(model, loss_func, X, y, facs=avg)
    before = _flat(model)
    opt2_state = opt.state["kfac"]
    assert opt2_state["step"] == 1
    opt.T_inv = 1  # rebuild the inverse from the averaged factors at this step
    opt.step(lambda: loss_func(model(X), y))
    D2 = -torch.linalg.solve(Favg + lam * torch.eye(D, dtype=DT), g2)
    B = torch.stack([D2, prev], 1)
    coef = torch.linalg.solve(B.T @ G2 @ B, -B.T @ g2)
    torch.testing.assert_close(_flat(model), before + B @ coef, rtol=1e-7, atol=1e-9)


def _train(model, loss_func, X, y, steps, **kw):
    opt = ck.optim.KFAC(model, loss_func, **kw)
    for _ in range(steps):
        opt.step(lambda: loss_func(model(X), y))
    return opt


@pytest.mark.parametrize("structure", ["block-diagonal", "tridiagonal", "ekfac"])
@pytest.mark.parametrize("lr", [None, 0.1], ids=["automatic", "fixed-lr"])
def test_state_dict_resume_is_bit_exact(structure, lr, tmp_path):
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=24)
    kw = dict(
        structure="block-diagonal" if structure == "ekfac" else structure,
        ekfac=structure == "ekfac",
        lr=lr,
        momentum=0.9 if lr else 0.0,
        damping=1e-2,
        T_inv=3,
        T1=2,
        kind="kfac",
    )
    model = _mlp(widths=(4, 6, 6, 3))
    opt = _train(model, loss_func, X, y, 4, **kw)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    for _ in range(5):
        opt.step(lambda: loss_func(model(X), y))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = _mlp(widths=(4, 6, 6, 3), seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2 = ck.optim.KFAC(model2, loss_func, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(5):
        opt2.step(lambda: loss_func(model2(X), y))
    assert torch.equal(_flat(model), _flat(model2))
    assert opt.damping == opt2.damping


def test_nan_batch_is_rejected_and_parameters_untouched():
    model = _mlp()
    loss_func = nn.MSELoss()
    X, y = _data(loss="mse")
    opt = _train(model, loss_func, X, y, 2, damping=1e-2)
    before = _flat(model).clone()
    lam = opt.damping
    Xbad = X.clone()
    Xbad[0, 0] = float("nan")
    opt.step(lambda: loss_func(model(Xbad), y))
    assert torch.equal(_flat(model), before)
    assert opt.damping > lam
    assert opt.events[-1]["event"] == "rejected"
    # training continues normally afterwards
    loss = opt.step(lambda: loss_func(model(X), y))
    assert torch.isfinite(loss) and not torch.equal(_flat(model), before)


def test_param_groups_have_own_learning_rates():
    loss_func = nn.CrossEntropyLoss()
    X, y = _data()
    base = _mlp()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = ck.optim.KFAC(a, loss_func, lr=0.1, kind="kflr", damping=1e-2)
    lin = [m for m in b if isinstance(m, nn.Linear)]
    groups = [
        {"params": list(lin[0].parameters()), "lr": 0.0},
        {"params": [p for m in lin[1:] for p in m.parameters()]},
    ]
    opt_b = ck.optim.KFAC(b, loss_func, groups, lr=0.1, kind="kflr", damping=1e-2)
    opt_a.step(lambda: loss_func(a(X), y))
    opt_b.step(lambda: loss_func(b(X), y))
    torch.testing.assert_close(lin[0].weight, base[0].weight)  # lr 0: untouched
    torch.testing.assert_close(b[-1].weight, a[-1].weight)  # same preconditioned step


def test_lr_scheduler_changes_the_step():
    loss_func = nn.CrossEntropyLoss()
    X, y = _data()
    model = _mlp()
    opt = ck.optim.KFAC(model, loss_func, lr=0.2, kind="kflr", damping=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(lambda: loss_func(model(X), y))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_bad_arguments_are_named():
    model, loss_func = _mlp(), nn.MSELoss()
    with pytest.raises(ShapeError, match="kind"):
        ck.optim.KFAC(model, loss_func, kind="kfra-ish")
    with pytest.raises(ShapeError, match="structure"):
        ck.optim.KFAC(model, loss_func, structure="dense")
    with pytest.raises(ShapeError, match="T_inv"):
        ck.optim.KFAC(model, loss_func, T_inv=0)
    with pytest.raises(ShapeError, match="damping"):
        ck.optim.KFAC(model, loss_func, damping=-1.0)
    with pytest.raises(ShapeError, match="closure"):
        opt = ck.optim.KFAC(model, loss_func)
        X, y = _data(loss="mse")
        opt.step(lambda: loss_func(model(X), y) + loss_func(model(X), y))


def test_kfac_beats_sgd_on_a_small_regression():
    """Sanity, not a benchmark: 20 K-FAC steps reach a lower loss than 20 tuned-ish SGD steps."""
    loss_func = nn.MSELoss()
    X, y = _data(N=128, loss="mse")
    model = _mlp(act=nn.Tanh)
    sgd_model = copy.deepcopy(model)
    opt = _train(model, loss_func, X, y, 20, damping=1e-2)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(20):
        sgd.zero_grad()
        loss_func(sgd_model(X), y).backward()
        sgd.step()
    with torch.no_grad():
        assert float(loss_func(model(X), y)) < float(loss_func(sgd_model(X), y))
    assert opt.timers["extraction"] > 0 and opt.timers["inverses"] > 0


def test_gamma_reselection_picks_the_lowest_quadratic_model():
    """With T2=1 every step tries three γ; the kept one must give the lowest M(δ)."""
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=32)
    model = _mlp()
    opt = ck.optim.KFAC(
        model, loss_func, kind="kflr", damping=1.0, T2=1, T1=1000, factor_dtype=torch.float64
    )
    gamma0 = opt.gamma
    opt.step(lambda: loss_func(model(X), y))
    omega2 = math.sqrt(19 / 20)
    assert any(math.isclose(opt.gamma, c) for c in (gamma0, omega2 * gamma0, gamma0 / omega2))
    # recompute M for each candidate at the same point with a fresh optimiser
    changes = {}
    for c in (gamma0, omega2 * gamma0, gamma0 / omega2):
        m2 = _mlp()
        o2 = ck.optim.KFAC(
            m2, loss_func, kind="kflr", damping=1.0, T1=1000, factor_dtype=torch.float64
        )
        o2.state["kfac"]["gamma"] = c  # the inverse uses γ², the quadratic model keeps λ = 1
        before = _flat(m2)
        o2.step(lambda m=m2: loss_func(m(X), y))
        d = _flat(m2) - before
        Gm = dense_ggn(_mlp(), loss_func, X, y) + torch.eye(d.numel(), dtype=DT)
        g = _flat_grad(_mlp(), loss_func, X, y)
        changes[c] = float(0.5 * d @ Gm @ d + g @ d)
    assert math.isclose(opt.gamma, min(changes, key=changes.get))


@pytest.mark.parametrize(
    "kind, correction",
    [("kflr", "empirical"), ("empirical", "empirical"), ("kflr", "kind")],
    ids=["kflr", "empirical", "kflr-ggn-correction"],
)
def test_ekfac_first_step_is_damped_ekfac_direction(kind, correction):
    model = _mlp()
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=20)
    lam, lr = 0.05, 0.5
    E = ck.ekfac(copy.deepcopy(model), loss_func, (X, y), kind=kind, correction=correction)
    g = _flat_grad(model, loss_func, X, y)
    expected = _flat(model) - lr * (E.inverse(damping=lam) @ g)
    opt = ck.optim.KFAC(
        model, loss_func, kind=kind, lr=lr, damping=lam, ekfac=True,
        ekfac_correction=correction, factor_dtype=torch.float64,
    )  # fmt: skip
    opt.step(lambda: loss_func(model(X), y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)


def test_ekfac_scales_are_a_moving_average_between_basis_refreshes():
    model = _mlp()
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=20)
    opt = ck.optim.KFAC(
        model,
        loss_func,
        kind="kflr",
        lr=0.1,
        damping=0.1,
        ekfac=True,
        T_inv=3,
        factor_dtype=torch.float64,
    )
    for _ in range(3):
        opt.step(lambda: loss_func(model(X), y))
    pre = opt.preconditioner
    assert pre.scale_updates == 3  # basis from step 1, scales updated at steps 1-3
    opt.step(lambda: loss_func(model(X), y))
    assert pre.scale_updates == 1  # step 4 refreshed the basis and restarted the scales
    with pytest.raises(ShapeError, match="ekfac"):
        ck.optim.KFAC(model, loss_func, structure="tridiagonal", ekfac=True)
    with pytest.raises(ShapeError, match="correction='fisher'"):
        ck.optim.KFAC(model, loss_func, ekfac=True, ekfac_correction="fisher")
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ShapeError, match="Linear layers only"):
        ck.optim.KFAC(cnn, loss_func, ekfac=True, ekfac_correction="kind")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_stats_fraction_uses_a_rescaled_subset(reduction):
    """Statistics from the first half of the batch, gradient from all of it."""
    model = _mlp()
    loss_func = nn.MSELoss(reduction=reduction)
    X, y = _data(N=16, loss="mse")
    lam, lr = 0.05, 0.3
    facs = brute_force_factors(model, loss_func, X[:8], y[:8], kind="kflr")
    if reduction == "sum":  # A of 8 examples stands for 16 examples
        facs = [{"A": 2.0 * f["A"], "G": f["G"]} for f in facs]
    F, _ = _dense_blockdiag(model, loss_func, X, y, facs=facs)
    g = _flat_grad(model, loss_func, X, y)
    expected = _flat(model) - lr * torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), g)
    opt = ck.optim.KFAC(
        model,
        loss_func,
        kind="kflr",
        lr=lr,
        damping=lam,
        damping_mode="exact",
        stats_fraction=0.5,
        factor_dtype=torch.float64,
    )
    opt.step(lambda: loss_func(model(X), y))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-9, atol=1e-11)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 3),
    ).to(DT)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_unsupported_layers_fall_back_to_first_order_rule(rule):
    model = _bn_model()
    ref = copy.deepcopy(model)
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=16, d_in=4)
    opt = ck.optim.KFAC(model, loss_func, lr=0.1, damping=0.1, fallback=rule, fallback_lr=0.01)
    with pytest.warns(UserWarning, match="BatchNorm1d '1', LayerNorm '4'"):
        opt.step(lambda: loss_func(model(X), y))
    # reference: the first-order rule on the same gradients
    others = [ref[1].weight, ref[1].bias, ref[4].weight, ref[4].bias]
    first_order = (torch.optim.Adam if rule == "adam" else torch.optim.SGD)(others, lr=0.01)
    loss_func(ref(X), y).backward()
    first_order.step()
    for name in ("1", "4"):
        for pname in ("weight", "bias"):
            got = getattr(model.get_submodule(name), pname)
            want = getattr(ref.get_submodule(name), pname)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)  # one forward
    assert not torch.equal(model[0].weight, ref[0].weight)  # factored layers moved by K-FAC
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced only once
        opt.step(lambda: loss_func(model(X), y))


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def test_fallback_none_raises_on_unsupported_layers_at_construction():
    model = nn.Sequential(nn.Linear(4, 5), _Scale(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ck.UnsupportedModuleError, match="_Scale '1'.*fallback='adam'"):
        ck.optim.KFAC(model, nn.CrossEntropyLoss(), fallback=None)
    # BatchNorm has a curvature block (graph path): no fallback needed
    model = _bn_model()
    loss_func = nn.CrossEntropyLoss()
    X, y = _data(N=16, d_in=4)
    opt = ck.optim.KFAC(model, loss_func, fallback=None)
    opt.step(lambda: loss_func(model(X), y))
    assert [layer.block for layer in opt.preconditioner.layers][:2] == ["kron", "dense"]


def test_one_forward_pass_per_step():
    model = _mlp()
    loss_func = nn.CrossEntropyLoss()
    X, y = _data()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    opt = ck.optim.KFAC(model, loss_func, lr=0.1)
    for _ in range(3):
        opt.step(lambda: loss_func(model(X), y))
    assert len(calls) == 3  # the closure's forward is the extraction's forward


def test_step_returns_the_closures_loss():
    model = _mlp()
    loss_func = nn.CrossEntropyLoss()
    X, y = _data()
    opt = ck.optim.KFAC(model, loss_func, lr=0.1)
    before = loss_func(model(X), y).item()
    # what the closure returns is the loss (here with a constant the loss module never sees)
    assert opt.step(lambda: loss_func(model(X), y) + 5.0).item() == pytest.approx(before + 5.0)
    assert opt.step(lambda: loss_func(model(X), y)).item() < before


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(structure="tridiagonal", factor_dtype=torch.float32), 1e-6),
        (dict(structure="tridiagonal", factor_dtype=torch.float64), 1e-8),
        (dict(structure="tridiagonal"), 1e-8),  # float64 model: float64 factors
        (dict(), 1e-8),
        (dict(structure="tridiagonal", min_damping=1e-9), 1e-9),
    ],
    ids=["tri-float32", "tri-float64", "tri-default-float64-model", "block", "explicit"],
)
def test_default_damping_floor(options, expected):
    opt = ck.optim.KFAC(_mlp(), nn.CrossEntropyLoss(), **options)
    assert opt.min_damping == expected
