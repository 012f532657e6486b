"""The research scripts in analysis/ run end to end with ``--quick`` and write what they promise.

Beyond "it runs", each test checks a property the script's numbers must have
whatever the random draws: exact cases of the approximations, dense
cross-checks of the matrix-free estimates, structural zeros.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import curvkit as ck

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSIS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_compare_approximations_quick(tmp_path):
    script = load("compare_approximations")
    docs = tmp_path / "docs"
    res = script.main(["--quick", "--out", str(tmp_path / "out"), "--docs", str(docs)])
    out = tmp_path / "out"
    for f in ("metrics.csv", "block_errors.csv", "block_mass.csv", "training.csv"):
        assert (out / f).is_file(), f
    for f in script.DOCS_FIGURES:
        assert (docs / f).is_file(), f
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["approx"]) == set(script.approximations(0))
    assert set(metrics["checkpoint"]) == {"init", "trained"}
    frob = metrics[metrics["metric"] == "frobenius"].set_index(["checkpoint", "approx", "block"])
    last = f"W{len(script.parse_args(['--quick']).widths) - 1}"
    for tag in ("init", "trained"):
        # MSE, linear output layer: the last GGN block is (2/C) I (x) A, and so is KFLR's
        assert frob.loc[(tag, "KFLR", last), "value"] < 1e-10
        # but block-diagonal KFLR misses every cross-layer block: a positive whole-matrix error
        assert frob.loc[(tag, "KFLR", "all"), "value"] > 1e-6
    mass = pd.read_csv(out / "block_mass.csv").set_index(["checkpoint", "kind", "name"])
    shares = mass[["diagonal", "first_off_diagonal", "beyond"]].dropna()
    assert len(shares) == len(mass) - 2  # the diagonal GGN has no off-diagonal entries
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    for tag in ("init", "trained"):
        # structural zeros: block-diagonal inverse, block-tri-diagonal inverse (M&G §4.3)
        kflr = mass.loc[(tag, "inverse", "KFLR inverse")]
        assert kflr["first_off_diagonal"] + kflr["beyond"] < 1e-20
        assert mass.loc[(tag, "inverse", "tri-diag KFLR inverse"), "beyond"] < 1e-20
        assert mass.loc[(tag, "inverse", "exact (G + λI)⁻¹"), "beyond"] > 1e-8
    assert res["wall"] > 0


def test_spectra_quick(tmp_path):
    script = load("spectra")
    res = script.main(["--quick", "--out", str(tmp_path), "--docs", str(tmp_path / "docs")])
    for f in ("eigenvalues.csv", "densities.csv", "traces.csv", "crosscheck.csv", "gaps.csv"):
        assert (tmp_path / f).is_file(), f
    assert (tmp_path / "spec_density_tiny_mlp.png").is_file()
    assert (tmp_path / "docs" / "spec_ranks_tiny_mlp.png").is_file()
    cross = res["crosscheck"]
    assert set(cross["operator"]) == set(script.OPERATORS)
    # restarted Lanczos against dense eigvalsh on the same matrices (float64)
    assert cross["rel_diff"].max() < 1e-8
    traces = res["traces"]
    assert traces["stderr"].gt(0).all() and np.isfinite(traces["exact"]).all()
    eig = res["eigenvalues"]
    hess = eig[(eig["operator"] == "Hessian") & (eig["method"] == "lanczos")]
    assert hess[hess["which"] == "SA"]["value"].max() <= hess[hess["which"] == "LA"]["value"].min()


def test_spectra_exact_traces_match_dense():
    """The matrix-free exact traces (used where D is too large to densify) against dense ones."""
    script = load("spectra")
    p = ck.problems.get_problem("tiny_mlp", seed=1, dtype=torch.float64)
    data = p.train
    got = script.exact_traces(p.model, p.loss_func, data)
    ops = script.operators(p.model, p.loss_func, data, seed=0)
    for name, value in got.items():
        assert value == pytest.approx(float(torch.trace(ops[name].to_dense())), rel=1e-10), name


def test_kfac_expand_vs_reduce_quick(tmp_path):
    script = load("kfac_expand_vs_reduce")
    res = script.main(["--quick", "--out", str(tmp_path)])
    for f in ("metrics.csv", "timings.csv", "conv_frobenius.png", "conv_cosine.png"):
        assert (tmp_path / f).is_file(), f
    m = res["metrics"]
    assert set(m["kfac_approx"]) == {"expand", "reduce"}
    keys = ["checkpoint", "kind", "block", "metric", "damping", "direction"]
    wide = m.pivot_table(index=keys, columns="kfac_approx", values="value", dropna=False)
    wide = wide.dropna()
    linear = wide[wide.index.get_level_values("block").str.startswith("Linear")]
    conv = wide[wide.index.get_level_values("block").str.startswith("Conv2d")]
    # no weight sharing in a Linear layer: expand and reduce are the same approximation
    assert len(linear) > 0
    np.testing.assert_allclose(linear["expand"], linear["reduce"], rtol=1e-8, atol=1e-12)
    # on conv layers they are different approximations
    assert (conv["expand"] - conv["reduce"]).abs().max() > 1e-3


def test_bench_spectral_quick(tmp_path):
    script = load("bench_spectral")
    res = script.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "spec_bench_mlp_ggn.png").is_file()
    bench = pd.read_csv(tmp_path / "bench.csv")
    assert (bench["wall_s"] > 0).all()
    lanczos = bench[bench["task"].str.contains("Lanczos")].iloc[0]
    assert lanczos["matvecs"] >= res["eigenvalues"].shape[0]
    eig = res["eigenvalues"]
    # float32 Lanczos against float64 dense eigvalsh of the same GGN
    np.testing.assert_allclose(eig["value"], eig["dense"], rtol=0, atol=1e-4 * eig["dense"].max())


def test_tri_vs_block_direction_quick(tmp_path):
    from curvkit.app import train as T

    script = load("tri_vs_block_direction")
    summary = script.main(["--quick", "--every", "2", "--threads", "1", "--out", str(tmp_path)])
    for f in ("steps.csv", "curve.csv", "summary.md"):
        assert (tmp_path / f).is_file(), f
    assert summary["scored"].sum() == 6
    steps = pd.read_csv(tmp_path / "steps.csv")
    # α, μ minimise the quadratic model: no scored step can increase it
    assert (steps[["model_block", "model_tri"]] > 0).all().all()
    # the scoring leaves no trace: the run is the plain block-diagonal K-FAC run
    problem = ck.problems.get_problem("mnist_autoencoder_half", seed=0, init="sparse")
    method = T.Method("plain", T._kfac(damping=1e-3, min_damping=1e-6), False)
    plain = T.train_run(problem, "kfac", None, 12, 250, 0, 1, method=method)
    curve = pd.read_csv(tmp_path / "curve.csv")
    np.testing.assert_allclose(curve["train_loss"], [r["train_loss"] for r in plain], rtol=1e-5)
    np.testing.assert_allclose(curve["damping"][1:], [r["damping"] for r in plain[1:]])


def test_gallery_quick(tmp_path):
    script = load("gallery")
    res = script.main(["--quick", "--out", str(tmp_path)])
    assert len(res["figures"]) == 13
    for files in res["figures"].values():
        assert [f.suffix for f in files] == [".png", ".pdf"]
        assert all(f.is_file() and f.stat().st_size > 1000 for f in files)
    # no conv cross factors: tri-diagonal KFLR is block-diagonal KFLR, and is marked so
    frob = res["table"].query("metric == 'frobenius'").set_index(["approx", "block"])["value"]
    for block in frob.loc["KFLR"].index:
        assert abs(frob.loc[("tri-diag KFLR", block)] - frob.loc[("KFLR", block)]) < 1e-10
    assert [r.name for r in res["records"].layers] == ["blocks.0.conv1", "blocks.1.conv2", "head"]


@pytest.mark.slow
def test_peer_coverage_counts_one_setting(tmp_path):
    script = load("peer_coverage")
    res = script.main(["--only", "hbp-n1-sigmoid-ce", "--csv", str(tmp_path / "rows.csv")])
    rows = pd.read_csv(tmp_path / "rows.csv")
    assert len(rows) == len(res["rows"]) > 0
    assert set(rows["backend"]) == {"auto", "graph"}  # a Sequential chain: both backends
    assert set(rows["status"]) <= {"ok", "peer_failed"}
    assert f"ok {int((rows['status'] == 'ok').sum())}," in res["summary"]


def test_bench_graph_tiny():
    script = load("bench_graph")
    res = script.main(["--tiny", "--reps", "1"])
    assert set(res) == {"autoencoder", "resnet", "transformer"}
    for key, r in res.items():
        assert all(t > 0 for t in r["medians"].values()), key
        assert "graph grad+kfac" in r["peaks"], key
        # no D x D matrix: every curvkit call peaks far below one dense float32 D x D
        for name, peak in r["peaks"].items():
            assert 0 < peak < 4 * r["D"] ** 2 / 100, (key, name, peak)
    ae = res["autoencoder"]
    # per-example gradients hold N x D floats: the peak is at least that
    assert ae["peaks"]["graph grad+batch_grad"] >= 8 * 4 * ae["D"]


def test_bench_report_alternates_checkouts():
    """Phase timings from each run's results.json; compute is every phase but the figures."""
    script = load("bench_report")
    rows = script.main(["--problem", "tiny_mlp", "--runs", "1", "--baseline", str(ANALYSIS.parent)])
    assert [(label, run) for label, run, _ in rows] == [("this", 1), ("baseline", 1)]
    for _, _, row in rows:
        phases = {k: v for k, v in row.items() if k not in ("compute", "figures", "wall", "load")}
        assert {"train", "operators", "spectra", "landscape", "inverses"} <= set(phases)
        assert row["compute"] == pytest.approx(sum(phases.values()))
        assert row["figures"] < 0.5 and row["wall"] > row["compute"] > 0  # nothing drawn


def test_train_architectures_quick(tmp_path):
    script = load("train_architectures")
    docs = tmp_path / "docs"
    written = script.main(
        ["--quick", "--seeds", "2", "--out", str(tmp_path / "out"), "--docs", str(docs)]
    )
    for key in ("resnet", "transformer"):
        files = written[key]
        for f in files.values():
            assert f.is_file(), f
        for name in ("summary", "grid", "missing"):
            assert (docs / f"arch_{files[name].name}").is_file()
        assert (docs / f"arch_{key}_curves.pdf").is_file()
        curves = pd.read_csv(files["curves"])
        summary = pd.read_csv(files["summary"])
        missing = pd.read_csv(files["missing"])
        ran = set(summary["optimizer"])
        # every method of the grid either ran or is listed as missing with a reason
        assert ran | set(missing["method"]) == set(script.GRIDS[key])
        assert not ran & set(missing["method"])
        assert (missing["reason"].str.len() > 0).all()
        assert "adam" in ran
        # same seed, same initial model: every method starts from the same training loss
        start = curves[curves["step"] == 0].groupby("seed")["train_loss"]
        np.testing.assert_allclose(start.max(), start.min(), rtol=1e-6)
        assert set(curves["seed"]) == {0, 1}
        assert summary["test_accuracy"].between(0, 1).all()


def test_architecture_approximations_quick(tmp_path):
    script = load("architecture_approximations")
    res = script.main(["--quick", "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "d")])
    df, missing = res["metrics"], res["missing"]
    for key in ("resnet", "transformer"):
        assert (tmp_path / "d" / f"arch_cmp_{key}_metrics.csv").is_file()
    assert (tmp_path / "d" / "arch_cmp_resnet_transformer_missing.csv").is_file()
    for p in res["figures"]:
        assert p.is_file() and p.with_suffix(".pdf").is_file()
    # every approximation was either compared or listed with its reason, per setting
    settings = df.groupby(["problem", "checkpoint", "mode"])["approx"].apply(set)
    for (problem, checkpoint, mode), names in settings.items():
        left = missing[
            (missing["problem"] == problem)
            & (missing["checkpoint"] == checkpoint)
            & (missing["mode"] == mode)
        ]
        assert names | set(left["approx"]) <= set(script.APPROXIMATIONS)
        assert not names & set(left["approx"])
    # exact case: A = diag(B) gives <A, B> = |A|^2, so frobenius^2 + cosine^2 = 1
    diag = df[(df["approx"] == "diag GGN") & df["metric"].isin(["frobenius", "cosine"])]
    assert len(diag)
    wide = diag.pivot_table("value", ["problem", "checkpoint", "mode", "block"], "metric")
    np.testing.assert_allclose(wide["frobenius"] ** 2 + wide["cosine"] ** 2, 1.0, rtol=1e-8)
    # the ResNet's BatchNorm in train mode: per-example approximations are not attempted
    train_bn = df[(df["problem"] == "resnet") & (df["mode"] == "train")]
    assert not set(train_bn["approx"]) & {"EKFAC (empirical)", "diag GGN"}
