"""Extraction on outputs with extra dimensions: ``[N, V, T]`` logits, ``[N, T, C]`` regression.

References are dense float64 autograd: the Jacobian of the whole output ``[*f.shape, D]``
and the Hessian / gradient of the loss the user wrote with respect to the whole output,
so every normalisation (PyTorch's mean over ``N*T`` positions, over all entries for
MSE, over the counted positions with ``ignore_index``) comes from PyTorch itself. The
Kronecker factors are compared with curvlinops' ``KFACLinearOperator``, which flattens
``[N, C, T]`` to ``[N*T, C]`` (cross-entropy) and ``[N, T, C]`` to ``[N*T, C]``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvkit.errors import ConfigError, ShapeError
from curvkit.extraction import extract
from curvkit.extraction.losses import make_loss_handler
from tests.extraction.graph_models import TinyGPT
from tests.reference import assert_allclose_report, curvlinops_kron_blocks, kron_block

DT = torch.float64
N, T, V = 3, 4, 5


class SeqLM(nn.Module):
    """Tiny decoder (embeddings, causal attention, MLP, head) returning logits ``[N, V, T]``."""

    def __init__(self):
        super().__init__()
        self.gpt = TinyGPT(vocab=V, d=4, T=T)

    def forward(self, idx):
        n, t = idx.shape
        return self.gpt(idx).reshape(n, t, -1).transpose(1, 2)


class TokenNet(nn.Module):
    """Per-token regression ``[N, T, d] -> [N, T, C]`` with a mixing layer over the tokens."""

    def __init__(self, c_out: int = 3, mix: bool = True):
        super().__init__()
        self.mix = mix
        self.l1 = nn.Linear(2, 4)
        self.l2 = nn.Linear(4, c_out)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.mix:
            h = h + h.cumsum(1)  # position t sees the positions before it
        return self.l2(h)


def lm_problem(reduction="mean", ignore=False, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = SeqLM().to(DT).eval()
    X = torch.randint(0, V, (N, T), generator=gen)
    y = torch.randint(0, V, (N, T), generator=gen)
    if ignore:
        y[0, 1] = y[2, 3] = -100
    return model, nn.CrossEntropyLoss(reduction=reduction), X, y


def token_problem(loss="mse", reduction="mean", mix=True, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = TokenNet(mix=mix).to(DT)
    X = torch.randn(N, T, 2, generator=gen, dtype=DT)
    if loss == "mse":
        return (
            model,
            nn.MSELoss(reduction=reduction),
            X,
            torch.randn(N, T, 3, generator=gen, dtype=DT),
        )
    y = torch.rand(N, T, 3, generator=gen, dtype=DT)
    return model, nn.BCEWithLogitsLoss(reduction=reduction), X, y


# -- dense references -----------------------------------------------------------------


def _flat(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().flatten() for _, p in named])
    sizes, shapes, names = [p.numel() for _, p in named], [p.shape for _, p in named], None
    names = [n for n, _ in named]

    def out(t, X):
        ps = {n: v.reshape(s) for n, v, s in zip(names, t.split(sizes), shapes)}
        return functional_call(model, ps, (X,))

    return theta, out, [p for _, p in named]


def references(model, loss_func, X, y):
    """Dense GGN, per-example gradients ``[N, D]`` (of ``L``) and ``R``."""
    theta, out, params = _flat(model)
    f = out(theta, X).detach()
    J = jacrev(lambda t: out(t, X))(theta).reshape(f.shape[0], -1, theta.numel())
    H = hessian(lambda g: loss_func(g, y))(f).reshape(f.numel(), f.numel())
    g = torch.func.grad(lambda g: loss_func(g, y))(f).reshape(f.shape[0], -1)
    Jf = J.reshape(-1, theta.numel())
    ggn = Jf.T @ H @ Jf
    per_example = torch.einsum("ne,ned->nd", g, J)
    R = 1.0 / f.shape[0] if loss_func.reduction == "mean" else 1.0
    return ggn, per_example, R, params


def _split(vec, params):
    return [v.reshape(p.shape) for v, p in zip(vec.split([p.numel() for p in params]), params)]


def _check_per_example(rec, model, loss_func, X, y, kinds):
    ggn, pe, R, params = references(model, loss_func, X, y)
    ids = {id(p): i for i, p in enumerate(params)}
    offs = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for r in rec:
        for j, p in enumerate(r.params):
            i = ids[id(p)]
            sl = slice(int(offs[i]), int(offs[i + 1]))
            if "diag_ggn" in kinds:
                want = ggn.diagonal()[sl].reshape(p.shape)
                assert_allclose_report(r.diag_ggn[j], want, 1e-10, 1e-13, f"{r.name} diag_ggn")
            if "batch_grad" in kinds:
                want = pe[:, sl].reshape(-1, *p.shape)
                assert_allclose_report(r.batch_grad[j], want, 1e-10, 1e-13, f"{r.name} batch_grad")
            assert_allclose_report(p.grad, pe[:, sl].sum(0).reshape(p.shape), 1e-10, 1e-13, "grad")
    return ggn, pe, R, params


# -- loss handler ---------------------------------------------------------------------


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_rows_match_autograd(reduction, ignore):
    """Gradient and block square root of the K-dimensional cross-entropy vs autograd."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(N, V, T, 2, generator=gen, dtype=DT)
    y = torch.randint(0, V, (N, T, 2), generator=gen)
    if ignore:
        y[1, 2, 0] = -100
    loss_func = nn.CrossEntropyLoss(reduction=reduction)
    h = make_loss_handler(loss_func, f, y)
    assert (h.N, h.T, h.C) == (N, 2 * T, V)
    R = 1.0 / N if reduction == "mean" else 1.0
    assert h.R == R
    assert_allclose_report(h.grad(), torch.func.grad(lambda g: loss_func(g, y))(f), 1e-12, 1e-14)
    H = hessian(lambda g: loss_func(g, y))(f).reshape(f.numel(), f.numel())
    # per example n: Lambda_n = (1/R) * d^2 L / d f_n^2, block square root exact
    S = h.sqrt_hessian_blocks()  # [T*C, *f.shape]
    assert S.shape == (2 * T * V, *f.shape)
    S = S.reshape(S.shape[0], N, -1)
    for n in range(N):
        D = S.shape[-1]
        want = H[n * D : (n + 1) * D, n * D : (n + 1) * D] / R
        assert_allclose_report(S[:, n].T @ S[:, n], want, 1e-10, 1e-13, f"Lambda_{n}")
    # shared rows: the same columns, all positions at once
    shared = h.sqrt_hessian()
    assert_allclose_report(shared, h.sqrt_hessian_blocks().reshape(2 * T, V, *f.shape).sum(0))


@pytest.mark.parametrize("loss", [nn.MSELoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elementwise_rows_match_autograd(loss, reduction):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(N, T, 2, 3, generator=gen, dtype=DT)
    y = torch.rand(N, T, 2, 3, generator=gen, dtype=DT)
    loss_func = loss(reduction=reduction)
    h = make_loss_handler(loss_func, f, y)
    assert (h.N, h.T, h.C) == (N, 2 * T, 3)
    R = 1.0 / N if reduction == "mean" else 1.0
    assert_allclose_report(h.grad(), torch.func.grad(lambda g: loss_func(g, y))(f), 1e-12, 1e-14)
    H = hessian(lambda g: loss_func(g, y))(f).reshape(N, f[0].numel(), N, f[0].numel())
    S = h.sqrt_hessian_blocks().reshape(-1, N, f[0].numel())
    for n in range(N):
        assert_allclose_report(S[:, n].T @ S[:, n], H[n, :, n] / R, 1e-10, 1e-13)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_monte_carlo_rows_are_unbiased_and_follow_curvlinops_draws(loss):
    """Expectation = block Lambda_n; labels are curvlinops' draws on the flattened output."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, V, T, generator=gen, dtype=DT)
    if loss == "ce":
        lf, y = nn.CrossEntropyLoss(), torch.randint(0, V, (2, T), generator=gen)
    else:
        f = f.transpose(1, 2).contiguous()
        lf = nn.MSELoss() if loss == "mse" else nn.BCEWithLogitsLoss()
        y = torch.rand(f.shape, generator=gen, dtype=DT)
    h = make_loss_handler(lf, f, y)
    M = 20000
    S = h.sqrt_hessian_sampled(M, torch.Generator().manual_seed(3)).reshape(M, 2, -1)
    B = h.sqrt_hessian_blocks().reshape(-1, 2, S.shape[-1])
    for n in range(2):
        lam = B[:, n].T @ B[:, n]
        est = S[:, n].T @ S[:, n]
        err = float((est - lam).norm() / lam.norm())
        assert err < 0.05, f"example {n}: relative error {err:.3f}"
    if loss == "ce":  # the draw: multinomial over the [N*T, C] rows, as curvlinops
        g = torch.Generator().manual_seed(5)
        labels = h.probs.reshape(-1, V).multinomial(4, replacement=True, generator=g).T
        from curvkit.extraction.losses import sample_labels

        ours = sample_labels(lf, f, 4, torch.Generator().manual_seed(5))
        assert torch.equal(ours, labels.reshape(4, 2, T))


def test_handler_errors():
    f = torch.randn(N, V, T, dtype=DT)
    lf = nn.CrossEntropyLoss()
    with pytest.raises(Exception, match=r"targets y must be an integer tensor of shape \(3, 4\)"):
        make_loss_handler(lf, f, torch.zeros(N, T + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"class indices in \[0, 5\)"):
        make_loss_handler(lf, f, torch.full((N, T), 5))
    with pytest.raises(ConfigError, match="every target in y equals ignore_index=7"):
        make_loss_handler(nn.CrossEntropyLoss(ignore_index=7), f, torch.full((N, T), 7))
    h = make_loss_handler(
        nn.CrossEntropyLoss(reduction="sum", ignore_index=7), f, torch.full((N, T), 7)
    )
    assert float(h.grad().abs().max()) == 0.0
    with pytest.raises(ShapeError, match="targets shaped like"):
        make_loss_handler(nn.MSELoss(), f, f[..., :2])
    with pytest.raises(ShapeError, match="KFRA"):
        make_loss_handler(lf, f, torch.zeros(N, T, dtype=torch.long)).hessian_mean()


# -- graph path against dense references ------------------------------------------------


@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore_index"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_language_model_per_example_quantities(reduction, ignore):
    model, lf, X, y = lm_problem(reduction, ignore)
    q = ("batch_grad", "diag_ggn", "empirical", "kflr")
    rec = extract(model, lf, X, y, q)
    assert rec.batch_size == N and rec.reduction_factor == (1 / N if reduction == "mean" else 1)
    assert torch.allclose(rec.loss, lf(model(X), y))
    _check_per_example(rec, model, lf, X, y, q)
    head = {r.name: r for r in rec}["gpt.head"]
    assert head.A.shape[0] == head.in_features + 1 and head.G["kflr"].shape == (V, V)


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_regression_per_example_quantities(loss, reduction):
    model, lf, X, y = token_problem(loss, reduction)
    q = ("batch_grad", "diag_ggn")
    rec = extract(model, lf, X, y, q)
    assert rec.batch_size == N
    _check_per_example(rec, model, lf, X, y, q)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kflr_exact_for_per_token_linear_with_mse(reduction):
    """One Linear applied per token, MSE: K-FAC-expand with the shared rows is the GGN block."""
    model, lf, X, y = token_problem("mse", reduction, mix=False)
    model.l1.requires_grad_(False)
    rec = extract(model, lf, X, y, ("kflr",))
    ggn, _, _, _ = references(model, lf, X, y)
    (r,) = list(rec)
    w = model.l2.weight
    idx = []
    for o in range(w.shape[0]):
        idx += [o * w.shape[1] + k for k in range(w.shape[1])] + [w.numel() + o]
    idx = torch.tensor(idx)
    assert_allclose_report(kron_block(r.G["kflr"], r.A), ggn[idx][:, idx], 1e-10, 1e-13)


def test_monte_carlo_diagonal_estimates_the_ggn_diagonal():
    model, lf, X, y = lm_problem()
    rec = extract(model, lf, X, y, ("diag_ggn", "diag_ggn_mc"), mc_samples=3000,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    for r in rec:
        for a, b in zip(r.diag_ggn_mc, r.diag_ggn):
            err = float((a - b).norm() / b.norm().clamp_min(1e-12))
            assert err < 0.15, f"{r.name}: relative error {err:.3f}"


def test_unflattened_equals_flattened_for_kronecker_factors():
    """``[N, V, T]`` with targets ``[N, T]`` and ``[N*T, V]`` with ``[N*T]``: equal products."""
    model, lf, X, y = lm_problem()
    q = ("kfac", "kflr", "empirical", "batch_grad")
    kw = {"mc_samples": 2}
    rec = extract(model, lf, X, y, q, generator=torch.Generator().manual_seed(0), **kw)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    flat = extract(
        model.gpt, lf, X, y.flatten(), q, generator=torch.Generator().manual_seed(0), **kw
    )
    for a, b in zip(rec, flat):
        for kind in ("kfac", "kflr"):
            if a.A is None:
                continue
            assert_allclose_report(kron_block(a.G[kind], a.A), kron_block(b.G[kind], b.A),
                                   1e-10, 1e-13, f"{a.name} {kind}")  # fmt: skip
        for ga, gb in zip(a.batch_grad, b.batch_grad):
            assert_allclose_report(ga, gb, 1e-10, 1e-14)
    for g, p in zip(grads, model.parameters()):
        assert_allclose_report(g, p.grad, 1e-10, 1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_language_model_kronecker_factors_match_curvlinops(approx, reduction):
    """Type-2 K-FAC equals curvlinops' on ``[N, V, T]``; the empirical one is ``1/T`` of it."""
    model, lf, X, y = lm_problem(reduction)
    rec = extract(model, lf, X, y, ("kflr", "empirical"), kfac_approx=approx)
    linear = [r for r in rec if isinstance(r.module, nn.Linear)]
    assert len(linear) == 6
    for fisher_type, kind in (("type-2", "kflr"), ("empirical", "empirical")):
        blocks = curvlinops_kron_blocks(model, lf, X, y, linear, fisher_type, approx)
        # curvlinops' empirical gradients are of the loss averaged over the batch only
        scale = T if (kind == "empirical" and reduction == "mean") else 1.0
        for r, block in zip(linear, blocks):
            ours = kron_block(r.G[kind], r.A) * scale
            assert_allclose_report(ours, block, 1e-10, 1e-13, f"{r.name} {kind} {approx}")


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_token_regression_kronecker_factors_match_curvlinops(loss):
    model, lf, X, y = token_problem(loss, "mean")
    if loss == "bce":
        y = (y > 0.5).to(DT)
    rec = extract(model, lf, X, y, ("kflr", "empirical"))
    linear = list(rec)
    for fisher_type, kind in (("type-2", "kflr"), ("empirical", "empirical")):
        blocks = curvlinops_kron_blocks(model, lf, X, y, linear, fisher_type, "expand")
        scale = T * 3 if kind == "empirical" else 1.0
        for r, block in zip(linear, blocks):
            ours = kron_block(r.G[kind], r.A) * scale
            assert_allclose_report(ours, block, 1e-10, 1e-13, f"{r.name} {kind}")


def test_monte_carlo_factors_agree_with_curvlinops_mc():
    model, lf, X, y = lm_problem()
    M = 3000
    rec = extract(model, lf, X, y, ("kfac",), mc_samples=M,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    linear = [r for r in rec if isinstance(r.module, nn.Linear)]
    blocks = curvlinops_kron_blocks(model, lf, X, y, linear, "mc", "expand", mc_samples=M)
    for r, block in zip(linear, blocks):
        ours = kron_block(r.G["kfac"], r.A)
        rel = float((ours - block).norm() / block.norm())
        assert rel < 0.1, f"{r.name}: relative difference {rel:.3f} with {M} samples each"


# -- the sweep --------------------------------------------------------------------------


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, V, 1)).to(DT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sweep_conv1d_sequence_cross_entropy(reduction):
    """``[N, C, L]`` logits of a Conv1d chain on the sweep: diagonals exact, equal to the graph."""
    model = _conv_model()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, 2, T, generator=gen, dtype=DT)
    y = torch.randint(0, V, (N, T), generator=gen)
    lf = nn.CrossEntropyLoss(reduction=reduction)
    q = ("batch_grad", "diag_ggn", "diag_hessian", "kflr", "empirical", "kfac")
    rec = extract(model, lf, X, y, q, backend="sweep", generator=torch.Generator().manual_seed(0))
    ggn, _, _, _ = _check_per_example(rec, model, lf, X, y, ("batch_grad", "diag_ggn"))
    theta, out, params = _flat(model)
    H = hessian(lambda t: lf(out(t, X), y))(theta)
    offs = 0
    for r in rec:
        for j, p in enumerate(r.params):
            want = H.diagonal()[offs : offs + p.numel()].reshape(p.shape)
            assert_allclose_report(r.diag_hessian[j], want, 1e-10, 1e-13, f"{r.name} diag_h")
            offs += p.numel()
    model.zero_grad()
    q2 = tuple(k for k in q if k != "diag_hessian")
    graph = extract(model, lf, X, y, q2, backend="graph",
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    for a, b in zip(rec, graph):
        for kind in ("kflr", "empirical", "kfac"):
            assert_allclose_report(kron_block(a.G[kind], a.A), kron_block(b.G[kind], b.A),
                                   1e-10, 1e-13, f"{a.name} {kind}")  # fmt: skip
        for da, db in zip(a.diag_ggn, b.diag_ggn):
            assert_allclose_report(da, db, 1e-10, 1e-14)


def test_sequence_output_errors():
    model, lf, X, y = lm_problem()
    with pytest.raises(ShapeError, match="N = len"):
        extract(model, lf, X, y[:2])
    with pytest.raises(Exception, match="targets"):
        extract(model, lf, X, y[:, :2])


@pytest.mark.parametrize("loss", [nn.MSELoss, nn.BCEWithLogitsLoss])
def test_sweep_conv1d_elementwise_losses(loss):
    """``[N, C, L]`` outputs with MSE/BCE on the sweep (the last dimension holds the entries)."""
    model = _conv_model()
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(N, 2, T, generator=gen, dtype=DT)
    y = torch.rand(N, V, T, generator=gen, dtype=DT)
    lf = loss()
    q = ("batch_grad", "diag_ggn")
    rec = extract(model, lf, X, y, q, backend="sweep")
    _check_per_example(rec, model, lf, X, y, q)


def test_backpack_backend_refuses_extra_dimensions():
    model = _conv_model()
    X = torch.randn(N, 2, T, dtype=DT)
    y = torch.randint(0, V, (N, T))
    with pytest.raises(ShapeError, match="BackPACK backend needs a model output"):
        extract(model, nn.CrossEntropyLoss(), X, y, ("kflr",), backend="backpack")
