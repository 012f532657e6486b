"""EKFAC against brute-force per-example gradients, K-FAC and curvlinops."""

import pytest
import torch
from curvlinops import EKFACLinearOperator

import curvkit as ck
from curvkit.errors import ShapeError
from curvkit.operators.ekfac import EKFAC
from curvkit.operators.kronecker import BlockDiagonalKFAC
from tests.operators.test_kronecker import sampled_records
from tests.reference import (
    DEVICES,
    assert_allclose_report,
    dense_ef,
    dense_ggn,
    joint_block,
    make_problem,
    param_layers,
)

DTYPE = torch.float64


def layer_bases(E):
    """Per layer the dense Kronecker eigenbasis (joint order, or [W-block, b-block])."""
    out = []
    for blocks in E.blocks:
        out.append(torch.block_diag(*[torch.kron(U_G, U_A) for U_G, U_A, _ in blocks]))
    return out


def flat_ef(records):
    """Brute-force EF ``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` in flat order from the records' batch_grad."""
    R = records.reduction_factor
    g = torch.cat([bg.flatten(1) for rec in records for bg in rec.batch_grad], dim=1) / R
    return R * g.T @ g


def joint_layer_block(M, rec, start):
    """Layer block of a flat-order matrix in the operator's split order ([W|b] joint or W, b)."""
    from tests.reference import joint_permutation

    size = rec.numel
    block = M[start : start + size, start : start + size]
    if rec.joint:
        perm = joint_permutation(rec.out_features, rec.in_features, True).to(M.device)
        block = block[perm][:, perm]
    return block


HAND_CASES = {
    "mlp-joint": dict(stack="mlp"),
    "mlp-separate": dict(stack="mlp", separate_bias=True),
    "mlp-sum": dict(stack="mlp", reduction="sum"),
    "conv-joint": dict(stack="conv-linear"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", HAND_CASES.values(), ids=HAND_CASES.keys())
def test_eigenbasis_diagonal_equals_empirical_fisher(case, device):
    records = sampled_records(device=device, **case)
    E = EKFAC.from_records(records, "empirical")
    K = BlockDiagonalKFAC.from_records(records, "empirical").to_dense()
    EF, Ed = flat_ef(records), E.to_dense()
    start = 0
    for rec, Q in zip(records, layer_bases(E)):
        ef = Q.T @ joint_layer_block(EF, rec, start) @ Q
        ek = Q.T @ joint_layer_block(Ed, rec, start) @ Q
        kf = Q.T @ joint_layer_block(K, rec, start) @ Q
        # the basis diagonalises K-FAC's block and EKFAC's block ...
        assert_allclose_report(kf - torch.diag(kf.diagonal()), torch.zeros_like(kf), atol=1e-10)
        assert_allclose_report(ek - torch.diag(ek.diagonal()), torch.zeros_like(ek), atol=1e-10)
        # ... and EKFAC's eigenvalues are the EF's second moments in it
        assert_allclose_report(ek.diagonal(), ef.diagonal(), rtol=1e-10, atol=1e-12)
        start += rec.numel


@pytest.mark.parametrize("case", HAND_CASES.values(), ids=HAND_CASES.keys())
def test_kfac_eigenvalues_give_kfac(case):
    records = sampled_records(**case)
    K = BlockDiagonalKFAC.from_records(records, "kflr")
    bases, S = [], []
    for layer in K.eigendecompositions():
        bases.append([(U_G, U_A) for (_, U_G), (_, U_A) in layer])
        S.append([torch.outer(gam, alp) for (gam, _), (alp, _) in layer])
    E = EKFAC.from_bases(K.layers, bases, S)
    assert_allclose_report(E.to_dense(), K.to_dense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5], ids=["undamped", "lam1e-3", "lam0.5"])
@pytest.mark.parametrize("case", HAND_CASES.values(), ids=HAND_CASES.keys())
def test_inverse_is_exact(case, damping):
    records = sampled_records(n=40, **case)  # n large: the EF is non-singular
    E = EKFAC.from_records(records, "kflr")
    dense = E.to_dense() + damping * torch.eye(E.dim, dtype=DTYPE)
    inv = E.inverse(damping).to_dense()
    assert_allclose_report(inv @ dense, torch.eye(E.dim, dtype=DTYPE), rtol=0, atol=1e-8)
    assert_allclose_report(E.logdet(damping), torch.logdet(dense), rtol=1e-10, atol=1e-10)
    assert_allclose_report(E.trace(), torch.trace(E.to_dense()), rtol=1e-12, atol=1e-12)


MODEL_CASES = {
    "mlp-ce-mean": ("mlp", "ce", "mean", "expand", False),
    "mlp-mse-sum": ("mlp", "mse", "sum", "expand", False),
    "deep_mlp-ce-separate": ("deep_mlp", "ce", "mean", "expand", True),
    "cnn-ce-expand": ("cnn", "ce", "mean", "expand", False),
    "cnn-mse-reduce": ("cnn", "mse", "sum", "reduce", False),
}


def assert_eigenbasis_diagonal(E, reference, model, sep):
    """In each layer's eigenbasis, EKFAC's diagonal equals that of the dense reference block."""
    Ed = E.to_dense()
    for (lname, _), Q, blocks in zip(param_layers(model), layer_bases(E), E.blocks):
        ref = joint_block(reference, model, lname, separate=sep)
        ek = joint_block(Ed, model, lname, separate=sep)
        if sep:  # compare the weight block only (the bias block is the second pair)
            Q = torch.kron(blocks[0][0], blocks[0][1])
        ref, ek = Q.T @ ref @ Q, Q.T @ ek @ Q
        assert_allclose_report(ek.diagonal(), ref.diagonal(), rtol=1e-9, atol=1e-12, msg=lname)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_model_eigenbasis_diagonal_equals_dense_ef(case, device):
    name, loss, red, approx, sep = case
    model, lf, X, y = make_problem(name, loss, red, device=device, n=7)
    E = ck.ekfac(model, lf, (X, y), kind="empirical", kfac_approx=approx, separate_bias=sep)
    assert_eigenbasis_diagonal(E, dense_ef(model, lf, X, y), model, sep)


@pytest.mark.parametrize("case", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_matches_curvlinops_empirical_ekfac(case):
    name, loss, red, approx, sep = case
    # n=25 makes every factor full rank: a degenerate eigenvalue leaves the eigenbasis
    # (and so EKFAC) non-unique, and two correct implementations may then differ.
    model, lf, X, y = make_problem(name, loss, red, n=25)
    E = ck.ekfac(model, lf, (X, y), kind="empirical", kfac_approx=approx, separate_bias=sep)
    ref = EKFACLinearOperator(
        model,
        lf,
        list(model.parameters()),
        [(X, y)],
        fisher_type="empirical",
        kfac_approx=approx,
        separate_weight_and_bias=sep,
        check_deterministic=False,
    )
    expected = ref @ torch.eye(E.dim, dtype=DTYPE)
    assert_allclose_report(E.to_dense(), expected, rtol=1e-9, atol=1e-12)


LINEAR_CASES = {k: v for k, v in MODEL_CASES.items() if not k.startswith("cnn")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_ggn_correction_diagonal_equals_dense_ggn(case, device):
    """correction="kind" with KFLR: in the eigenbasis, the diagonal of the GGN block."""
    name, loss, red, approx, sep = case
    model, lf, X, y = make_problem(name, loss, red, device=device, n=7)
    E = ck.ekfac(model, lf, (X, y), kind="kflr", separate_bias=sep, correction="kind")
    assert_eigenbasis_diagonal(E, dense_ggn(model, lf, X, y), model, sep)


@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_ggn_correction_matches_curvlinops_type2_ekfac(case):
    name, loss, red, approx, sep = case
    model, lf, X, y = make_problem(name, loss, red, n=25)
    E = ck.ekfac(model, lf, (X, y), kind="kflr", separate_bias=sep, correction="kind")
    ref = EKFACLinearOperator(
        model, lf, list(model.parameters()), [(X, y)], fisher_type="type-2",
        separate_weight_and_bias=sep, check_deterministic=False,
    )  # fmt: skip
    expected = ref @ torch.eye(E.dim, dtype=DTYPE)
    assert_allclose_report(E.to_dense(), expected, rtol=1e-9, atol=1e-12)


def test_mc_fisher_correction_converges_to_the_ggn_correction():
    model, lf, X, y = make_problem("mlp", "ce", "mean", n=6)
    exact = ck.ekfac(model, lf, (X, y), kind="kflr", correction="kind").to_dense()

    def error(samples):
        E = ck.ekfac(model, lf, (X, y), kind="kfac", mc_samples=samples, correction="kind")
        return float(torch.linalg.norm(E.to_dense() - exact) / torch.linalg.norm(exact))

    assert error(4000) < 0.05 < error(1)


@pytest.mark.parametrize("kind", ["kflr", "kfac"])
def test_kind_correction_over_several_batches(kind):
    model, lf, X, y = make_problem("deep_mlp", "mse", "mean", n=9)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    several = ck.ekfac(model, lf, batches, kind=kind, correction="kind", mc_samples=2000)
    one = ck.ekfac(model, lf, (X, y), kind=kind, correction="kind", mc_samples=2000)
    if kind == "kflr":
        assert_allclose_report(several.to_dense(), one.to_dense(), rtol=1e-10, atol=1e-13)
    else:  # independent label samples: equal up to Monte Carlo error
        diff = torch.linalg.norm(several.to_dense() - one.to_dense())
        assert diff / torch.linalg.norm(one.to_dense()) < 0.05


def test_kind_correction_needs_linear_layers():
    model, lf, X, y = make_problem("cnn", "ce", "mean", n=4)
    with pytest.raises(ShapeError, match="supports Linear layers"):
        ck.ekfac(model, lf, (X, y), kind="kflr", correction="kind")
    with pytest.raises(ShapeError, match="correction='fisher'"):
        ck.ekfac(model, lf, (X, y), kind="kflr", correction="fisher")


@pytest.mark.parametrize("kind", ["kflr", "empirical"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_several_batches_equal_one_batch(kind, red):
    model, lf, X, y = make_problem("deep_mlp", "ce", red, n=9)
    one = ck.ekfac(model, lf, (X, y), kind=kind).to_dense()
    batches = [(X[:2], y[:2]), (X[2:7], y[2:7]), (X[7:], y[7:])]
    several = ck.ekfac(model, lf, batches, kind=kind).to_dense()
    assert_allclose_report(several, one, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("separate_bias", [False, True], ids=["joint", "separate"])
def test_factored_per_example_gradients_over_batches(separate_bias):
    """Factored per-example gradients, combined over batches, give the batch_grad EKFAC."""
    from curvkit.operators.kronecker import extract_batches

    model, lf, X, y = make_problem("deep_mlp", "ce", "mean", n=9)
    opts = dict(separate_bias=separate_bias)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    factored = extract_batches(model, lf, batches, ("kflr", "batch_grad_factors"), **opts)
    assert all(r.grad_factors[0].shape[0] == 9 and r.batch_grad is None for r in factored)
    plain = extract_batches(model, lf, (X, y), ("kflr", "batch_grad"), **opts)
    expected = EKFAC.from_records(plain, "kflr").to_dense()
    actual = EKFAC.from_records(factored, "kflr").to_dense()
    assert_allclose_report(actual, expected, rtol=1e-10, atol=1e-13)


def test_bad_input_raises():
    records = sampled_records(stack="mlp")
    with pytest.raises(ShapeError, match="kind='kfra'"):
        EKFAC.from_records(records, "kfra")
    for rec in records:
        rec.batch_grad = None
    with pytest.raises(ShapeError, match="batch_grad"):
        EKFAC.from_records(records, "kflr")
    E = EKFAC.from_records(sampled_records(stack="mlp"), "kflr")
    with pytest.raises(ShapeError, match="non-negative"):
        E.inverse(-1.0)
