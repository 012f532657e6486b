"""Tri-diagonal K-FAC against dense block matrices and the dense M&G formula."""

import math
import warnings

import pytest
import torch

import curvkit as ck
from curvkit.errors import ShapeError
from curvkit.operators.kronecker import BlockDiagonalKFAC
from curvkit.operators.tridiag import TriDiagonalInverse, TriDiagonalKFAC
from tests.operators.test_kronecker import sampled_records
from tests.reference import (
    DEVICES,
    assert_allclose_report,
    brute_force_factors,
    joint_block,
    joint_permutation,
    kron_block,
    make_problem,
    param_layers,
)

DTYPE = torch.float64


def joint_to_flat(records):
    """Global index map: entry ``k`` is the flat position of joint-order entry ``k``."""
    parts, offset = [], 0
    for rec in records:
        parts.append(offset + joint_permutation(rec.out_features, rec.in_features, rec.has_bias))
        offset += rec.numel
    return torch.cat(parts)


def to_flat(J, records):
    perm = joint_to_flat(records).to(J.device)
    out = torch.zeros_like(J)
    out[perm[:, None], perm[None, :]] = J
    return out


def joint_slices(records):
    out, start = [], 0
    for rec in records:
        out.append(slice(start, start + rec.numel))
        start += rec.numel
    return out


def dense_mg_inverse(records, kind, damping, linked):
    """M&G's F̆⁻¹ = Ξᵀ Λ Ξ by plain dense algebra, factored-damped diagonal blocks."""
    L = len(records)
    diag, off = [], []
    for rec in records:
        A, G = rec.A, rec.G[kind]
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
        root = math.sqrt(damping)
        eye_a, eye_g = torch.eye(A.shape[0], dtype=DTYPE), torch.eye(G.shape[0], dtype=DTYPE)
        diag.append(torch.kron(G + root / pi * eye_g, A + pi * root * eye_a))
    for i in range(L - 1):
        rec = records[i]
        off.append(torch.kron(rec.cross_G[kind], rec.cross_A) if linked[i] else None)
    sl = joint_slices(records)
    D = sum(r.numel for r in records)
    Xi, Lam = torch.eye(D, dtype=DTYPE), torch.zeros(D, D, dtype=DTYPE)
    for i in range(L):
        if i < L - 1 and off[i] is not None:
            Psi = off[i] @ torch.linalg.inv(diag[i + 1])
            Sigma = diag[i] - Psi @ diag[i + 1] @ Psi.T
            Xi[sl[i], sl[i + 1]] = -Psi
        else:
            Sigma = diag[i]
        Lam[sl[i], sl[i]] = torch.linalg.inv(Sigma)
    return to_flat(Xi.T @ Lam @ Xi, records)


def unlink(records, pair):
    records.layers[pair].cross_A = None
    records.layers[pair].cross_G = {}
    records.layers[pair].cross_reason = "cut by the test"
    return records


CASES = {
    "mlp3": dict(stack="mlp", n=40),
    "mlp3-sum": dict(stack="mlp", n=40, reduction="sum"),
    "mlp3-empirical": dict(stack="mlp", n=40, kind="empirical"),
}


def build(case, device="cpu", cut=None):
    case = dict(case)
    kind = case.pop("kind", "kflr")
    records = sampled_records(device=device, **case)
    if cut is not None:
        unlink(records, cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if cut is not None else "error")
        return records, kind, TriDiagonalKFAC.from_records(records, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_to_dense_matches_kronecker_blocks_on_tridiagonal(case, device):
    records, kind, T = build(case, device)
    F = T.to_dense()
    assert_allclose_report(F, F.T, rtol=0, atol=1e-12, msg="symmetry")
    Fj = F[joint_to_flat(records).to(F.device)][:, joint_to_flat(records).to(F.device)]
    sl = joint_slices(records)
    for i, rec in enumerate(records):
        G, A = rec.G[kind], rec.A
        assert_allclose_report(
            Fj[sl[i], sl[i]], torch.kron(G, A), rtol=1e-9, atol=1e-11, msg=f"diag {i}"
        )
        if i + 1 < len(records):
            expected = torch.kron(rec.cross_G[kind], rec.cross_A)
            assert_allclose_report(
                Fj[sl[i], sl[i + 1]], expected, rtol=1e-9, atol=1e-11, msg=f"off {i}"
            )
    # F̆ is dense: the second off-diagonal block is not zero
    assert Fj[sl[0], sl[2]].abs().max() > 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_undamped_inverse_is_block_tridiagonal_inverse(case, device):
    records, _, T = build(case, device)
    inv = T.inverse(0.0).to_dense()
    sl = joint_slices(records)
    perm = joint_to_flat(records).to(inv.device)
    inv_joint = inv[perm][:, perm]
    assert inv_joint[sl[0], sl[2]].abs().max() == 0
    assert inv_joint[sl[2], sl[0]].abs().max() == 0
    dense = T.to_dense()
    assert_allclose_report(
        inv @ dense, torch.eye(T.dim, dtype=DTYPE, device=device), rtol=0, atol=1e-7
    )
    assert_allclose_report(inv, torch.linalg.inv(dense), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("damping", [1e-3, 0.3], ids=["lam1e-3", "lam0.3"])
@pytest.mark.parametrize("cut", [None, 0, 1], ids=["chain", "cut01", "cut12"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_damped_inverse_matches_dense_mg_formula(case, cut, damping):
    records, kind, T = build(case, cut=cut)
    linked = [i != cut for i in range(len(records) - 1)]
    expected = dense_mg_inverse(records, kind, damping, linked)
    inv = T.inverse(damping)
    assert_allclose_report(inv.to_dense(), expected, rtol=1e-8, atol=1e-10)
    assert_allclose_report(T.logdet(damping), -torch.logdet(expected), rtol=1e-9, atol=1e-9)


def test_small_batch_damped_inverse_matches_dense_mg_formula():
    # n=3 < factor sizes: singular factors, only the damping makes Ψ and Σ well defined.
    records, kind, T = build(dict(stack="mlp", n=3))
    expected = dense_mg_inverse(records, kind, 0.1, [True, True])
    assert_allclose_report(T.inverse(0.1).to_dense(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.2], ids=["undamped", "lam0.2"])
def test_one_layer_equals_block_diagonal(damping):
    records = sampled_records(stack="one-layer", n=12)
    T = TriDiagonalKFAC.from_records(records, "kflr")
    B = BlockDiagonalKFAC.from_records(records, "kflr")
    assert T.fallback_pairs == []
    assert_allclose_report(T.to_dense(), B.to_dense(), rtol=1e-12, atol=1e-12)
    expected = B.inverse(damping, damping_mode="factored").to_dense()
    assert_allclose_report(T.inverse(damping).to_dense(), expected, rtol=1e-9, atol=1e-10)


def test_conv_pair_falls_back_to_block_diagonal():
    records = sampled_records(stack="conv-linear", n=20)
    with pytest.warns(UserWarning, match=r"\(0, 1\): layer 0 is a Conv2d"):
        T = TriDiagonalKFAC.from_records(records, "kflr")
    assert T.fallback_pairs == [("0", "1", "layer 0 is a Conv2d")]
    B = BlockDiagonalKFAC.from_records(records, "kflr")
    assert_allclose_report(T.to_dense(), B.to_dense(), rtol=1e-12, atol=1e-12)
    expected = B.inverse(0.1, damping_mode="factored").to_dense()
    assert_allclose_report(T.inverse(0.1).to_dense(), expected, rtol=1e-9, atol=1e-10)


def test_kind_without_cross_factor_falls_back():
    records = sampled_records(stack="mlp", n=20)
    for rec in records:
        rec.cross_G.pop("empirical", None)
    with pytest.warns(UserWarning, match="no cross factor of kind 'empirical'"):
        T = TriDiagonalKFAC.from_records(records, "empirical")
    assert len(T.fallback_pairs) == 2


def test_trace_and_separate_bias_rejected():
    records, _, T = build(CASES["mlp3"])
    assert_allclose_report(T.trace(), torch.trace(T.to_dense()), rtol=1e-10, atol=1e-10)
    with pytest.raises(ShapeError, match="separate_bias=False"):
        TriDiagonalKFAC.from_records(sampled_records(stack="mlp", separate_bias=True), "kflr")
    with pytest.raises(ShapeError, match="non-negative"):
        T.inverse(-0.1)
    with pytest.raises(ShapeError, match="Cross factors of layers '0', '1'"):
        TriDiagonalKFAC(T.layers, T.A, T.G, [T.cross_A[0].T, T.cross_A[1]], T.cross_G)
    with pytest.raises(ShapeError, match="Expected 2 cross factors"):
        TriDiagonalKFAC(T.layers, T.A, T.G, T.cross_A[:1], T.cross_G[:1])
    with pytest.raises(ShapeError, match="Layer '2'"):
        TriDiagonalKFAC(T.layers, T.A[:2] + T.A[:1], T.G, T.cross_A, T.cross_G)


# -- end to end: extraction + operator ----------------------------------------------------

MODEL_CASES = {
    "mlp-ce-mean": ("mlp", "ce", "mean"),
    "deep_mlp-mse-sum": ("deep_mlp", "mse", "sum"),
    "deep_linear-mse-mean": ("deep_linear", "mse", "mean"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["kflr", "empirical"])
@pytest.mark.parametrize("case", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_model_tridiagonal_blocks_match_brute_force(case, kind, device):
    model, lf, X, y = make_problem(*case, device=device, n=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T = ck.kfac(model, lf, (X, y), kind=kind, structure="tridiagonal")
    F = T.to_dense()
    ref = brute_force_factors(model, lf, X, y, kind=kind)
    names = [name for name, _ in param_layers(model)]
    for i, f in enumerate(ref):
        diag = joint_block(F, model, names[i])
        assert_allclose_report(diag, kron_block(f["G"], f["A"]), rtol=1e-8, atol=1e-11)
        if i + 1 < len(ref):
            off = joint_block(F, model, names[i], names[i + 1])
            expected = kron_block(f["cross_G"], f["cross_A"])
            assert_allclose_report(off, expected, rtol=1e-7, atol=1e-10, msg=f"pair {i}")


def test_model_with_conv_layers_falls_back():
    model, lf, X, y = make_problem("cnn", "ce", "mean", n=6)
    with pytest.warns(UserWarning, match="conv layer"):
        T = ck.kfac(model, lf, (X, y), kind="kflr", structure="tridiagonal")
    assert [(a, b) for a, b, _ in T.fallback_pairs] == [("0", "3"), ("3", "6")]
    B = ck.kfac(model, lf, (X, y), kind="kflr")
    assert_allclose_report(T.to_dense(), B.to_dense(), rtol=1e-12, atol=1e-14)


def test_kfra_has_no_cross_factors():
    model, lf, X, y = make_problem("mlp", "mse", "mean", n=6)
    with pytest.warns(UserWarning, match="no cross factor of kind 'kfra'"):
        T = ck.kfac(model, lf, (X, y), kind="kfra", structure="tridiagonal")
    B = ck.kfac(model, lf, (X, y), kind="kfra")
    assert_allclose_report(T.to_dense(), B.to_dense(), rtol=1e-12, atol=1e-14)


def test_inverse_state_dict_round_trip(tmp_path):
    records, kind, T = build(CASES["mlp3"], cut=1)
    inv = T.inverse(0.1)
    torch.save(inv.state_dict(), tmp_path / "inv.pt")
    again = TriDiagonalInverse.from_state_dict(
        T.layers, torch.load(tmp_path / "inv.pt", weights_only=True)
    )
    assert torch.equal(again.to_dense(), inv.to_dense())


def test_float32_factors():
    records, _, T = build(CASES["mlp3"])
    f32 = [[t.float() for t in ts] for ts in (T.A, T.G, T.cross_A, T.cross_G)]
    T32 = TriDiagonalKFAC(T.layers, *f32)
    inv = T32.inverse(0.01)
    assert inv.dtype == torch.float32
    assert_allclose_report(inv.to_dense(), T.inverse(0.01).to_dense(), rtol=1e-3, atol=1e-4)
    assert_allclose_report(T32.to_dense(), T.to_dense(), rtol=1e-3, atol=1e-5)
