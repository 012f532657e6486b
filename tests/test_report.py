"""End-to-end tests of ``curvkit report`` on tiny problems, checked against float64 references."""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from curvkit.app import cli, report
from curvkit.diagnostics.metrics import COLUMNS
from curvkit.errors import ShapeError
from curvkit.problems import get_problem
from tests.reference import dense_ef, dense_ggn, dense_hessian

SECTIONS = (
    "operators", "comparison", "structure", "spectra", "preconditioning",
    "traces", "landscape", "memory", "reproduce",
)  # fmt: skip
FIGURES = (
    "matrices", "inverses", "block_errors", "block_errors_inverse", "densities", "ranks",
    "overlap", "directional", "frobenius", "preconditioning", "estimators", "landscape",
    "histogram", "layer_spectra",
)  # fmt: skip
N = 24

CNN_MODEL = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(16, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, nn.CrossEntropyLoss(), (X, y)
"""

#: A custom module ending in BatchNorm and LayerNorm (no Kronecker factors for those).
NORM_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(32, 3)
        self.bn = nn.BatchNorm1d(3)
        self.ln = nn.LayerNorm(3)

    def forward(self, x):
        return self.ln(self.bn(self.fc(torch.relu(self.conv(x)).flatten(1))))


def build():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(16, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return Net(), nn.CrossEntropyLoss(), (X, y)
"""


@pytest.fixture(scope="module")
def linear_report(tmp_path_factory):
    """``curvkit report`` on the deep linear network, through the sub-command's parser."""
    out = tmp_path_factory.mktemp("deep_linear")
    argv = ["report", "--problem", "deep_linear", "--out", str(out), "--n-samples", str(N),
            "--train-steps", "0", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    html = (out / "index.html").read_text()
    results = json.loads((out / "results.json").read_text())
    return out, html, results, pd.read_csv(out / "metrics.csv")


@pytest.fixture(scope="module")
def cnn_report(tmp_path_factory):
    """The Python API with a user model (``--model file.py:build``): a CNN."""
    folder = tmp_path_factory.mktemp("cnn")
    (folder / "model.py").write_text(CNN_MODEL)
    page = report.build_report(
        model_path=f"{folder / 'model.py'}:build", out_dir=folder / "out", n_samples=16,
        train_steps=3, progress=False, figures=False,
    )  # fmt: skip
    return page, page.read_text(), json.loads((page.parent / "results.json").read_text())


def _rows(df, approx, metric, block="all"):
    return df[(df.approx == approx) & (df.metric == metric) & (df.block == block)]


def test_page_is_complete_and_self_contained(linear_report):
    out, html, results, _ = linear_report
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(FIGURES)
    files = {p.stem: p.read_bytes() for p in (out / "figures").glob("*.png")}
    assert sorted(files) == sorted(FIGURES)
    assert sorted(base64.b64decode(i) for i in images) == sorted(files.values())
    assert not re.search(r"<script|<link|src=\"http|url\(http", html)
    assert "curvkit report --problem deep_linear" in html
    for package in ("python", "torch", "curvkit", "backpack", "curvlinops"):
        assert f"<td>{package}</td>" in html
    assert set(results["timings_s"]) >= {"setup", "operators", "spectra", "compare", "figures"}
    assert all(r["status"] == "ok" for r in results["operators"])


def test_metrics_csv_is_the_comparison_table(linear_report):
    _, _, results, df = linear_report
    assert list(df.columns) == COLUMNS
    expected = {r["name"] for r in results["operators"]} - {"GGN"}
    assert set(df.approx) == expected and set(df.reference) == {"GGN"}
    assert len(df) == len(results["comparison"])
    core = df[df.metric.isin(["frobenius", "cosine", "spectral", "overlap"])]
    assert np.isfinite(core.value).all()
    assert (df[df.metric == "frobenius"].value >= 0).all()
    assert (df[df.metric == "cosine"].value.abs() <= 1 + 1e-12).all()
    assert df[df.metric == "overlap"].value.between(0, 1 + 1e-9).all()


def test_exact_cases_give_zero_error(linear_report):
    """Deep linear network with MSE: KFLR and tri-diagonal KFLR are exact on their blocks."""
    _, _, results, df = linear_report
    blocks = [b["name"] for b in results["problem"]["blocks"]]
    assert len(blocks) == 3
    for approx in ("KFLR", "tri-diag KFLR"):
        for b in blocks:
            assert float(_rows(df, approx, "frobenius", b).value.iloc[0]) < 1e-10, (approx, b)
    # KFLR drops the off-diagonal blocks: its whole-matrix error is far from zero
    assert float(_rows(df, "KFLR", "frobenius").value.iloc[0]) > 1e-2
    kflr = np.array(results["block_errors"]["KFLR"])
    tri = np.array(results["block_errors"]["tri-diag KFLR"])
    assert np.all(np.diag(kflr) < 1e-10) and np.allclose(kflr[~np.eye(3, dtype=bool)], 1.0)
    assert np.all(np.diag(tri) < 1e-10) and np.all(np.diag(tri, 1) < 1e-10)
    # the Hessian of a network linear in its last layer equals the GGN on that block
    assert float(_rows(df, "Hessian", "frobenius", blocks[-1]).value.iloc[0]) < 1e-10


def test_spectra_match_float64_references(linear_report):
    _, _, results, _ = linear_report
    problem = get_problem("deep_linear", seed=0, dtype=torch.float64)
    X, y = problem.train[0][:N], problem.train[1][:N]
    refs = {
        "GGN": dense_ggn(problem.model, problem.loss_func, X, y),
        "Hessian": dense_hessian(problem.model, problem.loss_func, X, y),
        "EF": dense_ef(problem.model, problem.loss_func, X, y),
    }
    for name, M in refs.items():
        expected = np.sort(torch.linalg.eigvalsh(M).numpy())
        got = np.sort(np.array(results["eigenvalues"][name]))
        np.testing.assert_allclose(got, expected, atol=1e-10 * abs(expected).max(), err_msg=name)
        summary = next(r for r in results["spectra"] if r["name"] == name)
        assert summary["trace"] == pytest.approx(float(torch.trace(M)), rel=1e-10)
    for row in results["lanczos"]:
        assert row["abs_diff"] <= 1e-6 * abs(row["dense"]) + 1e-12, row
    for row in results["traces"]:
        if row.get("z") is not None:
            assert abs(row["z"]) < 5, row
    # the loss landscape starts from the loss of the report's data at alpha = 0
    loss = problem.loss_func(problem.model(X), y).item()
    at_zero = [r["loss"] for r in results["loss_landscape"] if abs(r["alpha"]) < 1e-12]
    assert len(at_zero) == 7 and np.allclose(at_zero, loss, rtol=1e-12)
    assert results["problem"]["loss"] == pytest.approx(loss, rel=1e-12)


def test_eigenvalue_histogram_counts_the_reference_spectrum(linear_report):
    """The histogram figure's bins hold the float64 reference Hessian's eigenvalues."""
    _, _, results, _ = linear_report
    problem = get_problem("deep_linear", seed=0, dtype=torch.float64)
    X, y = problem.train[0][:N], problem.train[1][:N]
    lam = torch.linalg.eigvalsh(dense_hessian(problem.model, problem.loss_func, X, y)).numpy()
    rows = pd.DataFrame(results["eigenvalue_histogram"])
    assert set(rows.name) == {"GGN", "Hessian", "EF", "Fisher (MC)", "KFLR"}
    hessian = rows[rows.name == "Hessian"]
    for sign, values in (("positive", lam), ("negative", -lam)):
        part = hessian[hessian.sign == sign].sort_values("left")
        edges = np.append(part.left.to_numpy(), part.right.to_numpy()[-1])
        expected, _ = np.histogram(values[values >= edges[0]], edges)
        np.testing.assert_array_equal(part["count"].to_numpy(), expected, err_msg=sign)
    assert 0 < hessian["count"].sum() <= lam.size


def test_unsupported_approximation_is_reported_not_raised(cnn_report):
    page, html, results = cnn_report
    status = {r["name"]: r["status"] for r in results["operators"]}
    assert status["KFRA"].startswith("not available: UnsupportedModuleError")
    assert "Conv2d" in status["KFRA"]
    assert status["GGN"] == status["KFLR"] == status["Hessian"] == "ok"
    assert '<span class="badge na">not available</span>' in html
    df = pd.read_csv(page.parent / "metrics.csv")
    assert "KFRA" not in set(df.approx) and "KFLR" in set(df.approx)
    assert results["problem"]["name"] == "model.py:build"
    assert results["problem"]["train_steps"] == 3 and results["problem"]["num_params"] == 119
    assert "--model" in results["command"]
    for section in SECTIONS:
        assert f'<section id="{section}">' in html


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"problem": "no_such_problem"}, "Unknown problem"),
        ({"problem": "deep_linear", "max_dense": -1}, "max_dense"),
        ({"problem": "deep_linear", "operators": "ggn,hessain"}, "unknown operator 'hessain'"),
        ({"problem": "deep_linear", "n_samples": 1}, "n_samples"),
        ({"model_path": "missing.py:build"}, "no file"),
        ({"model_path": "no_function_given"}, "file.py:function"),
        ({"problem": "deep_linear", "dtype": "float16"}, "dtype"),
    ],
    ids=[
        "unknown-problem",
        "negative-max-dense",
        "unknown-operator",
        "too-few-samples",
        "missing-file",
        "bad-spec",
        "dtype",
    ],
)
def test_bad_arguments_raise_shape_errors(tmp_path, kwargs, match):
    with pytest.raises(ShapeError, match=match):
        report.build_report(out_dir=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "index.html").exists()


def test_run_returns_one_on_curvkit_error(tmp_path, capsys):
    args = cli.build_parser().parse_args(
        ["report", "--model", "nothing.py:fn", "--out", str(tmp_path)]
    )
    assert report.run(args) == 1
    assert "curvkit report: error:" in capsys.readouterr().err


def _load(folder, source):
    import importlib.util

    path = folder / "norm_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("_norm_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_norm_layers_at_the_end_through_the_command_line(tmp_path):
    """BatchNorm and LayerNorm last: the page, results and memory table are written."""
    path, module = _load(tmp_path, NORM_MODEL)
    assert cli.main(
        ["report", "--model", f"{path}:build", "--out", str(tmp_path / "out"), "--n-samples",
         "16", "--train-steps", "4", "--operators", "ggn,ef,kflr", "--quiet"]
    ) == 0  # fmt: skip
    html = (tmp_path / "out" / "index.html").read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failures"] == []
    status = {r["name"]: r["status"] for r in results["operators"]}
    assert list(status) == ["GGN", "EF", "KFLR"]  # GGN always; Hessian skipped
    assert status["GGN"] == status["EF"] == "ok"
    assert status["KFLR"] == "ok"  # the graph path: dense blocks for the norm layers
    assert "bn (BatchNorm1d)" in html and "ln (LayerNorm)" in html and "conv (Conv2d)" in html
    ln_memory = [
        r for r in results["memory"] if r["layer"] == "ln" and r["structure"] == "kronecker"
    ]
    assert ln_memory and ln_memory[0]["bytes"] is None  # no Kronecker factors: "–" on the page
    # the GGN of the trained model (evaluation mode) against a float64 autograd reference
    model, loss_func, (X, y) = module.build()
    assert results["tracking"] and {r["quantity"] for r in results["tracking"]} >= {
        "eigenvalue",
        "trace",
    }
    assert (tmp_path / "out" / "figures" / "tracking.pdf").exists()
    assert 'href="figures/tracking.pdf"' in html


def _row_hessian(model, loss_func, X, y):
    """Hessian by autograd's row-by-row double backward (no functorch batching rules).

    ``tests.reference.dense_hessian`` (``jacrev`` of ``jacrev``) returns an
    asymmetric matrix on the LayerNorm parameters (torch 2.13), disagreeing with
    central differences of the gradient; this reference agrees with them.
    """
    from torch.func import functional_call

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes, shapes = [p.numel() for _, p in named], [p.shape for _, p in named]

    def loss(theta):
        tensors = {n: t.reshape(s) for (n, _), t, s in zip(named, theta.split(sizes), shapes)}
        return loss_func(functional_call(model, tensors, (X,)), y)

    theta = torch.cat([p.detach().flatten() for _, p in named])
    return torch.autograd.functional.hessian(loss, theta)


def test_python_entry_point_escapes_names_and_matches_references(tmp_path):
    """ck.report on a custom module; a script in the title or a module name stays text."""
    import curvkit as ck

    _, module = _load(tmp_path, NORM_MODEL)
    model, loss_func, (X, y) = module.build()
    model = model.double()
    model.add_module("<script>alert(1)</script>", torch.nn.Identity())
    model.ln = torch.nn.Sequential()
    model.ln.add_module("<script>x()</script>", torch.nn.LayerNorm(3).double())
    X = X.double()
    page = ck.report(model, loss_func, (X, y), out=tmp_path / "r", operators="hessian",
                     name="<script>alert('t')</script>", figures=False)  # fmt: skip
    html = page.read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;t&#x27;)&lt;/script&gt;" in html
    assert "&lt;script&gt;x()&lt;/script&gt; (LayerNorm)" in html
    results = json.loads((page.parent / "results.json").read_text())
    assert results["failures"] == [] and results["settings"]["mode"] == "dense"
    assert not model.training  # analysed (and left) in evaluation mode
    # without figures the landscape and the damped inverses are still computed (and timed)
    assert {"landscape", "inverses"} <= set(results["timings_s"])
    assert len(results["loss_landscape"]) == 41 * len({r["direction"] for r in
                                                       results["loss_landscape"]})  # fmt: skip
    assert "figures" not in results
    refs = {
        "GGN": dense_ggn(model, loss_func, X, y),
        "Hessian": _row_hessian(model, loss_func, X, y),
    }
    for name, M in refs.items():
        expected = np.sort(torch.linalg.eigvalsh(M).numpy())
        got = np.sort(np.array(results["eigenvalues"][name]))
        np.testing.assert_allclose(got, expected, atol=1e-10 * abs(expected).max(), err_msg=name)


def test_dense_matrices_from_batched_products_equal_the_operators():
    """Jacobian (GGN, MC Fisher, EF) and vmap-HVP (Hessian) matrices equal column-wise products."""
    import curvkit as ck

    exec_globals = {}
    exec(NORM_MODEL, exec_globals)
    model, loss_func, (X, y) = exec_globals["build"]()
    model, X = model.double().eval(), X.double()
    data = (X, y)
    builders = {
        "jacobian": (ck.ggn, lambda *a: ck.fisher(*a, mc_samples=2, seed=3), ck.empirical_fisher),
        "vmap-hvp": (ck.hessian,),
    }
    for method, fns in builders.items():
        for build in fns:
            op = build(model, loss_func, data)
            M, how, _ = report._dense_matrix(op)
            assert how == method
            expected = build(model, loss_func, data).to_dense()
            torch.testing.assert_close(M, (expected + expected.T) / 2, rtol=1e-10, atol=1e-12)
    # cross-entropy over positions ([N, C, T] logits): Λ per position, factored for MC and EF
    gen = torch.Generator().manual_seed(1)
    model = torch.nn.Conv1d(2, 3, 3, padding=1).double()
    X = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 4), generator=gen)
    loss_func = torch.nn.CrossEntropyLoss()
    for build in builders["jacobian"]:
        M, how, root = report._dense_matrix(build(model, loss_func, (X, y)))
        if build is not ck.ggn:  # Monte Carlo and empirical Fisher: M = R Rᵀ
            torch.testing.assert_close(root @ root.T, M, rtol=1e-10, atol=1e-12)
        expected = build(model, loss_func, (X, y)).to_dense()
        assert how == "jacobian"
        torch.testing.assert_close(M, (expected + expected.T) / 2, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def matrix_free(tmp_path_factory):
    """deep_linear (D = 64) above max_dense = 50: the matrix-free report; to_dense forbidden."""
    from curvkit.operators.base import CurvatureOperator

    out = tmp_path_factory.mktemp("matrix_free")
    mp = pytest.MonkeyPatch()

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a D x D matrix was formed in the matrix-free regime")

    mp.setattr(CurvatureOperator, "to_dense", forbidden)
    try:
        page = report.build_report(
            "deep_linear", out, n_samples=N, train_steps=0, progress=False, max_dense=50,
            operators="ggn,hessian,ef,kflr,kfac,tridiag_kflr", figures=False,
        )  # fmt: skip
    finally:
        mp.undo()
    return page, json.loads((out / "results.json").read_text())


def test_matrix_free_report_is_checked_against_dense_references(matrix_free):
    page, results = matrix_free
    html = page.read_text()
    assert results["settings"]["mode"] == "matrix-free" and results["failures"] == []
    assert "eigenvalues" not in results and results["top_eigenvalues"]
    problem = get_problem("deep_linear", seed=0, dtype=torch.float64)
    X, y = problem.train[0][:N], problem.train[1][:N]
    refs = {
        "GGN": dense_ggn(problem.model, problem.loss_func, X, y),
        "Hessian": dense_hessian(problem.model, problem.loss_func, X, y),
        "EF": dense_ef(problem.model, problem.loss_func, X, y),
    }
    for name, M in refs.items():
        lam_max = float(torch.linalg.eigvalsh(M)[-1])
        top = next(r for r in results["lanczos"] if r["name"] == name and r["index"] == 1)
        # a symmetric matrix has an eigenvalue within ||Av - θv|| of every Ritz value θ
        assert abs(top["lanczos"] - lam_max) <= top["residual"] + 1e-12 * abs(lam_max), name
        exact = float(torch.trace(M))
        for row in (r for r in results["traces"] if r["name"] == name):
            assert row["exact"] is None
            assert abs(row["estimate"] - exact) <= 4 * row["stderr"] + 1e-10 * abs(exact), row
    # block-probe Frobenius errors against the exact ones (KFLR is exact on the blocks here)
    import curvkit as ck

    df = pd.read_csv(page.parent / "metrics.csv")
    kflr = ck.kfac(problem.model, problem.loss_func, (X, y), kind="kflr")
    exact = float(torch.linalg.matrix_norm(kflr.to_dense() - refs["GGN"]) /
                  torch.linalg.matrix_norm(refs["GGN"]))  # fmt: skip
    row = _rows(df, "KFLR", "frobenius").iloc[0]
    assert row.method == "block-hutchinson" and row.stderr > 0
    assert abs(row.value - exact) <= 4 * row.stderr
    for block in [b["name"] for b in results["problem"]["blocks"]]:
        assert float(_rows(df, "KFLR", "frobenius", block).value.iloc[0]) < 1e-10, block
    for section in ("operators", "comparison", "spectra", "traces", "landscape", "memory"):
        assert f'<section id="{section}">' in html
    assert "Matrix-free" in html


def test_a_failing_operator_and_phase_keep_the_page(tmp_path, monkeypatch):
    """One operator and the memory phase raise: the rest is computed, the page says what failed."""
    builders = report._builders

    def broken(seed):
        table = builders(seed)

        def boom(*args):
            raise RuntimeError("boom in EF")

        table["EF"] = (boom, table["EF"][1])
        return table

    def memory_fails(model):
        raise ValueError("memory table exploded")

    monkeypatch.setattr(report, "_builders", broken)
    monkeypatch.setattr(report, "_memory", memory_fails)
    page = report.build_report("tiny_mlp", tmp_path, n_samples=16, train_steps=0, progress=False,
                               operators="ef,kflr", figures=False)  # fmt: skip
    html = page.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    failures = {f["phase"]: f["error"] for f in results["failures"]}
    assert failures == {
        "operator EF": "RuntimeError: boom in EF", "memory": "ValueError: memory table exploded"
    }  # fmt: skip
    status = {r["name"]: r["status"] for r in results["operators"]}
    assert status == {"GGN": "ok", "EF": "failed: RuntimeError: boom in EF", "KFLR": "ok"}
    assert '<section id="failures">' in html and "boom in EF" in html
    assert "memory table exploded" in html
    assert set(pd.read_csv(tmp_path / "metrics.csv").approx) == {"KFLR"}


def test_unwritable_out_fails_before_any_computation(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def never(*args, **kwargs):
        raise AssertionError("computed before checking the output folder")

    monkeypatch.setattr(report, "_analyse", never)
    with pytest.raises(ShapeError, match="not a writable folder"):
        report.build_report("tiny_mlp", blocker / "out", progress=False)
    import curvkit as ck

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ShapeError, match="not a writable folder"):
        ck.report(model, torch.nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 2)),
                  out=blocker / "out")  # fmt: skip


def test_headline_never_ranks_exact_matrices_or_calls_a_loss_a_reduction():
    from curvkit.app import report_html

    rows = []
    for approx, frob, red in (("Hessian", 0.01, 0.99), ("KFLR", 0.3, -0.5), ("EF", 0.9, -2.0)):
        rows += [
            {"approx": approx, "block": "all", "metric": "frobenius", "value": frob,
             "direction": None, "damping": None},
            {"approx": approx, "block": "all", "metric": "precond_reduction", "value": red,
             "direction": None, "damping": 1.0},
        ]  # fmt: skip
    results = {"comparison": rows, "settings": {"damping_grid": [0.1, 1.0], "k": 3},
               "problem": {"blocks": []}}  # fmt: skip
    head, _ = report_html._comparison(results, {})
    assert "smallest relative Frobenius error: <b>KFLR</b>" in head
    assert "largest model reduction" not in head
    assert "no approximation&#x27;s step reduces" in head or "no approximation's step" in head


@pytest.mark.parametrize("eigh_all", [1000, 10], ids=["eigh", "householder"])
def test_dense_comparison_matches_compare(monkeypatch, eigh_all):
    """The report's dense comparison gives the rows of ck.compare (exact or via Lanczos)."""
    import curvkit as ck

    monkeypatch.setattr(report, "_EIGH_ALL", eigh_all)
    problem = get_problem("tiny_mlp", seed=0, dtype=torch.float64)
    data = (problem.train[0][:16], problem.train[1][:16])
    ggn = ck.ggn(problem.model, problem.loss_func, data)
    dense = {
        "GGN": ggn.to_dense(),
        "KFLR": ck.kfac(problem.model, problem.loss_func, data, kind="kflr").to_dense(),
        "EF": ck.empirical_fisher(problem.model, problem.loss_func, data).to_dense(),
    }
    dense = {n: (M + M.T) / 2 for n, M in dense.items()}
    g = ggn.loss_and_gradient()[1]
    lam = float(torch.linalg.eigvalsh(dense["GGN"])[-1])
    grid = [lam * 1e-3, lam * 1e-1]
    got = report._compare_dense(dense, ggn, g, grid, 3, 0)
    ops = {n: ck.DenseOperator(M, ggn.param_shapes, block_sizes=ggn.block_sizes,
                               block_names=ggn.block_names) for n, M in dense.items()}  # fmt: skip
    expected = ck.compare({n: ops[n] for n in ("KFLR", "EF")}, ops["GGN"], k=3, damping_grid=grid,
                          gradient=g, reference_name="GGN")  # fmt: skip
    keys = ["approx", "block", "metric", "direction", "damping"]
    merged = got.merge(expected, on=keys, suffixes=("", "_ref"), how="left")
    assert len(merged) == len(got) and merged.value_ref.notna().all()
    np.testing.assert_allclose(merged.value, merged.value_ref, rtol=1e-7, atol=1e-9)


def test_low_rank_factor_gives_the_dense_results():
    """``M = R Rᵀ`` from its thin factor: eigenvalues, top pairs, solves, products, density."""
    import curvkit as ck

    gen = torch.Generator().manual_seed(0)
    D, r = 60, 12
    R = torch.randn(D, r, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, r)
    M = R @ R.T
    low = report._LowRank(R, M)
    exact, vecs = torch.linalg.eigh(M)
    scale = float(exact[-1])
    torch.testing.assert_close(low.eigenvalues(), exact, rtol=0, atol=1e-12 * scale)
    assert (low.eigenvalues()[: D - r] == 0).all()
    w, V = low.top(3)
    torch.testing.assert_close(w, exact.flip(0)[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(M @ V, V * w, rtol=0, atol=1e-11 * scale)
    g = torch.randn(D, generator=gen, dtype=torch.float64)
    lambdas = [1e-3 * scale, scale]
    expected = torch.stack([torch.linalg.solve(M + c * torch.eye(D, dtype=M.dtype), g)
                            for c in lambdas], dim=1)  # fmt: skip
    torch.testing.assert_close(low.solve(g, lambdas), expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(torch.linalg.LinAlgError):
        low.solve(g, [0.0])
    ref = ck.DenseOperator(M)
    X = torch.randn(D, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(report._dense_op(M, ref, low).matmat(X), M @ X, rtol=1e-12, atol=0)
    got = report._tridiagonal_density(low, ref, True, seed=3, steps=30)
    want = ck.spectral_density(ref, num_probes=10, lanczos_steps=30, log=True, seed=3)
    torch.testing.assert_close(
        got.density, want.density, rtol=0, atol=1e-8 * float(want.density.max())
    )
    # used only where it is thin enough (2r <= D) and holds the k top pairs
    assert set(report._low_rank({"EF": R, "wide": torch.randn(D, 31)}, {"EF": M, "wide": M}, 3)) \
        == {"EF"}  # fmt: skip
    assert report._low_rank({"EF": R}, {"EF": M}, r + 1) == {}


def test_python_entry_point_docstring_example_runs():
    import doctest

    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(report) if t.name == "curvkit.app.report.report"]
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.attempted >= 5 and result.failed == 0


def test_dense_hessian_by_parameter_columns_matches_reference():
    """The column-by-parameter Hessian (lower blocks, then symmetry) on a non-chain model.

    The output layer is registered first but used last, and a free parameter sits
    between the layers, so the flat order differs from the order of use; two
    batches check the loss scaling.
    """
    from torch import nn

    import curvkit as ck

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.randn(6))
            self.inp = nn.Linear(4, 6)

        def forward(self, x):
            h = torch.tanh(self.inp(x)) * self.scale
            return self.out(h + torch.sin(h))

    torch.manual_seed(0)
    model, loss_func = Net().double(), nn.CrossEntropyLoss()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    op = ck.hessian(model, loss_func, [(X[:6], y[:6]), (X[6:], y[6:])])
    H = report._hessian_dense(op, chunk=4)
    expected = dense_hessian(model, loss_func, X, y)
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)
    assert op.matvecs == op.dim


def test_householder_reduction_gives_the_dense_spectrum_solves_and_density():
    """Eigenvalues, top eigenpairs, damped solves and the SLQ density from ``M = Q T Q^T``.

    Checked against ``eigh``, dense solves and ``ck.spectral_density`` on the
    matrix itself (the same probes; Lanczos on ``T`` from the rotated probes).
    """
    import curvkit as ck

    gen = torch.Generator().manual_seed(0)
    D = 90
    U = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0]
    lam = torch.cat([torch.logspace(-3, 1, 60, dtype=torch.float64), -torch.rand(30, generator=gen,
                     dtype=torch.float64)])  # fmt: skip
    M = (U * lam) @ U.T
    M = (M + M.T) / 2
    tri = report._Tridiagonal(M)
    exact, vecs = torch.linalg.eigh(M)
    torch.testing.assert_close(tri.eigenvalues(), exact, rtol=0, atol=1e-13)
    w, V = tri.top(4)
    torch.testing.assert_close(w, exact.flip(0)[:4], rtol=0, atol=1e-13)
    torch.testing.assert_close(M @ V, V * w, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(4, dtype=M.dtype), rtol=0, atol=1e-12)
    g = torch.randn(D, generator=gen, dtype=torch.float64)
    lambdas = [2.0, 5.0]
    expected = torch.stack([torch.linalg.solve(M + c * torch.eye(D, dtype=M.dtype), g)
                            for c in lambdas], dim=1)  # fmt: skip
    torch.testing.assert_close(tri.solve(g, lambdas), expected, rtol=1e-11, atol=1e-12)
    for n in (1, 2, D):  # Q from the blocked Householder products: orthogonal, M = Q T Q^T
        A = M[:n, :n].contiguous()
        red = report._Tridiagonal(A)
        eye = torch.eye(n, dtype=A.dtype)
        Q = red.q(eye)
        torch.testing.assert_close(Q.T @ Q, eye, rtol=0, atol=1e-13)
        torch.testing.assert_close(red.qt(eye), Q.T, rtol=0, atol=1e-13)
        torch.testing.assert_close(Q @ red.matmat(Q.T), A, rtol=0, atol=1e-12)
        torch.testing.assert_close(red.qt(g[:n]), Q.T @ g[:n], rtol=0, atol=1e-12)
    # block-diagonal: each block reduced alone, T uncoupled between the blocks
    blocks = [slice(0, 1), slice(1, 31), slice(31, D)]
    B = torch.block_diag(*(M[s, s] for s in blocks))
    named = [(str(i), s) for i, s in enumerate(blocks)]
    assert report._block_diagonal(B, named) and not report._block_diagonal(B, named[:1])
    for i, j in ((0, D - 1), (40, 2)):  # one entry outside the blocks, above or below them
        C = B.clone()
        C[i, j] = 1e-300
        assert not report._block_diagonal(C, named)
    red = report._Tridiagonal(B, blocks)
    assert all(red.e[s.stop - 1] == 0 for s in blocks[:-1])
    exact_B = torch.linalg.eigvalsh(B)
    torch.testing.assert_close(red.eigenvalues(), exact_B, rtol=0, atol=1e-13)
    w, V = red.top(5)
    torch.testing.assert_close(w, exact_B.flip(0)[:5], rtol=0, atol=1e-13)
    torch.testing.assert_close(B @ V, V * w, rtol=0, atol=1e-12)
    expected = torch.stack([torch.linalg.solve(B + c * torch.eye(D, dtype=M.dtype), g)
                            for c in lambdas], dim=1)  # fmt: skip
    torch.testing.assert_close(red.solve(g, lambdas), expected, rtol=1e-11, atol=1e-12)
    Q = red.q(torch.eye(D, dtype=M.dtype))
    torch.testing.assert_close(Q @ red.matmat(Q.T), B, rtol=0, atol=1e-12)
    # a diagonal block is its own reduction (no reflectors)
    B[31:, 31:] = torch.diag(torch.linspace(-1.0, 2.0, D - 31, dtype=M.dtype))
    red = report._Tridiagonal(B, blocks)
    assert len(red.reflectors) == 1  # the 30 x 30 block only (1 x 1 has none)
    torch.testing.assert_close(red.eigenvalues(), torch.linalg.eigvalsh(B), rtol=0, atol=1e-13)
    torch.testing.assert_close(red.solve(g, lambdas), torch.stack(
        [torch.linalg.solve(B + c * torch.eye(D, dtype=M.dtype), g) for c in lambdas], dim=1),
        rtol=1e-11, atol=1e-12)  # fmt: skip
    ref = ck.DenseOperator(M)
    for log in (False, True):
        A = (U * lam.abs()) @ U.T if log else M
        got = report._tridiagonal_density(report._Tridiagonal(A), ref, log, seed=3, steps=30)
        want = ck.spectral_density(ck.DenseOperator(A), num_probes=10, lanczos_steps=30,
                                   log=log, seed=3)  # fmt: skip
        assert got.matvecs == want.matvecs == 300
        torch.testing.assert_close(got.grid, want.grid, rtol=1e-10, atol=0)
        scale = float(want.density.max())
        torch.testing.assert_close(got.density, want.density, rtol=0, atol=1e-9 * scale)
