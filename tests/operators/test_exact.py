"""Exact curvature operators against independent float64 references.

References: ``torch.func.hessian`` of the loss on the flat parameters (Hessian),
a brute-force ``J^T Lambda J`` with ``torch.func.jacrev`` (GGN), per-example
gradient loops (empirical and Monte Carlo Fisher with the same sampled labels),
and curvlinops' operators.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from torch import nn
from torch.func import functional_call

import curvkit as ck
from curvkit.errors import ShapeError, UnsupportedLossError
from curvkit.operators.exact import loss_and_gradient
from tests.cases import LOSSES, REDUCTIONS  # noqa: E402  (the shared case table)


def assert_close(actual, expected, rtol=1e-10):
    """Entry-wise comparison scaled by the largest reference entry (reports the worst entry)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


# -- references ---------------------------------------------------------------------


def _flat(case):
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in case.params]
    theta = torch.cat([p.detach().flatten() for p in case.params])

    def unflatten(t):
        return dict(
            zip(names, (c.reshape(s) for c, s in zip(t.split([s.numel() for s in shapes]), shapes)))
        )

    return theta, unflatten


def _flat_loss(case):
    theta, unflatten = _flat(case)
    return theta, lambda t: case.loss_func(
        functional_call(case.model, unflatten(t), (case.X,)), case.y
    )


def ref_hessian(case):
    """``torch.func.hessian`` (forward-over-reverse) of the loss on the flat parameters."""
    theta, loss = _flat_loss(case)
    return torch.func.hessian(loss)(theta)


def ref_hessian_autograd(case):
    """``torch.autograd.functional.hessian`` (reverse-over-reverse, plain autograd)."""
    theta, loss = _flat_loss(case)
    return torch.autograd.functional.hessian(loss, theta)


def ref_hessian_finite_differences(case, h=1e-5):
    """Central differences of the autograd gradient, column by column."""
    theta, loss = _flat_loss(case)
    grad = torch.func.grad(loss)
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    return torch.stack([(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in eye], dim=1)


#: Models with LayerNorm: torch.func's second derivatives of ``layer_norm`` with an
#: affine weight are wrong in torch 2.13 (the block d/d(input params) of the weight
#: gradient; both forward-over-reverse and reverse-over-reverse), and with them
#: curvlinops' HessianLinearOperator. Plain autograd double backward is right
#: (checked against finite differences below).
FUNC_HESSIAN_BROKEN = {"norm_res"}


def ref_ggn(case):
    theta, unflatten = _flat(case)

    def out(t):
        return functional_call(case.model, unflatten(t), (case.X,))

    J = torch.func.jacrev(out)(theta).reshape(-1, theta.numel())
    f = out(theta).detach()
    lam = torch.func.hessian(lambda g: case.loss_func(g, case.y))(f).reshape(f.numel(), f.numel())
    return J.T @ lam @ J


def nll_sum(loss_func, f, y):
    """Sum of per-term negative log-likelihoods (MSE: ``(f - y)^2``) of one example."""
    return type(loss_func)(reduction="sum")(f, y)


def term_scale(case):
    """``c``: 1/N (cross-entropy) or 1/(N C) (MSE, BCE) for "mean", 1 for "sum"."""
    if case.loss_func.reduction == "sum":
        return 1.0
    per = 1 if isinstance(case.loss_func, nn.CrossEntropyLoss) else case.model(case.X).shape[1]
    return 1.0 / (case.X.shape[0] * per)


def per_example_outer(case, labels, loss_func=None):
    """``sum_n sum_m g g^T``, ``g`` the gradient of ``loss_func(f(x_n), labels[m][n])``.

    ``loss_func`` defaults to the summed negative log-likelihood :func:`nll_sum`.
    """
    D = sum(p.numel() for p in case.params)
    out = torch.zeros(D, D, dtype=case.X.dtype, device=case.X.device)
    loss_func = loss_func or (lambda f, y: nll_sum(case.loss_func, f, y))
    for lab in labels:
        for n in range(case.X.shape[0]):
            loss = loss_func(case.model(case.X[n : n + 1]), lab[n : n + 1])
            g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, case.params)])
            out += torch.outer(g, g)
    return out


def curvlinops_dense(cls, case, **kwargs):
    D = sum(p.numel() for p in case.params)
    op = cls(
        case.model, case.loss_func, case.params, case.batches, check_deterministic=False, **kwargs
    )
    return op @ torch.eye(D, dtype=case.X.dtype, device=case.X.device)


# -- dense comparisons ----------------------------------------------------------------


def test_hessian_matches_functorch_and_curvlinops(case):
    """Every case of the table (``case`` fixture: model x loss x reduction x device)."""
    H = ck.hessian(case.model, case.loss_func, case.batches).to_dense()
    if case.model_name in FUNC_HESSIAN_BROKEN:
        assert_close(H, ref_hessian_autograd(case))
    else:
        assert_close(H, ref_hessian(case))
        assert_close(H, curvlinops_dense(HessianLinearOperator, case))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_hessian_with_layer_norm_matches_finite_differences(loss_name, make_case):
    case = make_case("norm_res", loss_name, "mean")
    H = ck.hessian(case.model, case.loss_func, case.batches).to_dense()
    assert_close(H, ref_hessian_finite_differences(case), rtol=1e-6)


def test_ggn_and_type2_fisher_match_jacobian_reference(case):
    ref = ref_ggn(case)
    assert_close(ck.ggn(case.model, case.loss_func, case.batches).to_dense(), ref)
    assert_close(ck.fisher(case.model, case.loss_func, case.batches).to_dense(), ref)
    assert_close(curvlinops_dense(GGNLinearOperator, case), ref)


def test_empirical_fisher_matches_per_example_loop_and_curvlinops(case):
    E = ck.empirical_fisher(case.model, case.loss_func, case.batches).to_dense()
    # docs/conventions.md: R sum_n grad l_n grad l_n^T, l_n the user's loss on example n alone
    R = 1.0 / case.X.shape[0] if case.reduction == "mean" else 1.0
    assert_close(E, R * per_example_outer(case, [case.y], case.loss_func))
    # curvlinops sums the likelihood over outputs and keeps the mean's 1/C as a scale
    C = case.y.shape[1] if case.loss_name != "ce" and case.reduction == "mean" else 1
    assert_close(C * E, curvlinops_dense(EFLinearOperator, case))


@pytest.mark.parametrize(
    "loss_func",
    [nn.CrossEntropyLoss(label_smoothing=0.1), nn.HuberLoss(delta=0.5, reduction="sum")],
    ids=["ce-label-smoothing", "huber-sum"],
)
def test_empirical_fisher_of_other_losses(loss_func, make_case):
    case = make_case("mlp", "ce" if isinstance(loss_func, nn.CrossEntropyLoss) else "mse", "mean")
    E = ck.empirical_fisher(case.model, loss_func, case.batches).to_dense()
    R = 1.0 / case.X.shape[0] if loss_func.reduction == "mean" else 1.0
    assert_close(E, R * per_example_outer(case, [case.y], loss_func))


def _replay_labels(case, mc_samples, seed):
    """Labels drawn with the generator calls of the Monte Carlo Fisher, batch after batch."""
    gen = torch.Generator(device=case.X.device).manual_seed(seed)
    labels = []
    with torch.no_grad():
        for X, _ in case.batches:
            f = case.model(X)
            if isinstance(case.loss_func, nn.MSELoss):
                zeros = torch.zeros(mc_samples, *f.shape, dtype=f.dtype, device=f.device)
                eps = torch.normal(
                    zeros, torch.as_tensor(math.sqrt(0.5), device=f.device), generator=gen
                )
                labels.append(f - eps)  # y ~ N(f, 1/2)
            elif isinstance(case.loss_func, nn.CrossEntropyLoss):
                labels.append(
                    f.softmax(1).multinomial(mc_samples, replacement=True, generator=gen).T
                )
            else:
                p = f.sigmoid().unsqueeze(0).expand(mc_samples, *f.shape)
                labels.append(p.bernoulli(generator=gen))
    return [torch.cat([lab[m] for lab in labels]) for m in range(mc_samples)]


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("model_name", ["mlp", "norm_res"])
def test_mc_fisher_matches_loop_with_same_labels_and_curvlinops(
    model_name, reduction, loss_name, device, make_case
):
    case = make_case(model_name, loss_name, reduction, device)
    M, seed = 3, 17
    F = ck.fisher(case.model, case.loss_func, case.batches, mc_samples=M, seed=seed).to_dense()
    labels = _replay_labels(case, M, seed)
    assert_close(F, term_scale(case) / M * per_example_outer(case, labels))
    assert_close(F, curvlinops_dense(FisherMCLinearOperator, case, mc_samples=M, seed=seed))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_mc_fisher_converges_to_ggn(loss_name, make_case):
    case = make_case("mlp", loss_name, "mean")
    G = ck.ggn(case.model, case.loss_func, case.batches).to_dense()
    errors = []
    for M in (4, 4096):
        F = ck.fisher(case.model, case.loss_func, case.batches, mc_samples=M, seed=3).to_dense()
        errors.append(((F - G).norm() / G.norm()).item())
    assert errors[1] < 0.05, errors
    assert errors[1] < errors[0] / 8, errors  # error ~ 1/sqrt(M): expected ratio 32


def test_mc_fisher_is_reproducible_and_seeded(make_case):
    case = make_case("mlp", "ce", "mean")
    F = ck.fisher(case.model, case.loss_func, case.batches, mc_samples=2, seed=5)
    v = torch.randn(F.dim, dtype=torch.float64)
    assert torch.equal(F @ v, F @ v)
    V = torch.stack([v, 2 * v], dim=1)
    assert_close(F @ V, torch.stack([F @ v, 2 * (F @ v)], dim=1))
    other = ck.fisher(case.model, case.loss_func, case.batches, mc_samples=2, seed=6)
    assert not torch.allclose(other @ v, F @ v)


@pytest.mark.parametrize(
    "loss_func",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(
            weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), reduction="sum"
        ),
        nn.HuberLoss(delta=0.5),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)),
    ],
    ids=["ce-label-smoothing", "ce-class-weights-sum", "huber", "bce-pos-weight"],
)
def test_ggn_of_other_losses_uses_autograd_output_hessian(loss_func, make_case):
    name = "ce" if isinstance(loss_func, nn.CrossEntropyLoss) else "bce"
    case = make_case("mlp", name, "mean")
    case.loss_func = loss_func
    G = ck.ggn(case.model, loss_func, case.batches).to_dense()
    ref = ref_ggn(case)
    assert ref.abs().max() > 0
    assert_close(G, ref)


def test_cross_entropy_ignore_index_matches_reference(make_case):
    case = make_case("mlp", "ce", "mean")
    case.y = case.y.clone()
    case.y[1] = -100
    case.batches = [(case.X, case.y)]
    assert_close(ck.ggn(case.model, case.loss_func, case.batches).to_dense(), ref_ggn(case))


# -- products, export, batching ---------------------------------------------------------

OPERATORS = {
    "hessian": lambda c: ck.hessian(c.model, c.loss_func, c.batches),
    "ggn": lambda c: ck.ggn(c.model, c.loss_func, c.batches),
    "fisher_mc": lambda c: ck.fisher(c.model, c.loss_func, c.batches, mc_samples=2, seed=1),
    "empirical_fisher": lambda c: ck.empirical_fisher(c.model, c.loss_func, c.batches),
}


@pytest.mark.parametrize("op_name", OPERATORS)
def test_product_forms_agree_and_operator_is_symmetric(op_name, device, make_case):
    case = make_case("cnn", "ce", "mean", device)
    op = OPERATORS[op_name](case)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(op.dim, 3, generator=gen, dtype=torch.float64).to(device)
    AV = op @ V
    for j in range(3):
        assert_close(op @ V[:, j], AV[:, j])
    as_list = [t.reshape(*s) for t, s in zip(V[:, 0].split(op.param_numels), op.param_shapes)]
    assert_close(torch.cat([t.flatten() for t in op @ as_list]), AV[:, 0])
    as_list_k = [t.reshape(*s, 3) for t, s in zip(V.split(op.param_numels), op.param_shapes)]
    out_k = op @ as_list_k
    assert [t.shape for t in out_k] == [torch.Size([*s, 3]) for s in op.param_shapes]
    assert_close(torch.cat([t.reshape(-1, 3) for t in out_k]), AV)
    scipy_out = op.to_scipy() @ V[:, 0].cpu().numpy()
    np.testing.assert_allclose(scipy_out, AV[:, 0].cpu().numpy(), rtol=1e-10, atol=1e-12)
    dense = op.to_dense()
    assert_close(dense, dense.T)
    assert dense.device.type == device.type and dense.dtype == torch.float64


@pytest.mark.parametrize("op_name", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batches_equal_concatenation(op_name, reduction, make_case):
    case = make_case("mlp", "mse", reduction, num=6, splits=(1, 2, 3))
    split = OPERATORS[op_name](case).to_dense()
    case.batches = [(case.X, case.y)]
    assert_close(split, OPERATORS[op_name](case).to_dense())


def test_loss_and_gradient_match_full_batch(make_case):
    case = make_case("norm_res", "ce", "mean")
    loss, grad = loss_and_gradient(case.model, case.loss_func, case.batches)
    full = case.loss_func(case.model(case.X), case.y)
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(full, case.params)])
    assert_close(loss, full.detach())
    assert_close(grad, ref)
    op_loss, op_grad = ck.ggn(case.model, case.loss_func, case.batches).loss_and_gradient()
    assert_close(op_grad, ref)
    assert_close(op_loss, full.detach())


@pytest.mark.parametrize("op_name", OPERATORS)
def test_float32_agrees_with_float64(op_name, make_case):
    case64 = make_case("mlp", "ce", "mean")
    case32 = make_case("mlp", "ce", "mean", dtype=torch.float32)
    op32 = OPERATORS[op_name](case32)
    A32 = op32.to_dense()
    assert A32.dtype == torch.float32 and op32.dtype == torch.float32
    A64 = OPERATORS[op_name](case64).to_dense()
    torch.testing.assert_close(A32.double(), A64, rtol=1e-4, atol=1e-5 * A64.abs().max().item())


def test_products_work_under_no_grad(make_case):
    case = make_case("mlp", "mse", "mean")
    v = torch.randn(43, dtype=torch.float64)
    H = ck.hessian(case.model, case.loss_func, case.batches)
    G = ck.ggn(case.model, case.loss_func, case.batches)
    expected = H @ v, G @ v
    with torch.no_grad():
        assert_close(H @ v, expected[0])
        assert_close(G @ v, expected[1])


def test_blocks_by_layer_and_by_param(make_case):
    case = make_case("norm_res", "mse", "mean")
    by_layer = ck.ggn(case.model, case.loss_func, case.batches)
    assert by_layer.block_names == ["inp", "bn", "block", "ln", "out"]
    assert by_layer.block_sizes == [30, 12, 42, 12, 21]
    by_param = ck.ggn(case.model, case.loss_func, case.batches, blocks="param")
    assert by_param.block_names == [n for n, _ in case.model.named_parameters()]
    assert by_param.block_sizes == [p.numel() for p in case.params]


def test_blocks_of_a_root_module():
    model = nn.Linear(3, 2).double()
    data = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    assert ck.hessian(model, nn.MSELoss(), data).block_names == [""]
    assert ck.hessian(model, nn.MSELoss(), data, blocks="param").block_names == ["weight", "bias"]


def test_params_subset(make_case):
    case = make_case("mlp", "ce", "sum")
    sub = [case.model[2].weight]
    H = ck.hessian(case.model, case.loss_func, case.batches, params=sub).to_dense()
    full = ref_hessian(case)
    start = 25  # 0.weight (20) + 0.bias (5)
    assert_close(H, full[start : start + 15, start : start + 15])


@pytest.mark.parametrize("op_name", OPERATORS)
def test_quadratic_form_equals_dense(op_name, case):
    # Gauss-Newton forms by forward-mode products only, the Hessian by the generic
    # X^T (M X); several batches (the table's cases hold 6 examples in batches of 2 and 4)
    device = case.X.device
    op = OPERATORS[op_name](case)
    V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = op.to_dense()
    matvecs = op.matvecs
    Q = op.quadratic_form(V.to(device))
    assert op.matvecs == matvecs + 3
    assert Q.shape == (3, 3) and Q.device.type == device.type
    assert_close(Q, V.to(device).T @ dense @ V.to(device))
    with pytest.raises(ShapeError, match=r"expected a \[\d+, k\] matrix"):
        op.quadratic_form(V[:-1])


# -- models used with BackPACK ------------------------------------------------------------


@pytest.mark.parametrize("op_name", OPERATORS)
def test_backpack_extended_model_gives_same_products(op_name, make_case):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    case = make_case("cnn", "ce", "mean")
    plain = OPERATORS[op_name](case).to_dense()
    extended = copy.deepcopy(case)
    extend(extended.model)
    extended.loss_func = extend(extended.loss_func)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = extended.loss_func(extended.model(extended.X), extended.y)
        with backpack(DiagGGNExact()):
            loss.backward()
        V = torch.randn(plain.shape[0], 4, dtype=torch.float64)
        op = OPERATORS[op_name](extended)
        assert_close(op.to_dense(), plain)
        assert_close(op @ V[:, 0], plain @ V[:, 0])
    # products leave no stored inputs/outputs (which would keep the graph alive)
    assert not any(hasattr(m, "input0") or hasattr(m, "output") for m in extended.model.modules())


def test_model_used_by_extraction_gives_same_products(make_case):
    case = make_case("mlp", "ce", "mean")
    before = {name: make(case).to_dense() for name, make in OPERATORS.items()}
    ck.extract(case.model, case.loss_func, case.X, case.y, quantities=("kflr", "batch_grad"))
    for name, make in OPERATORS.items():
        assert_close(make(case).to_dense(), before[name])


def test_no_dense_matrix_for_large_model():
    """D = 1.4M: a D x D matrix would need 8 TB; every product must still run."""
    torch.manual_seed(0)
    dims = [784, 1000, 500, 250, 30]
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    model = nn.Sequential(*layers[:-1])
    D = sum(p.numel() for p in model.parameters())
    assert D > 1.4e6
    data = (torch.randn(4, 784), torch.randint(0, 30, (4,)))
    v = torch.randn(D)
    lf = nn.CrossEntropyLoss()
    for make in (ck.hessian, ck.ggn, ck.empirical_fisher, lambda *a: ck.fisher(*a, mc_samples=1)):
        out = make(model, lf, data) @ v
        assert out.shape == (D,) and torch.isfinite(out).all()


# -- inverse ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_inverse_solves_damped_system(method, device, make_case):
    case = make_case("mlp", "ce", "mean", device)
    G = ck.ggn(case.model, case.loss_func, case.batches)
    b = torch.randn(G.dim, 2, dtype=torch.float64, device=device)
    A = G.to_dense() + 0.1 * torch.eye(G.dim, dtype=torch.float64, device=device)
    kwargs = {"tol": 1e-12} if method == "cg" else {}
    x = G.inverse(damping=0.1, method=method, **kwargs) @ b
    assert_close(x, torch.linalg.solve(A, b), rtol=1e-8)


# -- errors and warnings ----------------------------------------------------------------


def test_errors_name_the_problem(make_case):
    case = make_case("mlp", "mse", "mean")
    m, data = case.model, case.batches
    with pytest.raises(UnsupportedLossError, match="L1Loss"):
        ck.fisher(m, nn.L1Loss(), data)
    with pytest.raises(UnsupportedLossError, match="reduction='none'"):
        ck.empirical_fisher(m, nn.L1Loss(reduction="none"), data)
    with pytest.raises(UnsupportedLossError, match="label_smoothing"):
        ck.fisher(m, nn.CrossEntropyLoss(label_smoothing=0.1), data, mc_samples=1)
    with pytest.raises(UnsupportedLossError, match="reduction='none'"):
        ck.hessian(m, nn.MSELoss(reduction="none"), data)
    with pytest.raises(ShapeError, match="mc_samples"):
        ck.fisher(m, nn.MSELoss(), data, mc_samples=0)
    with pytest.raises(ShapeError, match=r"params\[0\]"):
        ck.ggn(m, nn.MSELoss(), data, params=[torch.zeros(3, requires_grad=True)])
    frozen = nn.Linear(2, 2).double().requires_grad_(False)
    with pytest.raises(ShapeError, match="requires_grad=False"):
        ck.ggn(frozen, nn.MSELoss(), data, params=[frozen.weight])
    with pytest.raises(ShapeError, match="blocks="):
        ck.ggn(m, nn.MSELoss(), data, blocks="module")
    with pytest.raises(ShapeError, match="method="):
        ck.ggn(m, nn.MSELoss(), data).inverse(1.0, method="cholesky")
    with pytest.raises(ShapeError, match="max_dim"):
        ck.ggn(m, nn.MSELoss(), data).inverse(1.0, method="dense", max_dim=10)


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "backward-hook"])
def test_training_mode_batchnorm_warns_and_uses_batch_statistics(hooked, make_case):
    """torch.func cannot update running statistics in place: forward-mode dual
    tensors take over, or (with a full backward hook, which dual tensors do not
    support) the double-vjp trick."""
    case = make_case("norm_res", "ce", "mean")
    case.model.train()
    case.batches = [(case.X, case.y)]
    # reference: the same batch-statistics forward pass without running statistics
    ref_case = copy.deepcopy(case)
    bn = ref_case.model.bn
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    if hooked:
        case.model.block.register_full_backward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        G = ck.ggn(case.model, case.loss_func, case.batches)
    dense = G.to_dense()
    assert_close(dense, ref_ggn(ref_case))
    v = torch.randn(G.dim, dtype=torch.float64)
    assert_close(G @ v, dense @ v)
    V = torch.randn(G.dim, 2, dtype=torch.float64)
    assert_close(G.quadratic_form(V), V.T @ dense @ V)


def test_training_mode_dropout_warns(make_case):
    case = make_case("mlp", "mse", "mean")
    model = nn.Sequential(case.model, nn.Dropout(0.1)).train()
    with pytest.warns(UserWarning, match="Dropout"):
        ck.ggn(model, case.loss_func, case.batches)
