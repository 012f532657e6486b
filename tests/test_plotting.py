"""Tests of curvkit.plotting (Agg backend): figures, files, shared scales, untouched rcParams."""

import copy
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib as mpl  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvkit as ck  # noqa: E402
from curvkit import plotting as P  # noqa: E402
from curvkit.errors import ShapeError  # noqa: E402
from curvkit.operators.base import DenseOperator  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def rc_untouched():
    """Every plotting call leaves the global rcParams exactly as they were."""
    before = copy.deepcopy(dict(mpl.rcParams))
    yield
    after = dict(mpl.rcParams)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"rcParams changed: {sorted(changed)}"


def _spd(n, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return scale * (A @ A.T / n + 0.1 * torch.eye(n, dtype=torch.float64))


def _blocks(sizes):
    out, start = [], 0
    for i, s in enumerate(sizes):
        out.append((f"L{i}", slice(start, start + s)))
        start += s
    return out


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def _assert_files(base, formats=("png", "pdf")):
    written = sorted(p.suffix for p in base.parent.glob(base.name + ".*"))
    assert written == sorted(f".{fmt}" for fmt in formats)
    for fmt in formats:
        f = base.with_suffix(f".{fmt}")
        assert f.is_file() and f.stat().st_size > 1000, f
    png = base.with_suffix(".png").read_bytes()
    assert png[:8] == PNG_MAGIC


# -- heatmaps ----------------------------------------------------------------------------
def test_heatmaps_shared_log_scale_and_files(tmp_path):
    blocks = _blocks([5, 7, 4])
    M1, M2 = _spd(16, 0), _spd(16, 1, scale=30.0)
    M1[0, 1] = M1[1, 0] = 0.0  # exact zeros are masked (white)
    fig = P.heatmaps({"a": M1, "b": M2, "c": M1 * M2}, block_slices=blocks, path=tmp_path / "h")
    images = _images(fig)
    assert len(images) == 3 and len(fig.axes) == 4  # three panels and one colour bar
    clims = {im.get_clim() for im in images}
    assert len(clims) == 1, clims
    logs = np.concatenate([torch.log10(M.abs()).flatten().numpy() for M in (M1, M2, M1 * M2)])
    logs = logs[np.isfinite(logs)]
    vmin, vmax = clims.pop()
    assert vmax == pytest.approx(logs.max())
    assert vmin == pytest.approx(max(logs.max() - 8.0, np.percentile(logs, 1)))
    tiny = P.heatmaps({"a": M1, "b": 1e-12 * M2}, decades=3.0)  # the span is capped
    assert _images(tiny)[0].get_clim()[0] == pytest.approx(_images(tiny)[0].get_clim()[1] - 3.0)
    data = images[0].get_array()
    assert data.mask[0, 1] and data.mask[1, 0] and not data.mask[0, 0]
    np.testing.assert_allclose(data[2, 3], np.log10(abs(float(M1[2, 3]))))
    # boundaries of the blocks drawn at 5 and 12 (horizontal and vertical lines)
    ax = fig.axes[0]
    horizontal = [
        line.get_ydata() for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]
    ]
    assert sorted(float(y[0]) for y in horizontal) == [5.0, 12.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["L0", "L1", "L2"]
    _assert_files(tmp_path / "h")
    named = P.heatmaps({"a": M1}, blocks, labels=["x (Linear)", "y (Conv2d)", "z (Linear)"])
    assert [t.get_text() for t in named.axes[0].get_yticklabels()][1] == "y (Conv2d)"
    with pytest.raises(ShapeError, match="labels"):
        P.heatmaps({"a": M1}, blocks, labels=["x"])


def test_heatmaps_pools_large_matrices_by_block_maximum():
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(1200, 1000, generator=gen, dtype=torch.float64)
    fig = P.heatmaps({"M": M}, max_pixels=600)
    shown = _images(fig)[0].get_array()
    assert shown.shape == (600, 500)
    expected = np.log10(np.abs(M.numpy())).reshape(600, 2, 500, 2).max(axis=(1, 3))
    np.testing.assert_allclose(np.ma.getdata(shown), expected)
    assert _images(fig)[0].get_extent() == [0, 1000, 1200, 0]


def test_heatmaps_linear_scale_is_symmetric():
    M = torch.tensor([[1.0, -3.0], [-3.0, 2.0]], dtype=torch.float64)
    fig = P.heatmaps({"M": M, "-M/2": -M / 2}, log=False)
    clims = {im.get_clim() for im in _images(fig)}
    assert clims == {(-3.0, 3.0)}


@pytest.mark.parametrize(
    "blocks",
    [[4, 4], [slice(0, 4), slice(4, 8)], [("a", slice(0, 4)), ("b", slice(4, 8))]],
    ids=["sizes", "slices", "named"],
)
def test_heatmaps_accepts_every_block_form(blocks):
    fig = P.heatmaps({"M": _spd(8)}, block_slices=blocks)
    ax = fig.axes[0]
    vertical = [line.get_xdata() for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1]]
    assert [float(x[0]) for x in vertical] == [4.0]


@pytest.mark.parametrize(
    "mats, blocks",
    [({}, None), ({"v": torch.ones(3)}, None), ({"M": torch.eye(4)}, [3, 3])],
    ids=["empty", "vector", "blocks-too-long"],
)
def test_heatmaps_rejects_bad_input(mats, blocks):
    with pytest.raises(ShapeError, match="heatmaps|block_slices"):
        P.heatmaps(mats, block_slices=blocks)


# -- block norms and block heatmaps ------------------------------------------------------
def test_block_norms_against_loop():
    blocks = _blocks([3, 5, 2])
    M, R = _spd(10, 0), _spd(10, 1)
    norms = P.block_norms(M, blocks)
    rel = P.block_norms(M, blocks, reference=R)
    for i, (_, si) in enumerate(blocks):
        for j, (_, sj) in enumerate(blocks):
            ref = torch.linalg.matrix_norm(R[si][:, sj])
            assert norms[i, j] == pytest.approx(float(torch.linalg.matrix_norm(M[si][:, sj])))
            diff = torch.linalg.matrix_norm(M[si][:, sj] - R[si][:, sj])
            assert rel[i, j] == pytest.approx(float(diff / ref))
    assert np.all(P.block_norms(M, blocks, reference=M) == 0)


def test_block_norms_block_diagonal_and_zero_reference():
    blocks = _blocks([2, 3])
    B = torch.block_diag(_spd(2), _spd(3, 1))
    norms = P.block_norms(B, blocks)
    assert norms[0, 1] == 0 and norms[1, 0] == 0 and norms[0, 0] > 0
    rel = P.block_norms(_spd(5), blocks, reference=B)
    assert np.isinf(rel[0, 1]) and np.isfinite(rel[0, 0])
    with pytest.raises(ShapeError, match="shapes"):
        P.block_norms(torch.eye(5), blocks, reference=torch.eye(4))


def test_block_heatmap_shared_norm_and_annotations(tmp_path):
    a = np.array([[0.1, 1.0], [1.0, 0.05]])
    b = np.array([[0.3, 0.2], [0.2, 0.01]])
    fig = P.block_heatmap({"a": a, "b": b, "c": a * b}, names=["x", "y"], ncols=2,
                          path=tmp_path / "blocks", formats=("png",))  # fmt: skip
    images = _images(fig)
    assert len(images) == 3
    norms = {(im.norm.vmin, im.norm.vmax) for im in images}
    assert len(norms) == 1
    vmin, vmax = norms.pop()
    assert vmin == pytest.approx(0.05 * 0.01) and vmax == pytest.approx(1.0)
    assert [len(ax.texts) for ax in fig.axes if ax.get_images()] == [4, 4, 4]
    assert fig.axes[3].get_visible() is False  # the empty fourth slot of the 2x2 grid
    _assert_files(tmp_path / "blocks", ("png",))


# -- spectra -----------------------------------------------------------------------------
def _densities():
    op = DenseOperator(_spd(40))
    indefinite = DenseOperator(_spd(40) - 0.5 * torch.eye(40, dtype=torch.float64))
    return {
        "log": ck.spectral_density(op, num_probes=3, lanczos_steps=15, log=True),
        "log2": ck.spectral_density(op, num_probes=3, lanczos_steps=15, log=True, seed=1),
        "linear": ck.spectral_density(indefinite, num_probes=3, lanczos_steps=15),
    }


def test_spectral_densities_panels_by_kind(tmp_path):
    sds = _densities()
    fig = P.spectral_densities(sds, path=tmp_path / "sd")
    assert len(fig.axes) == 2
    log_ax, lin_ax = fig.axes
    assert log_ax.get_xscale() == "log" and lin_ax.get_xscale() == "linear"
    assert log_ax.get_yscale() == "log"
    assert len(log_ax.lines) == 2 and len(lin_ax.lines) == 1
    # default: re-smoothed with Silverman's width; the legend states it
    x, y, sigma = P.smooth_density(sds["linear"])
    np.testing.assert_allclose(lin_ax.lines[0].get_ydata(), y)
    assert f"σ = {sigma:.2g}" in lin_ax.lines[0].get_label() or any(
        f"σ = {sigma:.2g}" in t.get_text() for t in fig.legends[0].get_texts()
    )
    _assert_files(tmp_path / "sd")
    raw = P.spectral_densities(sds, kernel_width=None)
    np.testing.assert_allclose(raw.axes[1].lines[0].get_ydata(), sds["linear"].density.numpy())
    np.testing.assert_allclose(raw.axes[0].lines[0].get_xdata(), sds["log"].grid.numpy())
    mixed = P.spectral_densities(sds, kernel_width={"log": 0.1, "linear": None})  # log2: auto
    np.testing.assert_allclose(
        mixed.axes[0].lines[0].get_ydata(), P.smooth_density(sds["log"], 0.1)[1]
    )
    np.testing.assert_allclose(mixed.axes[0].lines[1].get_ydata(), P.smooth_density(sds["log2"])[1])
    np.testing.assert_allclose(mixed.axes[1].lines[0].get_ydata(), sds["linear"].density.numpy())
    one = P.spectral_densities({"linear": sds["linear"]}, logy=False)
    assert len(one.axes) == 1 and one.axes[0].get_yscale() == "linear"
    with pytest.raises(ShapeError, match="at least one"):
        P.spectral_densities({})


@pytest.mark.parametrize(
    "values, scale",
    [([3.0, 1.0, 2.0, 0.5], "log"), ([3.0, -1.0, 2.0, 0.0], "symlog")],
    ids=["positive", "indefinite"],
)
def test_eigenvalue_ranks_sorted_and_scaled(values, scale):
    fig = P.eigenvalue_ranks({"A": torch.tensor(values), "B": np.array(values) * 2}, top=3)
    ax = fig.axes[0]
    assert ax.get_yscale() == scale and ax.get_xscale() == "log"
    expected = sorted(values, reverse=True)[:3]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 2, 3])
    with pytest.raises(ShapeError, match="scale"):
        P.eigenvalue_ranks({"A": values}, scale="loglog")


# -- comparison tables -------------------------------------------------------------------
@pytest.fixture(scope="module")
def table():
    shapes = [torch.Size([4]), torch.Size([6])]
    B = DenseOperator(_spd(10), shapes, block_sizes=[4, 6], block_names=["l0", "l1"])
    approx = {
        "same": DenseOperator(B.matrix.clone(), shapes, block_sizes=[4, 6]),
        "blockdiag": DenseOperator(
            torch.block_diag(B.matrix[:4, :4], B.matrix[4:, 4:]), shapes, block_sizes=[4, 6]
        ),
        "scaled": DenseOperator(2 * B.matrix, shapes, block_sizes=[4, 6]),
    }
    g = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ck.compare(approx, B, k=3, gradient=g, damping_grid=(1e-2, 1e-1, 1.0))


def test_metric_bars_overlap_heights(tmp_path, table):
    fig = P.metric_bars(table, "overlap", path=tmp_path / "ov", formats=("png",))
    bars = fig.axes[0].patches
    expected = table[(table.metric == "overlap") & (table.block == "all")]["value"].to_numpy()
    np.testing.assert_allclose([b.get_height() for b in bars], expected)
    assert bars[0].get_height() == pytest.approx(1.0)  # identical operator
    _assert_files(tmp_path / "ov", ("png",))


def test_metric_bars_directional_start_at_one(table):
    fig = P.metric_bars(table, "directional", directions=("eigvec_1", "gradient"))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    bars = ax.patches
    assert len(bars) == 3 * 2
    assert all(b.get_y() == pytest.approx(1.0) for b in bars)
    tops = sorted(b.get_y() + b.get_height() for b in bars)
    rows = table[(table.metric == "directional") & (table.block == "all")]
    rows = rows[rows.direction.isin(["eigvec_1", "gradient"])]
    np.testing.assert_allclose(tops, sorted(rows["value"]))
    assert max(tops) == pytest.approx(2.0)  # the scaled operator doubles every curvature


def test_metric_bars_per_block_groups(table):
    fig = P.metric_bars(table, "frobenius", block=None)
    assert len(fig.axes[0].patches) == 3 * 3  # approximations x (all, l0, l1)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["all", "l0", "l1"]
    with pytest.raises(ShapeError, match="no rows"):
        P.metric_bars(table, "nonsense")
    with pytest.raises(ShapeError, match="lacks columns"):
        P.metric_bars(pd.DataFrame({"x": [1]}))


def test_preconditioning_quality_lines(tmp_path, table):
    fig = P.preconditioning_quality(table, path=tmp_path / "pq", formats=("png",))
    cos_ax, red_ax = fig.axes[:2]
    assert cos_ax.get_xscale() == "log"
    same = cos_ax.lines[0]
    np.testing.assert_allclose(same.get_xdata(), [1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(same.get_ydata(), 1.0)  # identical operator: exact step
    rows = table[(table.metric == "precond_reduction") & (table.approx == "scaled")]
    rows = rows[rows.block == "all"]
    np.testing.assert_allclose(red_ax.lines[2].get_ydata(), rows.sort_values("damping")["value"])
    _assert_files(tmp_path / "pq", ("png",))
    with pytest.raises(ShapeError, match="precond"):
        P.preconditioning_quality(table[table.metric == "overlap"])


# -- loss landscape ----------------------------------------------------------------------
def _regression(device):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().to(device)
    X = torch.randn(12, 3, generator=gen, dtype=torch.float64).to(device)
    y = torch.randn(12, 2, generator=gen, dtype=torch.float64).to(device)
    return model, nn.MSELoss(), X, y


@pytest.mark.parametrize("device", DEVICES)
def test_loss_along_directions_matches_moved_copy(device):
    model, loss_func, X, y = _regression(device)
    D = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(D, generator=gen, dtype=torch.float64).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    ids = [id(p) for p in model.parameters()]
    alphas = [-0.5, 0.0, 0.25]
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]  # two batches: the loss of the concatenation
    df = P.loss_along_directions(model, loss_func, batches, {"d": d}, alphas, normalize=False)
    for a, value in zip(alphas, df["loss"]):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(moved.parameters()) + a * d, moved.parameters()
            )
        assert value == pytest.approx(loss_func(moved(X), y).item(), rel=1e-12)
    # the model is exactly as before: same tensors, same values, no gradients
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    unit = P.loss_along_directions(model, loss_func, (X, y), {"d": d}, [1.0])
    expected = P.loss_along_directions(model, loss_func, (X, y), {"d": d / d.norm()}, [1.0],
                                       normalize=False)  # fmt: skip
    assert unit["loss"][0] == pytest.approx(expected["loss"][0], rel=1e-12)
    with pytest.raises(ShapeError, match="entries"):
        P.loss_along_directions(model, loss_func, (X, y), {"short": d[:3]}, [1.0])


def test_loss_landscape_figure(tmp_path):
    model, loss_func, X, y = _regression("cpu")
    D = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(2)
    dirs = {"eigvec 1": torch.randn(D, generator=gen), "random 1": torch.randn(D, generator=gen)}
    fig = P.loss_landscape(model, loss_func, (X, y), dirs, np.linspace(-1, 1, 5),
                           path=tmp_path / "land", formats=("png",))  # fmt: skip
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert ax.lines[1].get_linestyle() == "--" and ax.lines[0].get_linestyle() == "-"
    assert list(fig.curvkit_data.columns) == ["direction", "alpha", "loss"]
    _assert_files(tmp_path / "land", ("png",))


# -- estimators and training -------------------------------------------------------------
def test_estimator_error_aggregates_seeds(tmp_path):
    rows = [
        {"method": m, "matvecs": n, "error": e * s}
        for m, e in (("hutchinson", 1.0), ("hutch++", 0.1))
        for n in (10, 40)
        for s in (1.0, 3.0)
    ]
    fig = P.estimator_error(rows, path=tmp_path / "est", formats=("png",))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) == 3  # two estimators and the n^(-1/2) reference
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [2.0, 2.0])  # mean over seeds
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.2, 0.2])
    _assert_files(tmp_path / "est", ("png",))


def test_curvature_over_training_from_tracker(tmp_path):
    from curvkit.diagnostics.tracking import COLUMNS, CurvatureTracker

    model, loss_func, X, y = _regression("cpu")
    tracker = CurvatureTracker(model, loss_func, every=1, k=2, num_matvecs=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        tracker.maybe_record(step, X, y)
        opt.zero_grad()
        loss_func(model(X), y).backward()
        opt.step()
    df = tracker.to_dataframe()
    assert list(df.columns) == COLUMNS
    quantities = list(dict.fromkeys(df["quantity"]))
    fig = P.curvature_over_training(df, path=tmp_path / "train", formats=("png",))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == quantities
    eig_ax = visible[quantities.index("eigenvalue")]
    assert len(eig_ax.lines) == 2  # one line per eigenvalue index
    assert [t.get_text() for t in eig_ax.get_legend().get_texts()] == ["1", "2"]
    np.testing.assert_allclose(visible[0].lines[0].get_xdata(), [0, 1, 2])
    _assert_files(tmp_path / "train", ("png",))
    with pytest.raises(ShapeError, match="no rows"):
        P.curvature_over_training(df, quantities=["nothing"])


def test_save_formats_and_suffix(tmp_path):
    fig = P.eigenvalue_ranks({"A": [2.0, 1.0]})
    out = P.save(fig, tmp_path / "sub" / "fig.anything", formats=("png", "svg"))
    assert [p.name for p in out] == ["fig.png", "fig.svg"]
    assert all(p.is_file() for p in out)


def test_import_curvkit_does_not_load_matplotlib():
    code = (
        "import sys, curvkit, curvkit.app.report, curvkit.diagnostics.metrics; "
        "import curvkit.diagnostics.spectral; "
        "bad = [m for m in ('matplotlib', 'seaborn') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- style, labels, coinciding series, value labels --------------------------------------
def _pdf_has_image(path) -> bool:
    return b"/Subtype /Image" in path.read_bytes()


def test_style_is_seaborn_colorblind_without_global_changes():
    import seaborn as sns

    assert list(P.PALETTE) == sns.color_palette("colorblind").as_hex()
    assert P.STYLE["axes.prop_cycle"].by_key()["color"] == list(P.PALETTE)
    fig = P.eigenvalue_ranks({"A": [3.0, 2.0, 1.0]})
    assert fig.axes[0].lines[0].get_color() == P.PALETTE[0]


def test_metric_labels_on_value_axis(table):
    for metric in ("frobenius", "cosine", "spectral"):
        fig = P.metric_bars(table, metric)
        assert fig.axes[0].get_ylabel() == P.METRIC_LABELS[metric]
    assert "relative Frobenius error" in P.metric_label("frobenius")
    assert P.metric_bars(table, "overlap").axes[0].get_ylabel() == P.metric_label("overlap", 3)
    assert "top-3" in P.metric_label("overlap", 3)
    pq = P.preconditioning_quality(table)
    assert [ax.get_ylabel() for ax in pq.axes[:2]] == [
        P.METRIC_LABELS["precond_cosine"],
        P.METRIC_LABELS["precond_reduction"],
    ]


def test_zero_bars_carry_value_labels(table):
    # "same" equals the reference: zero Frobenius error everywhere, invisible without a label
    fig = P.metric_bars(table, "frobenius", block=None)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == len(ax.patches) == 9
    zero = table[(table.metric == "frobenius") & (table.approx == "same")]["value"]
    assert (zero == 0).all()
    assert texts[:3] == ["0", "0", "0"]  # the first hue level is "same"
    scaled = table[(table.metric == "frobenius") & (table.approx == "scaled")]["value"]
    assert f"{scaled.iloc[0]:.3g}" in texts
    one = P.metric_bars(table, "frobenius")  # one bar per approximation
    assert [t.get_text() for t in one.axes[0].texts][0] == "0"


def test_coinciding_series_detected_and_marked(table):
    same = P.coinciding_series({"a": [1.0, 2.0], "b": [1.0, 2.0 + 1e-12], "c": [1.0, 2.5]})
    assert same == {"b": "a"}
    assert P.coinciding_series({"a": [1.0], "b": [1.0, 1.0]}) == {}
    # a fourth approximation equal to "scaled": hatched bars and a legend note
    twin = table[table.approx == "scaled"].assign(approx="twin")
    df = pd.concat([table, twin], ignore_index=True)
    fig = P.metric_bars(df, "frobenius", block=None)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["same", "blockdiag", "scaled", "twin (= scaled)"]
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 3
    # lines: the twin is dashed on top and labelled
    pq = P.preconditioning_quality(df)
    labels = [line.get_label() for line in pq.axes[0].lines if not line.get_label().startswith("_")]
    assert "twin (= scaled)" in labels
    twin_line = next(ln for ln in pq.axes[0].lines if ln.get_label() == "twin (= scaled)")
    assert twin_line.get_linestyle() == "--"
    ranks = P.eigenvalue_ranks({"x": [3.0, 1.0], "y": [3.0, 1.0], "z": [2.0, 1.0]})
    assert [ln.get_label() for ln in ranks.axes[0].lines] == ["x", "y (= x)", "z"]


def test_layer_labels_from_model_and_records():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(), nn.Linear(8, 3)
    )
    assert P.layer_labels(model) == ["0.0 (Conv2d)", "2 (Linear)"]
    assert P.layer_labels(model, with_type=False) == ["0.0", "2"]
    prob = ck.problems.get_problem("tiny_mlp", dtype=torch.float64)
    recs = ck.extract(prob.model, prob.loss_func, *prob.train, quantities=("kflr",))
    assert P.layer_labels(recs) == ["0 (Linear)", "2 (Linear)"] == P.layer_labels(prob.model)
    with pytest.raises(ShapeError, match="layer_labels"):
        P.layer_labels(3)


# -- spectra: kernel width, histogram, per-layer spectra ---------------------------------
def test_kernel_width_is_silverman_on_weighted_ritz_values():
    gen = np.random.default_rng(0)
    x = gen.normal(size=500)
    q1, q3 = np.percentile(x, [25, 75])
    silverman = 0.9 * min(x.std(), (q3 - q1) / 1.34) * 500 ** (-0.2)
    assert P.kernel_width_for(x) == pytest.approx(silverman, rel=0.02)
    # integer weights act as repeated values (same spread, Kish size of the weights)
    w = np.where(np.arange(500) < 250, 2.0, 1.0)
    rep = np.concatenate([x[:250], x])
    q1, q3 = np.percentile(rep, [25, 75])
    n_eff = w.sum() ** 2 / (w**2).sum()
    expected = 0.9 * min(rep.std(), (q3 - q1) / 1.34) * n_eff ** (-0.2)
    assert P.kernel_width_for(x, w) == pytest.approx(expected, rel=0.03)
    # log: in decades of the clipped values; never below 1/200 of the span
    assert P.kernel_width_for(10.0**x, log=True, cutoff=1e-10) == pytest.approx(silverman, rel=0.02)
    # log: nodes at or below the cutoff (a point mass placed at it) do not set the width
    low_rank = np.r_[np.full(2000, 1e-12), 10.0**x]
    assert P.kernel_width_for(low_rank, log=True, cutoff=1e-6) == pytest.approx(
        P.kernel_width_for(10.0**x, log=True, cutoff=1e-6), rel=1e-12
    )
    spike = np.r_[np.zeros(99), 1.0]
    assert P.kernel_width_for(spike) == pytest.approx(max(0.9 * spike.std() * 100**-0.2, 1 / 200))
    with pytest.raises(ShapeError, match="kernel_width_for"):
        P.kernel_width_for([1.0, 2.0], [1.0])


def _local_maxima(y):
    return int(((y[1:-1] > y[:-2]) & (y[1:-1] > y[2:])).sum())


def test_smooth_density_reproduces_slq_and_removes_ripple():
    op = DenseOperator(torch.diag(torch.linspace(1.0, 2.0, 300, dtype=torch.float64)))
    sd = ck.spectral_density(op, num_probes=4, lanczos_steps=30)
    x, y, sigma = P.smooth_density(sd, sd.kernel_width)
    np.testing.assert_allclose(x, sd.grid.numpy(), rtol=1e-12)
    np.testing.assert_allclose(y, sd.density.numpy(), rtol=1e-9, atol=1e-12)
    x, y, sigma = P.smooth_density(sd)  # Silverman's width: a flat spectrum has one bump
    assert sigma > 5 * sd.kernel_width
    assert np.trapezoid(y, x) == pytest.approx(1.0, abs=1e-6)
    assert _local_maxima(sd.density.numpy()) > 5 and _local_maxima(y) <= 2
    logsd = ck.spectral_density(op, num_probes=4, lanczos_steps=30, log=True)
    x, y, _ = P.smooth_density(logsd)
    assert np.trapezoid(y, np.log10(x)) == pytest.approx(1.0, abs=1e-6)


def test_eigenvalue_histogram_counts_both_signs(tmp_path):
    eigs = np.r_[np.geomspace(1e-4, 10.0, 30), -np.geomspace(1e-3, 0.5, 7), 0.0, 1e-14]
    fig = P.eigenvalue_histogram(eigs, bins=12, path=tmp_path / "hist")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    data = fig.curvkit_data
    counts = data.groupby("sign")["count"].sum()
    assert counts["positive"] == 30 and counts["negative"] == 7
    cut = 1e-8 * 10.0
    assert data["left"].min() == pytest.approx(cut)
    assert "2 eigenvalues with |λ| < 1e-07 not shown" in [t.get_text() for t in ax.texts]
    heights = [p.get_data().values for p in ax.patches]  # stairs: positive up, negative down
    assert heights[0].sum() == 30 and heights[1].sum() == -7
    assert r"\lambda > 0$ up" in ax.get_ylabel() and r"\lambda < 0$ down" in ax.get_ylabel()
    _assert_files(tmp_path / "hist")
    assert not _pdf_has_image(tmp_path / "hist.pdf")
    two = P.eigenvalue_histogram({"H": eigs, "GGN": np.abs(eigs)})
    assert two.curvkit_data.groupby(["name", "sign"])["count"].sum()[("GGN", "negative")] == 0
    with pytest.raises(ShapeError, match="eigenvalue_histogram"):
        P.eigenvalue_histogram([])


def test_kronecker_eigenvalues_against_dense_kron():
    G, A = _spd(3, 0), _spd(4, 1)
    dense = torch.linalg.eigvalsh(torch.kron(G, A)).flip(0).numpy()
    np.testing.assert_allclose(P.kronecker_eigenvalues(G, A), dense, rtol=1e-10)


def test_layer_spectra_kflr_exact_on_last_linear_layer(tmp_path):
    """MSE with a linear output layer: KFLR's last block equals the GGN's (M&G 2015 §3.1)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    loss_func = nn.MSELoss()
    recs = ck.extract(model, loss_func, X, y, quantities=("kflr",))
    op = ck.ggn(model, loss_func, (X, y))
    exact = P.diagonal_blocks(op.to_dense(), op.block_slices(), P.layer_labels(model))
    assert list(exact) == ["0 (Linear)", "2 (Linear)"]
    spectra = P.kronecker_spectra(recs, "kflr")
    np.testing.assert_allclose(
        spectra["2 (Linear)"], np.linalg.eigvalsh(exact["2 (Linear)"])[::-1], rtol=1e-8,
        atol=1e-12 * spectra["2 (Linear)"].max(),
    )  # fmt: skip
    fig = P.layer_spectra(recs, exact, approx_name="KFLR", exact_name="GGN",
                          path=tmp_path / "ls")  # fmt: skip
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["0 (Linear)", "2 (Linear)"]
    assert [ln.get_label() for ln in axes[0].lines] == ["GGN", "KFLR"]
    assert [ln.get_label() for ln in axes[1].lines] == ["GGN", "KFLR (= GGN)"]
    assert axes[1].lines[1].get_linestyle() == "--"
    _assert_files(tmp_path / "ls")
    assert not _pdf_has_image(tmp_path / "ls.pdf")
    pairs = {r.name: (r.G["kflr"], r.A) for r in recs.layers}
    again = P.layer_spectra(pairs)  # (G, A) pairs without exact blocks
    np.testing.assert_allclose(again.axes[1].lines[0].get_ydata(), spectra["2 (Linear)"])
    with pytest.raises(ShapeError, match="exact blocks"):
        P.layer_spectra(recs, {"only": exact["0 (Linear)"]})
    with pytest.raises(ShapeError, match="kinds present"):
        P.kronecker_spectra(recs, "kfac")


def test_factor_heatmaps_per_layer(tmp_path):
    prob = ck.problems.get_problem("tiny_cnn", dtype=torch.float64)
    recs = ck.extract(prob.model, prob.loss_func, *prob.train, quantities=("kflr",))
    fig = P.factor_heatmaps(recs, "kflr", path=tmp_path / "fh")
    heat = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert len(heat) == 2 * 3
    titles = [ax.get_title() for ax in heat]
    assert titles[:3] == ["A: 0 (Conv2d)", "A: 2 (Conv2d)", "A: 5 (Linear)"]
    assert titles[3:] == ["G (kflr)"] * 3
    mesh = heat[0].collections[0]
    A = recs.layers[0].A.numpy()
    np.testing.assert_allclose(np.ma.getdata(mesh.get_array()).reshape(A.shape),
                               np.log10(np.abs(A)))  # fmt: skip
    assert mesh.get_rasterized()
    _assert_files(tmp_path / "fh")
    pdf = (tmp_path / "fh.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/Subtype /Image" in pdf  # cells raster, page vector
    with pytest.raises(ShapeError, match="kinds present"):
        P.factor_heatmaps(recs, "kfac")


@pytest.mark.parametrize("plot", ["bars", "lines", "densities", "training"])
def test_line_and_bar_pdfs_are_vector(tmp_path, table, plot):
    base = tmp_path / plot
    if plot == "bars":
        P.metric_bars(table, "frobenius", block=None, path=base)
    elif plot == "lines":
        P.preconditioning_quality(table, path=base)
    elif plot == "densities":
        P.spectral_densities(_densities(), path=base)
    else:
        df = pd.DataFrame({"step": [0, 1, 2], "quantity": "loss", "value": [3.0, 2.0, 1.0]})
        fig = P.curvature_over_training(df, path=base)
        assert fig.axes[0].get_ylabel() == P.QUANTITY_LABELS["loss"]
    _assert_files(base)
    pdf = base.with_suffix(".pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and not _pdf_has_image(base.with_suffix(".pdf"))
