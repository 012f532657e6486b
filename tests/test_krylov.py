"""Lanczos and Krylov-Schur against dense linear algebra (float64)."""

import pytest
import torch
from reference import DEVICES

from curvkit.diagnostics.krylov import krylov_schur, lanczos, make_generator, tridiagonal
from curvkit.errors import ShapeError
from curvkit.operators.base import CurvatureOperator


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class MatrixOperator(CurvatureOperator):
    def __init__(self, M):
        super().__init__([M.shape[:1]], M.dtype, M.device)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


def symmetric(eigs, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    D = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return (Q @ torch.diag(eigs.to(torch.float64)) @ Q.T).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_lanczos_full_space_reproduces_spectrum(device):
    eigs = torch.linspace(-2, 5, 40, dtype=torch.float64)
    op = MatrixOperator(symmetric(eigs, device=device))
    V0 = torch.randn(40, 3, dtype=torch.float64, device=device)
    alpha, beta = lanczos(op, V0, steps=40)
    assert alpha.shape == (3, 40) and beta.shape == (3, 39)
    for T in tridiagonal(alpha, beta):
        torch.testing.assert_close(torch.linalg.eigvalsh(T).cpu(), eigs, atol=1e-9, rtol=0)
    assert op.matvecs == 3 * 40


def test_lanczos_exhausted_krylov_space_gives_exact_quadrature():
    """Three distinct eigenvalues: the Krylov space is exhausted after three steps."""
    eigs = torch.tensor([1.0] * 20 + [4.0] * 20 + [9.0] * 20, dtype=torch.float64)
    M = symmetric(eigs)
    v = torch.randn(60, 1, dtype=torch.float64)
    theta, S = torch.linalg.eigh(tridiagonal(*lanczos(MatrixOperator(M), v, steps=10))[0])
    weights = S[0] ** 2
    assert torch.isfinite(theta).all()
    kept = weights > 1e-12
    torch.testing.assert_close(theta[kept], torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    u = (v / v.norm())[:, 0]
    for lam in (1.0, 4.0, 9.0):  # weight = squared norm of the start vector's eigen-component
        V = torch.linalg.eigh(M)[1][:, (eigs == lam).nonzero()[:, 0]]
        assert float(weights[(theta - lam).abs() < 1e-8].sum()) == pytest.approx(
            float((V.T @ u).pow(2).sum())
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_krylov_schur_matches_eigvalsh(which, device):
    gen = torch.Generator().manual_seed(1)
    eigs = torch.cat(
        [torch.tensor([-7.0, 6.5, 6.4, 6.3]), torch.randn(146, generator=gen)]
    ).double()
    M = symmetric(eigs, device=device)
    vals, vecs, res, restarts, converged = krylov_schur(
        MatrixOperator(M), k=4, which=which, generator=make_generator(0, device)
    )
    ref = torch.linalg.eigvalsh(M.cpu())
    expected = {
        "LA": ref.flip(0)[:4],
        "SA": ref[:4],
        "LM": ref[ref.abs().argsort(descending=True)][:4],
    }
    assert converged
    torch.testing.assert_close(vals.cpu(), expected[which], atol=1e-7, rtol=0)
    true_res = (M @ vecs - vecs * vals).norm(dim=0)
    assert true_res.max() < 1e-6
    torch.testing.assert_close(
        vecs.T @ vecs, torch.eye(4, dtype=torch.float64, device=device), atol=1e-10, rtol=0
    )


def test_krylov_schur_invariant_start_space():
    """Rank 2 exhausts the Krylov space; the solver must continue and find the zeros too."""
    u = torch.randn(30, 2, dtype=torch.float64)
    M = u @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ u.T
    vals, *_, converged = krylov_schur(
        MatrixOperator(M), k=3, which="LA", ncv=10, generator=make_generator(0, "cpu")
    )
    ref = torch.linalg.eigvalsh(M).flip(0)[:3]
    assert converged
    torch.testing.assert_close(vals, ref, atol=1e-8, rtol=0)


def test_krylov_schur_rejects_bad_sizes():
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ShapeError, match="k < ncv < D"):
        krylov_schur(op, k=5, ncv=5)
    with pytest.raises(ShapeError, match="which="):
        krylov_schur(op, k=2, which="BE")
