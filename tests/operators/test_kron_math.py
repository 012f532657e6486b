"""Kronecker-factor linear algebra against dense ``torch.linalg`` in float64."""

import math

import pytest
import torch

from curvkit.operators import kron_math as km
from tests.reference import DEVICES, assert_allclose_report

DTYPE = torch.float64


def spd(d, gen, rank=None, shift=0.0):
    """A random symmetric PSD ``[d, d]`` matrix of the given rank, plus ``shift * I``."""
    X = torch.randn(d, rank if rank is not None else 2 * d, generator=gen, dtype=DTYPE)
    return X @ X.T / X.shape[1] + shift * torch.eye(d, dtype=DTYPE)


def vec(M):
    """Row-major vectorisation of a batch ``[k, a, b]`` as columns ``[a * b, k]``."""
    return M.reshape(M.shape[0], -1).T


SIZES = [(3, 4), (1, 5), (6, 1), (5, 5)]
SIZE_IDS = [f"dG{g}-dA{a}" for g, a in SIZES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("damping", [1e-3, 0.5], ids=["lam1e-3", "lam0.5"])
@pytest.mark.parametrize("dims", SIZES, ids=SIZE_IDS)
def test_exact_damped_inverse_matches_dense(dims, damping, device):
    gen = torch.Generator().manual_seed(0)
    d_g, d_a = dims
    G, A = spd(d_g, gen).to(device), spd(d_a, gen).to(device)
    M = torch.randn(3, d_g, d_a, generator=gen, dtype=DTYPE).to(device)
    (gam, U_G), (alp, U_A) = km.eigh_psd(G), km.eigh_psd(A)
    S = km.kron_inverse_scale(gam, alp, damping)
    actual = km.eigenbasis_matmat(U_G, U_A, S, M)
    dense = torch.kron(G, A) + damping * torch.eye(d_g * d_a, dtype=DTYPE, device=device)
    expected = torch.linalg.solve(dense, vec(M))
    assert_allclose_report(vec(actual), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("damping", [1e-3, 0.5], ids=["lam1e-3", "lam0.5"])
@pytest.mark.parametrize("dims", SIZES, ids=SIZE_IDS)
def test_factored_damped_inverse_matches_dense(dims, damping):
    gen = torch.Generator().manual_seed(1)
    d_g, d_a = dims
    G, A = spd(d_g, gen), 3.0 * spd(d_a, gen)
    pi = math.sqrt((torch.trace(A).item() / d_a) / (torch.trace(G).item() / d_g))
    root = math.sqrt(damping)
    dense = torch.kron(
        G + root / pi * torch.eye(d_g, dtype=DTYPE), A + pi * root * torch.eye(d_a, dtype=DTYPE)
    )
    M = torch.randn(2, d_g, d_a, generator=gen, dtype=DTYPE)
    (gam, U_G), (alp, U_A) = km.eigh_psd(G), km.eigh_psd(A)
    shifts = km.factored_shifts(A, G, damping)
    actual = km.eigenbasis_matmat(U_G, U_A, km.kron_inverse_scale(gam, alp, shifts=shifts), M)
    assert_allclose_report(vec(actual), torch.linalg.solve(dense, vec(M)), rtol=1e-9, atol=1e-10)


def test_factored_pi_and_dead_layer():
    A = torch.diag(torch.tensor([2.0, 4.0], dtype=DTYPE))  # mean eigenvalue 3
    G = torch.diag(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=DTYPE))  # mean eigenvalue 3
    assert km.factored_pi(A, G) == pytest.approx(1.0)
    assert km.factored_pi(12 * A, G) == pytest.approx(math.sqrt(12.0))
    assert km.factored_pi(A, torch.zeros_like(G)) == 1.0
    delta_a, delta_g = km.factored_shifts(12 * A, G, 0.25)
    assert delta_a == pytest.approx(math.sqrt(12.0) * 0.5)
    assert delta_g == pytest.approx(0.5 / math.sqrt(12.0))


@pytest.mark.parametrize("dims", [(3, 4), (4, 2)], ids=["dG3-dA4", "dG4-dA2"])
def test_undamped_singular_inverse_is_pseudo_inverse(dims):
    gen = torch.Generator().manual_seed(2)
    d_g, d_a = dims
    G, A = spd(d_g, gen, rank=d_g - 1), spd(d_a, gen, rank=1)
    (gam, U_G), (alp, U_A) = km.eigh_psd(G), km.eigh_psd(A)
    M = torch.randn(2, d_g, d_a, generator=gen, dtype=DTYPE)
    actual = km.eigenbasis_matmat(U_G, U_A, km.kron_inverse_scale(gam, alp, 0.0), M)
    expected = torch.linalg.pinv(torch.kron(G, A), hermitian=True) @ vec(M)
    assert_allclose_report(vec(actual), expected, rtol=1e-7, atol=1e-9)


def test_eigh_psd_clamps_round_off_negatives():
    gen = torch.Generator().manual_seed(3)
    M = spd(5, gen, rank=2)
    evals, evecs = km.eigh_psd(M)
    assert (evals >= 0).all()
    assert_allclose_report((evecs * evals) @ evecs.T, M, rtol=1e-9, atol=1e-12)
    raw, _ = km.eigh_psd(M - 0.1 * torch.eye(5, dtype=DTYPE), psd=False)
    assert (raw < 0).any()


def test_eigh_psd_retries_in_float64(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    M = spd(4, gen).float()
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(X):
        calls.append(X.dtype)
        if X.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(X)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    evals, evecs = km.eigh_psd(M)
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    assert_allclose_report((evecs * evals) @ evecs.T, M, rtol=1e-5, atol=1e-6)


def test_eigh_psd_retries_with_shift(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    M = spd(4, gen)
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(X):
        calls.append(X)
        if len(calls) < 3:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(X)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    evals, evecs = km.eigh_psd(M)
    assert len(calls) == 3 and not torch.equal(calls[2], calls[0])
    assert_allclose_report((evecs * evals) @ evecs.T, M, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shift", [0.0, 0.3], ids=["plain", "shifted"])
def test_generalized_eigh(shift):
    gen = torch.Generator().manual_seed(6)
    B, D = spd(5, gen), spd(5, gen) - 0.2 * torch.eye(5, dtype=DTYPE)
    s, W = km.generalized_eigh(D, B, shift=shift)
    Bs = B + shift * torch.eye(5, dtype=DTYPE)
    assert_allclose_report(W.T @ Bs @ W, torch.eye(5, dtype=DTYPE), rtol=0, atol=1e-10)
    assert_allclose_report(W.T @ D @ W, torch.diag(s), rtol=0, atol=1e-10)
    expected = torch.linalg.eigvals(torch.linalg.solve(Bs, D)).real.sort().values
    assert_allclose_report(s, expected, rtol=1e-8, atol=1e-10)


DIFF_CASES = {
    # name: (d_1, d_2, shifts, D/E construction)
    "schur-like": (3, 4, (0.0, 0.0), "contraction"),
    "schur-damped": (4, 3, (0.1, 0.05), "contraction"),
    "indefinite-middle": (3, 3, (0.0, 0.0), "general"),
    "one-by-k": (1, 4, (0.2, 0.0), "contraction"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DIFF_CASES.values(), ids=DIFF_CASES.keys())
def test_kron_difference_inverse_matches_dense(case, device):
    d1, d2, shifts, how = case
    gen = torch.Generator().manual_seed(7)
    B, C = spd(d1, gen), spd(d2, gen)
    if how == "contraction":
        # D = B^{1/2} K B^{1/2} with 0 <= K < I: the Schur-complement situation of M&G.
        D = 0.7 * (B @ torch.linalg.solve(B + spd(d1, gen), B))
        E = 0.9 * (C @ torch.linalg.solve(C + spd(d2, gen), C))
    else:
        D, E = spd(d1, gen) - 0.3 * torch.eye(d1, dtype=DTYPE), 2.0 * spd(d2, gen)
    Bs = B + shifts[0] * torch.eye(d1, dtype=DTYPE)
    Cs = C + shifts[1] * torch.eye(d2, dtype=DTYPE)
    dense = torch.kron(Bs, Cs) - torch.kron(D, E)
    B, C, D, E = (t.to(device) for t in (B, C, D, E))
    inv = km.kron_difference_inverse(B, C, D, E, shifts=shifts)
    M = torch.randn(3, d1, d2, generator=gen, dtype=DTYPE)
    expected = torch.linalg.solve(dense, vec(M))
    actual = vec(inv.matmat(M.to(device)))
    assert_allclose_report(actual, expected, rtol=1e-8, atol=1e-9)


def test_kron_difference_inverse_reuses_eigendecompositions():
    gen = torch.Generator().manual_seed(8)
    B, C, D, E = spd(3, gen), spd(2, gen), 0.5 * spd(3, gen), 0.1 * spd(2, gen)
    plain = km.kron_difference_inverse(B, C, D, E, shifts=(0.1, 0.2))
    reused = km.kron_difference_inverse(
        B, C, D, E, B_eig=km.eigh_psd(B), C_eig=km.eigh_psd(C), shifts=(0.1, 0.2)
    )
    M = torch.randn(2, 3, 2, generator=gen, dtype=DTYPE)
    assert_allclose_report(reused.matmat(M), plain.matmat(M), rtol=1e-12, atol=1e-12)


def test_psd_inverse():
    gen = torch.Generator().manual_seed(9)
    M = spd(4, gen, rank=2)
    evals, evecs = km.eigh_psd(M)
    assert_allclose_report(
        km.psd_inverse(evals, evecs, 0.3),
        torch.linalg.inv(M + 0.3 * torch.eye(4, dtype=DTYPE)),
        rtol=1e-10,
        atol=1e-12,
    )
    assert_allclose_report(
        km.psd_inverse(evals, evecs), torch.linalg.pinv(M, hermitian=True), rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shapes",
    [
        ((8, 16), (16, 5), (5, 8)),  # transposed layout on CPU (rows of 5 and 8)
        ((8, 3), (3, 9), (9, 8)),  # right-to-left association
        ((2, 30), (30, 40), (40, 3)),  # left-to-right association
        ((5, 5), (5, 7), (7, 7)),  # every row misaligned: plain layout
    ],
    ids=["transposed", "right-first", "left-first", "plain"],
)
def test_sandwich_matches_plain_product(shapes, device):
    gen = torch.Generator().manual_seed(0)
    L, M, R = (torch.randn(2, *s, generator=gen, dtype=DTYPE).to(device) for s in shapes)
    L, R = L[0], R[0]
    assert_allclose_report(km.sandwich(L, M, R), L @ M @ R, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_shifted_inverse_matches_dense(device):
    gen = torch.Generator().manual_seed(0)
    M = spd(6, gen, rank=3).to(device)  # singular: the shift makes it invertible
    eye = torch.eye(6, dtype=DTYPE, device=device)
    expected = torch.linalg.inv(M + 0.1 * eye)
    assert_allclose_report(km.shifted_inverse(M, 0.1), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="positive shift"):
        km.shifted_inverse(M, 0.0)


def test_shifted_inverse_falls_back_to_eigendecomposition(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    M = spd(5, gen)
    failed = lambda A: (torch.full_like(A, float("nan")), torch.tensor(1))  # noqa: E731
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failed)
    expected = torch.linalg.inv(M + 0.3 * torch.eye(5, dtype=DTYPE))
    assert_allclose_report(km.shifted_inverse(M, 0.3), expected, rtol=1e-10, atol=1e-12)


def test_generalized_eigh_falls_back_when_cholesky_fails(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    B, D = spd(5, gen), spd(5, gen)
    expected = km.generalized_eigh(D, B, shift=0.3)
    failed = lambda A: (torch.full_like(A, float("nan")), torch.tensor(1))  # noqa: E731
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failed)
    s, W = km.generalized_eigh(D, B, shift=0.3)
    assert_allclose_report(s, expected[0], rtol=1e-10, atol=1e-12)
    Bs = B + 0.3 * torch.eye(5, dtype=DTYPE)
    assert_allclose_report(W.T @ Bs @ W, torch.eye(5, dtype=DTYPE), rtol=0, atol=1e-10)
