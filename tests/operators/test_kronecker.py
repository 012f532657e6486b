"""Block-diagonal K-FAC: hand-built factors against dense Kronecker matrices."""

import math

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

import curvkit as ck
from curvkit.errors import ShapeError
from curvkit.operators.kronecker import (
    BlockDiagonalKFAC,
    KronEigenOperator,
    KronLayer,
    extract_batches,
)
from curvkit.records import LayerRecord, Records
from tests.reference import (
    DEVICES,
    assert_allclose_report,
    brute_force_factors,
    dense_ggn,
    joint_block,
    joint_permutation,
    kron_block,
    make_problem,
    mc_error_bound,
    param_layers,
)

DTYPE = torch.float64

# layer stacks for hand-built records (shapes only matter)
STACKS = {
    "mlp": lambda: [nn.Linear(4, 3), nn.Linear(3, 5, bias=False), nn.Linear(5, 2)],
    "one-layer": lambda: [nn.Linear(3, 2)],
    "conv-linear": lambda: [nn.Conv2d(2, 3, 2), nn.Linear(6, 2)],
}


def sampled_records(
    stack="mlp",
    n=9,
    separate_bias=False,
    reduction="mean",
    kinds=("kflr", "empirical"),
    seed=0,
    device="cpu",
    cross=True,
):
    """Records whose factors are built from random per-example samples, ``records.py`` style.

    Per example ``n`` and layer: inputs ``ā_n`` (homogeneous coordinate if joint),
    ``C = 2`` backpropagated vectors ``s_{n,c}`` per kind; for ``"empirical"`` one
    vector ``e_n`` whose per-example gradient ``e_n ā_nᵀ`` fills ``batch_grad``.
    Cross factors use the same samples, so the joint second moments are consistent.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = [m.to(DTYPE) for m in STACKS[stack]()]
    R = 1.0 / n if reduction == "mean" else 1.0
    abar, svec = [], []
    for m in modules:
        has_bias = m.bias is not None
        a = torch.randn(n, m.weight[0].numel(), generator=gen, dtype=DTYPE)
        if has_bias and not separate_bias:
            a = torch.cat([a, torch.ones(n, 1, dtype=DTYPE)], dim=1)
        abar.append(a)
        out = m.weight.shape[0]
        svec.append(
            {
                k: torch.randn(n, 1 if k == "empirical" else 2, out, generator=gen, dtype=DTYPE)
                for k in kinds
            }
        )
    layers = []
    for i, m in enumerate(modules):
        params = [p for p in m.parameters()]
        rec = LayerRecord(
            name=str(i),
            module=m,
            position=i,
            params=params,
            has_bias=m.bias is not None,
            separate_bias=separate_bias,
            bias_scale=R * n,
            A=(R * abar[i].T @ abar[i]).to(device),
            G={k: torch.einsum("nco,ncp->op", s, s).div(n).to(device) for k, s in svec[i].items()},
        )
        if "empirical" in kinds:
            e = svec[i]["empirical"][:, 0]  # [n, out]
            a = abar[i]
            if rec.joint:
                a = a[:, :-1]
            gw = R * torch.einsum("no,ni->noi", e, a).reshape(n, *m.weight.shape)
            rec.batch_grad = [gw.to(device)] + ([(R * e).to(device)] if rec.has_bias else [])
        if cross and i + 1 < len(modules) and isinstance(m, nn.Linear):
            rec.cross_A = (R * abar[i].T @ abar[i + 1]).to(device)
            rec.cross_G = {
                k: torch.einsum("nco,ncp->op", svec[i][k], svec[i + 1][k]).div(n).to(device)
                for k in kinds
            }
        elif i + 1 < len(modules):
            rec.cross_reason = f"layer {i} is a {type(m).__name__}"
        layers.append(rec)
    return Records(layers, torch.tensor(0.0), n, R)


def flat_block(rec, G, A):
    """Dense block of ``G ⊗ A`` in the layer's flat order ``[W.flatten(), b]``."""
    if rec.joint or not rec.has_bias:
        perm = joint_permutation(rec.out_features, rec.in_features, rec.joint)
        J = torch.kron(G, A)
        out = torch.zeros_like(J)
        out[perm[:, None], perm[None, :]] = J
        return out
    return torch.block_diag(torch.kron(G, A), G * rec.bias_scale)


def dense_blockdiag(records, kind, damp_factors=None):
    blocks = []
    for rec in records:
        G, A = rec.G[kind].cpu(), rec.A.cpu()
        if damp_factors is None:
            blocks.append(flat_block(rec, G, A))
            continue
        # factored Tikhonov of each Kronecker pair (bias pair: A = [[bias_scale]])
        pairs = [(G, A)] + (
            [(G, torch.tensor([[rec.bias_scale]], dtype=DTYPE))]
            if rec.has_bias and rec.separate_bias
            else []
        )
        damped = []
        for g, a in pairs:
            pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
            root = math.sqrt(damp_factors)
            damped.append(
                (
                    g + root / pi * torch.eye(g.shape[0], dtype=DTYPE),
                    a + pi * root * torch.eye(a.shape[0], dtype=DTYPE),
                )
            )
        if len(damped) == 1:
            blocks.append(flat_block(rec, *damped[0]))
        else:
            blocks.append(torch.block_diag(torch.kron(*damped[0]), torch.kron(*damped[1])))
    return torch.block_diag(*blocks)


CASES = {
    "mlp-joint": dict(stack="mlp"),
    "mlp-separate": dict(stack="mlp", separate_bias=True),
    "mlp-sum": dict(stack="mlp", reduction="sum"),
    "conv-joint": dict(stack="conv-linear"),
    "conv-separate": dict(stack="conv-linear", separate_bias=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_to_dense_is_kronecker_block_diagonal(case, device):
    records = sampled_records(device=device, **case)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    assert K.block_names == [r.name for r in records]
    assert K.block_sizes == [r.numel for r in records]
    assert K.device.type == torch.device(device).type
    assert_allclose_report(K.to_dense(), dense_blockdiag(records, "kflr"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_list_and_vector_products_agree(case):
    records = sampled_records(**case)
    K = BlockDiagonalKFAC.from_records(records, "empirical")
    gen = torch.Generator().manual_seed(3)
    vs = [torch.randn(*p.shape, generator=gen, dtype=DTYPE) for p in records.params]
    flat = torch.cat([v.flatten() for v in vs])
    Kv = K @ vs
    assert [t.shape for t in Kv] == [p.shape for p in records.params]
    assert_allclose_report(torch.cat([t.flatten() for t in Kv]), K @ flat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("damping", [1e-4, 0.1], ids=["lam1e-4", "lam0.1"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_exact_damped_inverse(case, damping, device):
    records = sampled_records(device=device, **case)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    Kd = K.to_dense()
    eye = torch.eye(K.dim, dtype=DTYPE, device=device)
    inv = K.inverse(damping=damping).to_dense()
    assert_allclose_report(inv @ (Kd + damping * eye), eye, rtol=0, atol=1e-8)
    expected = torch.logdet(Kd + damping * eye)
    assert_allclose_report(K.logdet(damping), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("damping", [1e-4, 0.1], ids=["lam1e-4", "lam0.1"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_factored_damped_inverse(case, damping):
    records = sampled_records(**case)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    dense = dense_blockdiag(records, "kflr", damp_factors=damping)
    inv = K.inverse(damping=damping, damping_mode="factored").to_dense()
    assert_allclose_report(inv, torch.linalg.inv(dense), rtol=1e-8, atol=1e-10)
    assert_allclose_report(
        K.logdet(damping, "factored"), torch.logdet(dense), rtol=1e-10, atol=1e-10
    )


def test_undamped_inverse_is_pseudo_inverse():
    # n=2 examples: A has rank <= 2 (singular); the inverse at damping 0 is the pseudo-inverse.
    records = sampled_records(stack="mlp", n=2)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    expected = torch.linalg.pinv(K.to_dense(), hermitian=True)
    assert_allclose_report(K.inverse(0.0).to_dense(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_trace(case):
    records = sampled_records(**case)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    assert_allclose_report(K.trace(), torch.trace(K.to_dense()), rtol=1e-12, atol=1e-12)


def test_operator_takes_plain_factor_lists():
    records = sampled_records(stack="mlp")
    layers = [KronLayer.from_record(r) for r in records]
    A = [2.0 * r.A for r in records]
    G = [r.G["kflr"] for r in records]
    K = BlockDiagonalKFAC(layers, A, G, [r.bias_scale for r in records])
    ref = BlockDiagonalKFAC.from_records(records, "kflr")
    assert_allclose_report(K.to_dense(), 2.0 * ref.to_dense(), rtol=1e-12, atol=1e-12)


def test_float32_factors_give_float32_operator():
    records = sampled_records(stack="mlp")
    layers = [KronLayer.from_record(r) for r in records]
    K = BlockDiagonalKFAC(
        layers, [r.A.float() for r in records], [r.G["kflr"].float() for r in records]
    )
    assert K.dtype == torch.float32
    ref = BlockDiagonalKFAC.from_records(records, "kflr")
    inv = K.inverse(0.1)
    assert inv.dtype == torch.float32
    assert_allclose_report(inv.to_dense(), ref.inverse(0.1).to_dense(), rtol=1e-4, atol=1e-5)


def test_bad_input_raises():
    records = sampled_records(stack="mlp")
    with pytest.raises(ShapeError, match="kfra"):
        BlockDiagonalKFAC.from_records(records, "kfra")
    with pytest.raises(ShapeError, match="kind='fisher'"):
        BlockDiagonalKFAC.from_records(records, "fisher")
    layers = [KronLayer.from_record(r) for r in records]
    A = [r.A for r in records]
    G = [r.G["kflr"] for r in records]
    with pytest.raises(ShapeError, match="'1'"):
        BlockDiagonalKFAC(layers, A[:1] + A[:1] + A[2:], G)
    K = BlockDiagonalKFAC(layers, A, G)
    with pytest.raises(ShapeError, match="damping_mode"):
        K.inverse(0.1, damping_mode="heuristic")
    with pytest.raises(ShapeError, match="non-negative"):
        K.inverse(-1.0)


# -- end to end: extraction + operator ----------------------------------------------------

MODEL_CASES = {
    "mlp-ce-mean": ("mlp", "ce", "mean", "expand"),
    "mlp-mse-sum": ("mlp", "mse", "sum", "expand"),
    "deep_mlp-bce-mean": ("deep_mlp", "bce", "mean", "expand"),
    "cnn-ce-expand": ("cnn", "ce", "mean", "expand"),
    "cnn-mse-reduce": ("cnn", "mse", "sum", "reduce"),
    "cnn1d-ce-expand": ("cnn1d", "ce", "sum", "expand"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["kflr", "empirical"])
@pytest.mark.parametrize("case", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_blocks_match_brute_force_factors(case, kind, device):
    name, loss, red, approx = case
    model, lf, X, y = make_problem(name, loss, red, device=device, n=5)
    K = ck.kfac(model, lf, (X, y), kind=kind, kfac_approx=approx)
    Kd = K.to_dense()
    ref = brute_force_factors(model, lf, X, y, kind=kind, kfac_approx=approx)
    for (lname, _), f in zip(param_layers(model), ref):
        expected = kron_block(f["G"], f["A"])
        assert_allclose_report(joint_block(Kd, model, lname), expected, rtol=1e-9, atol=1e-12)
    # nothing outside the diagonal blocks
    mask = torch.block_diag(*[torch.ones(s, s) for s in K.block_sizes]).to(Kd.device)
    assert (Kd * (1 - mask)).abs().max() == 0


# curvlinops' KFAC: Linear and Conv2d layers, BCE with binary targets only
CURVLINOPS_CASES = {
    "mlp-ce-mean": ("mlp", "ce", "mean", "expand"),
    "mlp-mse-sum": ("mlp", "mse", "sum", "expand"),
    "deep_mlp-ce-sum": ("deep_mlp", "ce", "sum", "expand"),
    "cnn-ce-expand": ("cnn", "ce", "mean", "expand"),
    "cnn-mse-reduce": ("cnn", "mse", "sum", "reduce"),
}


@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("case", CURVLINOPS_CASES.values(), ids=CURVLINOPS_CASES.keys())
def test_kflr_matches_curvlinops_type2(case, separate):
    name, loss, red, approx = case
    model, lf, X, y = make_problem(name, loss, red, n=6)
    K = ck.kfac(model, lf, (X, y), kind="kflr", kfac_approx=approx, separate_bias=separate)
    ref = KFACLinearOperator(
        model,
        lf,
        list(model.parameters()),
        [(X, y)],
        fisher_type="type-2",
        kfac_approx=approx,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    expected = ref @ torch.eye(K.dim, dtype=DTYPE)
    assert_allclose_report(K.to_dense(), expected, rtol=1e-10, atol=1e-13)


def blockdiag_of(M, sizes):
    mask = torch.block_diag(*[torch.ones(s, s, dtype=M.dtype) for s in sizes]).to(M.device)
    return M * mask


EXACT_CASES = {
    # KFLR's blocks are exact: one datum (MLPs), deep linear nets with MSE (any N)
    "mlp-ce-one-datum": ("mlp", "ce", "mean", 1),
    "deep_mlp-mse-one-datum": ("deep_mlp", "mse", "sum", 1),
    "deep_linear-mse-mean": ("deep_linear", "mse", "mean", 8),
    "deep_linear-mse-sum": ("deep_linear", "mse", "sum", 8),
}


@pytest.mark.parametrize("case", EXACT_CASES.values(), ids=EXACT_CASES.keys())
def test_kflr_equals_block_diagonal_ggn_where_exact(case):
    name, loss, red, n = case
    model, lf, X, y = make_problem(name, loss, red, n=n)
    K = ck.kfac(model, lf, (X, y), kind="kflr")
    expected = blockdiag_of(dense_ggn(model, lf, X, y), K.block_sizes)
    assert_allclose_report(K.to_dense(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", ["block-diagonal", "tridiagonal"])
@pytest.mark.parametrize("kind", ["kflr", "empirical"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_several_batches_equal_one_batch(red, kind, structure):
    model, lf, X, y = make_problem("deep_mlp", "ce", red, n=12)
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    one = ck.kfac(model, lf, (X, y), kind=kind, structure=structure)
    batches = [(X[:2], y[:2]), (X[2:9], y[2:9]), (X[9:], y[9:])]
    several = ck.kfac(model, lf, batches, kind=kind, structure=structure)
    assert_allclose_report(several.to_dense(), one.to_dense(), rtol=1e-10, atol=1e-13)
    assert_allclose_report(several.inverse(0.1).to_dense(), one.inverse(0.1).to_dense(), rtol=1e-8)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_monte_carlo_kfac_is_seeded_and_tends_to_kflr():
    model, lf, X, y = make_problem("mlp", "ce", "mean", n=4)
    kflr = ck.kfac(model, lf, (X, y), kind="kflr").to_dense()
    M = 3000
    a = ck.kfac(model, lf, (X, y), kind="kfac", mc_samples=M, seed=3).to_dense()
    b = ck.kfac(model, lf, (X, y), kind="kfac", mc_samples=M, seed=3).to_dense()
    c = ck.kfac(model, lf, [(X[:2], y[:2]), (X[2:], y[2:])], kind="kfac", mc_samples=M, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c.to_dense())
    scale = kflr.abs().max()
    for est in (a, c.to_dense()):
        assert (est - kflr).abs().max() < mc_error_bound(M, 6.0) * scale


def test_front_function_rejects_bad_arguments():
    model, lf, X, y = make_problem("mlp", "ce", "mean", n=3)
    with pytest.raises(ShapeError, match="kind='fisher'"):
        ck.kfac(model, lf, (X, y), kind="fisher")
    with pytest.raises(ShapeError, match="structure='full'"):
        ck.kfac(model, lf, (X, y), structure="full")


def test_inverse_state_dict_round_trip(tmp_path):
    records = sampled_records(stack="mlp", separate_bias=True)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    inv = K.inverse(0.1, damping_mode="factored")
    torch.save(inv.state_dict(), tmp_path / "inv.pt")
    state = torch.load(tmp_path / "inv.pt", weights_only=True)
    again = KronEigenOperator.from_state_dict(K.layers, state)
    assert torch.equal(again.to_dense(), inv.to_dense())


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_extract_batches_combines_like_one_batch(red):
    model, lf, X, y = make_problem("cnn", "ce", red, n=7)
    quantities = ("kflr", "cross", "batch_grad", "diag_ggn")
    one = extract_batches(model, lf, (X, y), quantities)
    several = extract_batches(model, lf, [(X[:3], y[:3]), (X[3:], y[3:])], quantities)
    assert several.batch_size == 7
    assert several.reduction_factor == pytest.approx(one.reduction_factor)
    assert_allclose_report(several.loss, one.loss, rtol=1e-12, atol=0)
    for a, b in zip(several, one):
        assert a.bias_scale == pytest.approx(b.bias_scale)
        for x, z in zip(
            [a.A, a.G["kflr"], *a.batch_grad, *a.diag_ggn],
            [b.A, b.G["kflr"], *b.batch_grad, *b.diag_ggn],
        ):
            assert_allclose_report(x, z, rtol=1e-10, atol=1e-14)
