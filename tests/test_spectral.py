"""Eigenpairs, spectral densities and spectral scalars against dense references (float64)."""

import math

import pytest
import torch
from reference import DEVICES

import curvkit as ck
from curvkit.diagnostics import spectral
from curvkit.errors import CurvkitError, ShapeError
from curvkit.operators.base import CurvatureOperator


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class MatrixOperator(CurvatureOperator):
    """A matrix behind products only (dense export costs ``D`` counted products)."""

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


def hessian_like(D=200, seed=0):
    """A few outliers, a bulk near zero and some negative eigenvalues (a Hessian's shape)."""
    gen = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([20.0, 12.0, 11.5, 8.0, 5.0])
    bulk = torch.randn(D - 5, generator=gen).abs() * 0.3 - 0.05
    return symmetric(torch.cat([outliers, bulk]), seed)


def expected_values(M, k, which):
    ref = torch.linalg.eigvalsh(M)
    order = {
        "LA": ref.argsort(descending=True),
        "SA": ref.argsort(),
        "LM": ref.abs().argsort(descending=True),
    }
    return ref[order[which]][:k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lanczos", "dense", "scipy"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigenvectors_match_eigvalsh(which, method, device):
    M = hessian_like().to(device)
    op = MatrixOperator(M)
    vals, vecs, info = ck.eigenvectors(op, k=5, which=which, method=method)
    torch.testing.assert_close(vals.cpu(), expected_values(M.cpu(), 5, which), atol=1e-7, rtol=0)
    true_res = (M @ vecs - vecs * vals).norm(dim=0)
    torch.testing.assert_close(info.residuals, true_res, atol=1e-12, rtol=0)
    assert info.residuals.max() < 1e-6
    assert info.method == method and info.which == which and info.converged
    assert info.matvecs == op.matvecs > 0
    if method == "dense":
        assert info.matvecs == 200


def test_lanczos_top_eigenvalues_of_a_tight_cluster():
    """Ten nearly equal top eigenvalues: needs the large Krylov basis and restarts."""
    eigs = torch.cat([10 + 1e-3 * torch.arange(10.0), torch.rand(290)]).double()
    M = symmetric(eigs)
    vals, info = ck.eigenvalues(MatrixOperator(M), k=10, method="lanczos")
    torch.testing.assert_close(vals, expected_values(M, 10, "LA"), atol=1e-8, rtol=0)
    assert info.residuals.max() < 1e-6


def test_auto_method_switches_on_dimension(monkeypatch):
    op = MatrixOperator(hessian_like(D=120))
    assert ck.eigenvalues(op, k=3)[1].method == "dense"
    monkeypatch.setattr(spectral, "DENSE_MAX_DIM", 50)
    assert ck.eigenvalues(op, k=3)[1].method == "lanczos"
    assert ck.eigenvalues(op, k=70)[1].method == "dense"  # Krylov basis would span the space


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"which": "BE"}, "which='BE'"),
        ({"method": "arpack"}, "method='arpack'"),
        ({"k": 0}, "k=0"),
        ({"k": 31}, "k=31"),
    ],
    ids=["which", "method", "k-zero", "k-too-large"],
)
def test_eigenvectors_bad_arguments(kwargs, match):
    with pytest.raises(ShapeError, match=match):
        ck.eigenvectors(MatrixOperator(torch.eye(30, dtype=torch.float64)), **kwargs)


def test_eigenvalues_rejects_a_tensor():
    with pytest.raises(ShapeError, match="CurvatureOperator"):
        ck.eigenvalues(torch.eye(3))


@pytest.mark.parametrize("device", DEVICES)
def test_slq_density_and_moments_match_dense_spectrum(device):
    M = hessian_like(D=150).to(device)
    eigs = torch.linalg.eigvalsh(M.cpu())
    sd = ck.spectral_density(MatrixOperator(M), num_probes=20, lanczos_steps=30, seed=1)
    assert sd.matvecs == 20 * 30
    assert sd.nodes.shape == sd.weights.shape == (20, 30)
    torch.testing.assert_close(
        sd.weights.sum(1), torch.ones(20, dtype=torch.float64, device=device)
    )
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    for p in (1, 2, 3):
        est = sd.moment(p)
        assert abs(est.value - float((eigs**p).mean())) < 4 * est.stderr, p
    # the Gaussian kernel keeps the mean and adds sigma^2 to the second moment
    mean = float(torch.trapezoid(sd.grid * sd.density, sd.grid))
    second = float(torch.trapezoid(sd.grid**2 * sd.density, sd.grid))
    assert mean == pytest.approx(sd.moment(1).value, abs=1e-6)
    assert second == pytest.approx(sd.moment(2).value + sd.kernel_width**2, rel=1e-6)
    # all the mass lies within the spectrum (plus the kernel's tails)
    inside = (sd.grid >= eigs.min() - 5 * sd.kernel_width) & (
        sd.grid <= eigs.max() + 5 * sd.kernel_width
    )
    assert float(torch.trapezoid(sd.density * inside, sd.grid)) == pytest.approx(1.0, abs=1e-3)


def test_slq_recovers_few_distinct_eigenvalues_and_their_mass():
    eigs = torch.tensor([0.5] * 100 + [2.0] * 60 + [7.0] * 40, dtype=torch.float64)
    sd = ck.spectral_density(
        MatrixOperator(symmetric(eigs)), num_probes=30, lanczos_steps=8, seed=0
    )
    for lam, frac in ((0.5, 0.5), (2.0, 0.3), (7.0, 0.2)):
        mass = (sd.weights * ((sd.nodes - lam).abs() < 1e-8)).sum(1)  # per probe
        se = float(mass.std() / math.sqrt(30))
        assert abs(float(mass.mean()) - frac) < 4 * se


@pytest.mark.parametrize("cutoff", [1e-5, None], ids=["given-cutoff", "default-cutoff"])
def test_slq_log_density_with_cutoff(cutoff):
    """30 % exact zeros and 20 distinct positive eigenvalues over five decades.

    With 21 distinct eigenvalues, 45 Lanczos steps resolve every one in float64
    (fewer than 45 do not: steps after a converged outlier are partly spent on
    copies that carry no weight): the zeros appear as nodes at round-off level.
    """
    eigs = torch.cat([torch.zeros(60), torch.logspace(-3, 2, 20).repeat(7)]).double()
    sd = ck.spectral_density(
        MatrixOperator(symmetric(eigs)), num_probes=20, lanczos_steps=45, log=True, cutoff=cutoff
    )
    assert sd.log and bool((sd.grid > 0).all())
    assert sd.cutoff == (1e-5 if cutoff else pytest.approx(1e-6 * 100))
    assert float(torch.trapezoid(sd.density, torch.log10(sd.grid))) == pytest.approx(1.0, abs=1e-6)
    mass = (sd.weights * (sd.nodes <= sd.cutoff)).sum(1)
    assert sd.mass_below_cutoff == pytest.approx(float(mass.mean()))
    assert abs(sd.mass_below_cutoff - 0.3) < 4 * float(mass.std() / math.sqrt(20))
    assert float(torch.log10(sd.grid).max()) > 2.0  # the top decade is on the grid


def test_slq_on_a_given_grid():
    grid = torch.linspace(-4, 25, 300, dtype=torch.float64)
    sd = ck.spectral_density(
        MatrixOperator(hessian_like()), num_probes=3, lanczos_steps=20, grid=grid, kernel_width=0.5
    )
    assert torch.equal(sd.grid, grid) and sd.kernel_width == 0.5
    assert float(torch.trapezoid(sd.density, grid)) == pytest.approx(1.0, abs=1e-3)


def test_logdet_exact_slq_and_structured():
    eigs = torch.logspace(-2, 1, 120).double()
    M = symmetric(eigs)
    true = float(torch.log(eigs + 0.1).sum())
    exact = spectral.logdet(MatrixOperator(M), damping=0.1)
    assert exact.method == "exact" and exact.value == pytest.approx(true, rel=1e-10)
    slq = spectral.logdet(
        MatrixOperator(M), damping=0.1, method="slq", num_probes=20, lanczos_steps=30
    )
    assert slq.method == "slq" and abs(slq.value - true) < 4 * slq.stderr

    class WithLogdet(MatrixOperator):
        def logdet(self, damping):
            return torch.log(eigs + damping).sum()

    structured = spectral.logdet(WithLogdet(M), damping=0.1)
    assert structured.method == "structured" and structured.matvecs == 0
    assert structured.value == pytest.approx(true, rel=1e-12)


def test_logdet_rejects_indefinite():
    M = symmetric(torch.tensor([-1.0, 1.0, 2.0]))
    with pytest.raises(CurvkitError, match="not positive definite"):
        spectral.logdet(MatrixOperator(M))
    with pytest.raises(ShapeError, match="no structured logdet"):
        spectral.logdet(MatrixOperator(M), method="structured")


def test_extreme_eigenvalues_and_condition_number():
    eigs = torch.linspace(0.0, 3.0, 80).double()
    op = MatrixOperator(symmetric(eigs))
    # Round-off of the dense decomposition: D * eps * lambda_max.
    tol = 80 * torch.finfo(torch.float64).eps * 3.0 * 10
    assert spectral.lambda_max(op) == pytest.approx(3.0, abs=tol)
    assert spectral.lambda_min(op) == pytest.approx(0.0, abs=tol)
    assert math.isinf(spectral.condition_number(op))
    assert spectral.condition_number(op, damping=0.5) == pytest.approx(3.5 / 0.5, rel=1e-12)
    assert spectral.lambda_max(op, method="lanczos") == pytest.approx(3.0, rel=1e-8)


@pytest.mark.parametrize("tiny", [1e-17, 3e-16, -1e-16, 0.0])
def test_condition_number_treats_round_off_lambda_min_as_singular(tiny):
    """A smallest eigenvalue at round-off level (<= D eps lambda_max) is singular: inf.

    Dense ``eigh`` of a diagonal matrix returns its entries exactly, so the smallest
    eigenvalue is the given round-off-sized value whatever the machine.
    """
    op = ck.DenseOperator(torch.diag(torch.tensor([3.0, 1.0, tiny], dtype=torch.float64)))
    assert spectral.lambda_min(op) == tiny
    assert math.isinf(spectral.condition_number(op))
    # Just above the threshold 3 * eps * 3 the ratio is finite and exact.
    above = 3 * 3.0 * torch.finfo(torch.float64).eps * 4
    op = ck.DenseOperator(torch.diag(torch.tensor([3.0, 1.0, above], dtype=torch.float64)))
    assert spectral.condition_number(op) == pytest.approx(3.0 / above, rel=1e-12)
    # The threshold follows the dtype: float32 round-off is far larger.
    op = ck.DenseOperator(torch.diag(torch.tensor([3.0, 1.0, 1e-7])))
    assert math.isinf(spectral.condition_number(op))


@pytest.mark.parametrize("damping", [-0.1, math.nan, math.inf])
def test_condition_number_rejects_bad_damping(damping):
    op = ck.DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="damping"):
        spectral.condition_number(op, damping=damping)


@pytest.mark.parametrize("method", ["entropy", "intrinsic"])
def test_effective_rank_of_projector_is_its_rank(method):
    P = symmetric(torch.tensor([1.0] * 7 + [0.0] * 33))
    assert spectral.effective_rank(MatrixOperator(P), method=method) == pytest.approx(7.0, rel=1e-8)


def test_effective_rank_entropy_of_known_spectrum():
    eigs = torch.tensor([3.0, 1.0, 0.0, 0.0]).double()
    p = eigs[:2] / 4
    expected = math.exp(-float((p * p.log()).sum()))
    assert spectral.effective_rank(MatrixOperator(symmetric(eigs))) == pytest.approx(expected)
    assert spectral.effective_rank(
        MatrixOperator(symmetric(eigs)), method="intrinsic"
    ) == pytest.approx(4 / 3)
    with pytest.raises(ShapeError, match="method='stable'"):
        spectral.effective_rank(MatrixOperator(symmetric(eigs)), method="stable")


def test_kronecker_operator_structured_trace_and_logdet():
    """The duck-typed ``trace()`` and ``logdet(damping)`` of block-diagonal K-FAC match dense."""
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    ).double()
    gen = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(7, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 2, (7,), generator=gen),
    )
    K = ck.kfac(model, torch.nn.CrossEntropyLoss(), (X, y), kind="kflr")
    dense = K.to_dense()
    tr = ck.trace(K, method="exact")
    assert tr.matvecs == 0 and tr.value == pytest.approx(float(dense.trace()), rel=1e-12)
    ld = spectral.logdet(K, damping=0.1)
    expected = float(torch.log(torch.linalg.eigvalsh(dense) + 0.1).sum())
    assert ld.method == "structured" and ld.matvecs == 0
    assert ld.value == pytest.approx(expected, rel=1e-10)
    assert spectral.logdet(K, damping=0.1, method="exact").value == pytest.approx(
        expected, rel=1e-10
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_width=0.0), "kernel_width=0.0 must be a finite number > 0"),
        (dict(kernel_width=-0.1), "kernel_width=-0.1"),
        (dict(kernel_width=math.nan), "kernel_width=nan"),
        (dict(grid=1), "grid=1 must be at least 2"),
        (dict(grid=torch.ones(2, 2)), "1-D and non-empty"),
        (dict(grid=torch.tensor([0.0, 1.0]), log=True), "positive for log=True"),
        (dict(log=True, cutoff=-1.0), "cutoff must be positive"),
        (dict(num_probes=0), "num_probes=0"),
    ],
)
def test_spectral_density_bad_arguments_before_any_product(kwargs, match):
    op = MatrixOperator(symmetric(torch.linspace(0.1, 1.0, 10).double()))
    with pytest.raises(ShapeError, match=match):
        ck.spectral_density(op, **kwargs)
    assert op.matvecs == 0


def test_operator_with_nan_products():
    """NaN propagates (dense eigenvalues, condition number); Lanczos names the cause."""
    M = symmetric(torch.linspace(0.1, 1.0, 30).double())
    M[3, 5] = M[5, 3] = math.nan
    op = MatrixOperator(M)
    assert torch.isnan(ck.eigenvalues(op, k=2, method="dense")[0]).all()
    assert math.isnan(spectral.condition_number(op))
    from curvkit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="not finite") as info:
        ck.eigenvalues(op, k=2, method="lanczos")
    assert isinstance(info.value, FloatingPointError)
