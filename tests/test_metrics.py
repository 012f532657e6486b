"""ck.compare on matrices whose metrics are known in closed form (float64)."""

import math

import pandas as pd
import pytest
import torch
from reference import DEVICES

import curvkit as ck
from curvkit.diagnostics import spectral
from curvkit.diagnostics.metrics import COLUMNS, METRICS, BlockView
from curvkit.errors import ShapeError
from curvkit.operators.base import CurvatureOperator

DT = torch.float64
DAMPING = (1e-2, 1e-1, 1.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class MatrixOperator(CurvatureOperator):
    """A matrix behind products only, with optional layer blocks."""

    def __init__(self, M, block_sizes=None, block_names=None):
        super().__init__([M.shape[:1]], M.dtype, M.device, block_sizes, block_names)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


def symmetric(eigs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DT))
    return Q @ torch.diag(eigs.to(DT)) @ Q.T


def row(df, metric, block="all", **extra):
    sel = (df.metric == metric) & (df.block == block)
    for col, val in extra.items():
        sel &= df[col] == val
    out = df[sel]
    assert len(out) == 1, (metric, block, extra, len(out))
    return out.iloc[0]


# exact_threshold=1000: dense comparison; exact_threshold=10: products, Lanczos, CG, Hutchinson
MODES = {"dense": 1000, "products": 10}


@pytest.fixture
def small_dense_limit(monkeypatch):
    """Make the eigensolvers use Lanczos from D > 10 on, so that product mode exercises it."""
    monkeypatch.setattr(spectral, "DENSE_MAX_DIM", 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_identical_operators_are_perfect(mode, device, small_dense_limit):
    M = symmetric(torch.linspace(0.1, 5.0, 60)).to(device)
    op = MatrixOperator(M, [20, 40], ["l1", "l2"])
    g = torch.randn(60, dtype=DT, device=device)
    df = ck.compare(op, op, k=4, gradient=g, damping_grid=DAMPING, exact_threshold=MODES[mode])
    assert list(df.columns) == COLUMNS
    assert set(df.block) == {"all", "l1", "l2"}
    expected = {
        "frobenius": 0.0,
        "cosine": 1.0,
        "spectral": 0.0,
        "overlap": 1.0,
        "directional": 1.0,
    }
    expected |= {"precond_cosine": 1.0, "precond_reduction": 1.0}
    for metric, value in expected.items():
        got = df[df.metric == metric]
        assert len(got) > 0
        torch.testing.assert_close(
            torch.tensor(got.value.values),
            torch.full((len(got),), value, dtype=DT),
            atol=1e-7,
            rtol=0,
        )
    assert (
        len(df[(df.metric == "directional") & (df.block == "all")]) == 4 + 1
    )  # eigvecs + gradient
    assert len(df[(df.metric == "precond_cosine") & (df.block == "all")]) == len(DAMPING)


def diagonal_case():
    b = torch.tensor([8.0, 6.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=DT)
    a = torch.tensor([7.0, 6.5, 1.0, 4.0, 2.0, 0.5, 0.5, 3.0], dtype=DT)
    g = torch.tensor([1.0, -2.0, 0.5, 1.0, 3.0, -1.0, 2.0, 1.0], dtype=DT)
    return a, b, g


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_diagonal_matrices_known_metrics(mode):
    a, b, g = diagonal_case()
    A, B = MatrixOperator(torch.diag(a)), MatrixOperator(torch.diag(b))
    threshold = MODES[mode] if mode == "dense" else 4
    df = ck.compare(
        A, B, k=3, gradient=g, damping_grid=DAMPING, exact_threshold=threshold, num_probes=4000
    )
    exact = {
        "spectral": float((a - b).abs().max() / b.abs().max()),
        # top-3 of b: e1, e2, e3; top-3 of a: e1, e2, e4 -> two shared directions
        "overlap": 2 / 3,
    }
    for metric, value in exact.items():
        assert row(df, metric).value == pytest.approx(value, rel=1e-8)
    for i in range(3):
        assert row(df, "directional", direction=f"eigvec_{i + 1}").value == pytest.approx(
            float(a[i] / b[i])
        )
    assert row(df, "directional", direction="gradient").value == pytest.approx(
        float((g * g * a).sum() / (g * g * b).sum())
    )
    frob = float((a - b).norm() / b.norm())
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    for metric, value in (("frobenius", frob), ("cosine", cos)):
        r = row(df, metric)
        # Rademacher probes are exact on diagonal matrices: |Dz|^2 = sum_i d_i^2 for every z
        assert r.value == pytest.approx(value, rel=1e-12) and r.stderr < 1e-12
        assert r.method == ("dense" if mode == "dense" else "hutchinson")
    for lam in DAMPING:
        dA, dB = g / (a + lam), g / (b + lam)
        cos_d = float(dA @ dB / (dA.norm() * dB.norm()))
        q = lambda delta, lam=lam: float(g @ delta + 0.5 * delta @ ((b + lam) * delta))  # noqa: E731
        assert row(df, "precond_cosine", damping=lam).value == pytest.approx(cos_d, rel=1e-8)
        assert row(df, "precond_reduction", damping=lam).value == pytest.approx(
            q(-dA) / q(-dB), rel=1e-8
        )


def test_per_block_rows_compare_the_diagonal_blocks():
    A_full = symmetric(torch.rand(30) + 0.1, seed=1)
    B_full = symmetric(torch.rand(30) + 0.1, seed=2)
    g = torch.randn(30, dtype=DT)
    sizes, names = [12, 18], ["first", "second"]
    df = ck.compare(
        MatrixOperator(A_full, sizes, names), MatrixOperator(B_full, sizes, names), k=3, gradient=g
    )
    for name, s in (("first", slice(0, 12)), ("second", slice(12, 30))):
        sub = ck.compare(
            MatrixOperator(A_full[s, s]), MatrixOperator(B_full[s, s]), k=3, gradient=g[s]
        )
        mine = df[df.block == name].reset_index(drop=True)
        torch.testing.assert_close(torch.tensor(mine.value.values), torch.tensor(sub.value.values))
        assert list(mine.metric) == list(sub.metric)
    assert ck.compare(
        MatrixOperator(A_full, sizes, names), MatrixOperator(B_full), blocks=False
    ).block.unique().tolist() == ["all"]


def test_product_mode_agrees_with_dense_mode(small_dense_limit):
    A = symmetric(torch.rand(50) + 0.05, seed=3)
    B = A + 0.05 * symmetric(torch.randn(50), seed=4)
    B = B @ B.T / 4  # positive definite reference, close to A's structure
    g = torch.randn(50, dtype=DT)
    ops = MatrixOperator(A, [20, 30], ["a", "b"]), MatrixOperator(B, [20, 30], ["a", "b"])
    dense = ck.compare(*ops, k=4, gradient=g, damping_grid=DAMPING)
    products = ck.compare(
        *ops, k=4, gradient=g, damping_grid=DAMPING, exact_threshold=10, num_probes=300
    )
    merged = dense.merge(
        products, on=["block", "metric", "k", "damping", "direction"], suffixes=("_d", "_p")
    )
    assert len(merged) == len(dense) == len(products)
    stochastic = merged.metric.isin(["frobenius", "cosine"])
    det = merged[~stochastic]
    torch.testing.assert_close(
        torch.tensor(det.value_p.values), torch.tensor(det.value_d.values), atol=1e-6, rtol=1e-6
    )
    sto = merged[stochastic]
    assert ((sto.value_p - sto.value_d).abs() < 4 * sto.stderr_p).all()
    assert set(products[products.metric.isin(["frobenius", "cosine"])].method) == {"hutchinson"}
    assert "lanczos" in set(products[products.block == "all"].method)


def test_frobenius_estimate_stderr_is_calibrated():
    A = symmetric(torch.rand(80), seed=5)
    B = symmetric(torch.rand(80), seed=6)
    exact = float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))
    runs = [
        row(
            ck.compare(
                MatrixOperator(A),
                MatrixOperator(B),
                metrics=("frobenius",),
                exact_threshold=10,
                num_probes=40,
                seed=s,
            ),
            "frobenius",
        )
        for s in range(60)
    ]
    values = torch.tensor([r.value for r in runs])
    stderrs = torch.tensor([r.stderr for r in runs])
    assert abs(runs[0].value - exact) < 3 * runs[0].stderr
    assert abs(float(values.mean()) - exact) < 4 * float(values.std()) / math.sqrt(60)
    assert 0.7 < float(stderrs.pow(2).mean().sqrt() / values.std()) < 1.4


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_own_inverse_of_the_approximation_on_request(mode):
    """``approx_inverse="own"`` applies ``approx.inverse``; here a deliberately different one."""
    A = symmetric(torch.rand(40) + 0.1, seed=7)
    B = symmetric(torch.rand(40) + 0.1, seed=8)
    g = torch.randn(40, dtype=DT)
    calls = []

    class WithInverse(MatrixOperator):
        def inverse(self, damping=0.0):  # the inverse of A + 2λI, not of A + λI
            calls.append(damping)
            return ck.DenseOperator(
                torch.linalg.inv(self.M + 2 * damping * torch.eye(40, dtype=DT))
            )

    kwargs = dict(
        metrics=("preconditioning",),
        gradient=g,
        exact_threshold=MODES[mode],
        damping_grid=DAMPING,
        blocks=False,
    )
    own = ck.compare(WithInverse(A), MatrixOperator(B), approx_inverse="own", **kwargs)
    exact = ck.compare(WithInverse(A), MatrixOperator(B), **kwargs)
    assert calls == list(DAMPING)
    solve = "dense" if mode == "dense" else "cg"
    assert set(own.method) == {f"own/{solve}"} and set(exact.method) == {solve}
    for lam in DAMPING:
        dA = torch.linalg.solve(A + 2 * lam * torch.eye(40, dtype=DT), g)
        dB = torch.linalg.solve(B + lam * torch.eye(40, dtype=DT), g)
        cos = float(dA @ dB / (dA.norm() * dB.norm()))
        assert row(own, "precond_cosine", damping=lam).value == pytest.approx(cos, rel=1e-7)
        dA = torch.linalg.solve(A + lam * torch.eye(40, dtype=DT), g)
        cos = float(dA @ dB / (dA.norm() * dB.norm()))
        assert row(exact, "precond_cosine", damping=lam).value == pytest.approx(cos, rel=1e-7)


def test_several_approximations_and_list_gradient():
    B = symmetric(torch.rand(6) + 0.5)
    shapes = [torch.Size([2, 2]), torch.Size([2])]

    class Shaped(MatrixOperator):
        def __init__(self, M):
            CurvatureOperator.__init__(self, shapes, M.dtype, M.device)
            self.M = M

    g = [torch.ones(2, 2, dtype=DT), torch.ones(2, dtype=DT)]
    df = ck.compare(
        {"same": Shaped(B), "scaled": Shaped(2 * B)},
        Shaped(B),
        reference_name="exact",
        k=2,
        gradient=g,
    )
    assert set(df.approx) == {"same", "scaled"} and set(df.reference) == {"exact"}
    assert set(df.block) == {"all", "0", "1"}
    assert row(
        df[df.approx == "scaled"], "directional", direction="gradient"
    ).value == pytest.approx(2.0)
    assert row(df[df.approx == "scaled"], "cosine").value == pytest.approx(1.0)
    assert row(df[df.approx == "scaled"], "frobenius").value == pytest.approx(1.0)


@pytest.mark.parametrize("threshold", [1000, 8], ids=["dense", "dense-blocks"])
def test_several_approximations_equal_separate_comparisons(threshold):
    """The reference's decomposition is shared between approximations, not their results."""
    B = symmetric(torch.rand(12) + 0.5)
    A1, A2 = symmetric(torch.rand(12) + 0.1, seed=1), symmetric(torch.rand(12) + 2.0, seed=2)
    make = lambda M: MatrixOperator(M, [6, 6], ["a", "b"])  # noqa: E731
    g = torch.randn(12, dtype=DT)
    options = dict(exact_threshold=threshold, k=3, gradient=g, num_probes=20)
    both = ck.compare({"one": make(A1), "two": make(A2)}, make(B), **options)
    for name, A in (("one", A1), ("two", A2)):
        alone = ck.compare({name: make(A)}, make(B), **options)
        mine = both[both.approx == name].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)


def test_block_view_is_the_diagonal_block():
    M = symmetric(torch.rand(10))
    view = BlockView(MatrixOperator(M), slice(3, 7))
    torch.testing.assert_close(view.to_dense(), M[3:7, 3:7])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda A, B: ck.compare(A, MatrixOperator(torch.eye(5, dtype=DT))), "has shape"),
        (lambda A, B: ck.compare(A, B, metrics=("frobenius", "kl")), "unknown metrics"),
        (lambda A, B: ck.compare(A, B, gradient=torch.ones(3)), "gradient must be"),
        (lambda A, B: ck.compare(A.M, B), "not a CurvatureOperator"),
        (lambda A, B: ck.compare(A, B, approx_inverse="kfac"), "approx_inverse='kfac'"),
        (lambda A, B: ck.compare(A, B, k=0), "k=0 must be an integer >= 1"),
        (lambda A, B: ck.compare(A, B, k=-2), "k=-2 must be an integer >= 1"),
        (lambda A, B: ck.compare(A, B, k=2.5), "k=2.5 must be an integer"),
        (lambda A, B: ck.compare(A, B, num_probes=0), "num_probes=0"),
        (lambda A, B: ck.compare(A, B, damping_grid=(0.1, -1.0)), "damping_grid"),
        (lambda A, B: ck.compare(A, B, damping_grid=(float("nan"),)), "damping_grid"),
    ],
    ids=[
        "shape",
        "metric",
        "gradient",
        "tensor",
        "approx-inverse",
        "k-zero",
        "k-negative",
        "k-float",
        "probes",
        "damping-negative",
        "damping-nan",
    ],
)
def test_compare_bad_arguments(call, match):
    A, B = MatrixOperator(torch.eye(4, dtype=DT)), MatrixOperator(2 * torch.eye(4, dtype=DT))
    with pytest.raises(ShapeError, match=match):
        call(A, B)


def test_metric_names_and_dataframe():
    df = ck.compare(MatrixOperator(torch.eye(3, dtype=DT)), MatrixOperator(torch.eye(3, dtype=DT)))
    assert isinstance(df, pd.DataFrame)
    assert set(df.metric) == {"frobenius", "cosine", "spectral", "overlap", "directional"}
    assert "preconditioning" in METRICS  # needs a gradient, skipped without one


def deep_linear_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    ).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(10, 4, generator=gen, dtype=DT)
    y = torch.randn(10, 2, generator=gen, dtype=DT)
    return model, torch.nn.MSELoss(), (X, y)


def test_kflr_of_a_deep_linear_network_matches_the_ggn_blocks():
    """Deep linear network + MSE: the output-gradient factor is constant, KFLR exact per layer.

    ``k=2``: the last layer's block is ``c I_2 ⊗ A``, every eigenvalue twice, so
    only an even ``k`` makes its top-``k`` eigenspace well defined.
    """
    model, loss_func, data = deep_linear_problem()
    K = ck.kfac(model, loss_func, data, kind="kflr")
    G = ck.ggn(model, loss_func, data)
    df = ck.compare(K, G, metrics=("frobenius", "cosine", "overlap"), k=2)
    blocks = df[df.block != "all"]
    assert len(set(blocks.block)) == 3
    for metric, value in (("frobenius", 0.0), ("cosine", 1.0), ("overlap", 1.0)):
        vals = torch.tensor(blocks[blocks.metric == metric].value.values)
        torch.testing.assert_close(vals, torch.full_like(vals, value), atol=1e-8, rtol=0)
    assert row(df, "frobenius").value > 0.05  # the off-diagonal blocks are missing


def test_kronecker_and_exact_operators_in_product_mode(small_dense_limit):
    model, loss_func, data = deep_linear_problem()
    K = ck.kfac(model, loss_func, data, kind="kflr")
    G = ck.ggn(model, loss_func, data)
    g = torch.randn(G.dim, dtype=DT)
    kwargs = dict(
        metrics=("spectral", "overlap", "directional", "preconditioning"),
        k=2,
        gradient=g,
        damping_grid=DAMPING,
    )
    dense = ck.compare(K, G, **kwargs)
    products = ck.compare(K, G, exact_threshold=5, **kwargs)
    assert set(products[products.metric == "precond_cosine"].method) == {"cg"}
    own = ck.compare(K, G, exact_threshold=5, approx_inverse="own", **kwargs)
    kfac_exact_damping = own[own.metric.str.startswith("precond")]  # block-diagonal: exact damping
    assert set(kfac_exact_damping[kfac_exact_damping.block == "all"].method) == {"own/cg"}
    torch.testing.assert_close(
        torch.tensor(own.value.values), torch.tensor(dense.value.values), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(products.value.values), torch.tensor(dense.value.values), atol=1e-6, rtol=1e-6
    )
