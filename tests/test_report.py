"""End-to-end tests of ``curvkit report`` on tiny problems, checked against float64 references."""

import argparse
import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from curvkit.app import report
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


@pytest.fixture(scope="module")
def linear_report(tmp_path_factory):
    """``curvkit report`` on the deep linear network, through the sub-command's parser."""
    out = tmp_path_factory.mktemp("deep_linear")
    parser = argparse.ArgumentParser(prog="curvkit")
    report.add_parser(parser.add_subparsers(dest="command"))
    argv = ["report", "--problem", "deep_linear", "--out", str(out), "--n-samples", str(N),
            "--train-steps", "0", "--quiet"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
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
        train_steps=3, progress=False,
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
        ({"problem": "deep_linear", "max_dense": 10}, "max_dense"),
        ({"problem": "deep_linear", "n_samples": 1}, "n_samples"),
        ({"model_path": "missing.py:build"}, "no file"),
        ({"model_path": "no_function_given"}, "file.py:function"),
        ({"problem": "deep_linear", "dtype": "float16"}, "dtype"),
    ],
    ids=["unknown-problem", "too-large", "too-few-samples", "missing-file", "bad-spec", "dtype"],
)
def test_bad_arguments_raise_shape_errors(tmp_path, kwargs, match):
    with pytest.raises(ShapeError, match=match):
        report.build_report(out_dir=tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "index.html").exists()


def test_run_returns_one_on_curvkit_error(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", "--model", "nothing.py:fn", "--out", str(tmp_path)])
    assert report.run(args) == 1
    assert "curvkit report: error:" in capsys.readouterr().err
