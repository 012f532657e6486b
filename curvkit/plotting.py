r"""Figures of curvature comparisons, spectra and estimators (the only module using matplotlib).

Every function returns a :class:`matplotlib.figure.Figure` built without
``pyplot`` (no global figure registry, works under any backend, Agg included)
and, when ``path`` is given, writes it as PNG and PDF (``path`` without its
suffix plus ``.png`` / ``.pdf``; ``formats`` chooses others). The PDF is vector
graphics: lines, bars and text stay vectors; only matrix heatmaps
(:func:`heatmaps`, :func:`block_heatmap`, :func:`factor_heatmaps`) are embedded
as raster images inside the vector page (one pixel per matrix entry or pooled
block, so the file stays small while axes, ticks and labels stay vectors).

Style: one colour-blind-safe look for every figure: seaborn's ``"whitegrid"``
axes style and ``"paper"`` context with its ``"colorblind"`` palette
(:data:`STYLE`, :data:`PALETTE`), applied with :func:`matplotlib.rc_context`
around building and saving; the global ``rcParams`` are never changed (no
``seaborn.set_theme``). Tidy tables are drawn with seaborn on an explicit
``ax``; the rest with matplotlib directly.

Inputs are the outputs of the other modules: dense matrices and
``block_slices()`` of :mod:`curvkit.operators`, the tidy tables of
:func:`curvkit.compare` and :meth:`curvkit.CurvatureTracker.to_dataframe`,
:class:`curvkit.diagnostics.spectral.SpectralDensity` objects, and the
:class:`curvkit.records.Records` of :func:`curvkit.extract` (Kronecker factors).
Axis labels of :func:`curvkit.compare`'s metrics come from
:data:`METRIC_LABELS`; layers are labelled ``"name (Type)"`` by
:func:`layer_labels`. Series that coincide (``allclose``) are drawn dashed on
top of the one they equal and labelled ``"name (= other)"``, so that neither hides.

Example:
    >>> import torch, curvkit as ck
    >>> from curvkit import plotting
    >>> M = torch.eye(6, dtype=torch.float64) + 0.1
    >>> blocks = [("a", slice(0, 2)), ("b", slice(2, 6))]
    >>> fig = plotting.heatmaps({"M": M, "2M": 2 * M}, block_slices=blocks)
    >>> len(fig.axes)  # two panels and one colour bar
    3
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colors import LogNorm
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from curvkit.diagnostics.landscape import loss_along_directions
from curvkit.errors import ConfigError, ShapeError

__all__ = [
    "METRIC_LABELS",
    "PALETTE",
    "QUANTITY_LABELS",
    "STYLE",
    "block_heatmap",
    "block_norms",
    "coinciding_series",
    "curvature_over_training",
    "diagonal_blocks",
    "eigenvalue_histogram",
    "eigenvalue_ranks",
    "estimator_error",
    "factor_heatmaps",
    "heatmaps",
    "kernel_width_for",
    "kronecker_eigenvalues",
    "kronecker_spectra",
    "layer_labels",
    "layer_spectra",
    "loss_along_directions",
    "loss_landscape",
    "metric_bars",
    "metric_label",
    "preconditioning_quality",
    "save",
    "smooth_density",
    "spectral_densities",
]

#: Colour-blind-safe qualitative palette: seaborn's ``"colorblind"`` (after Okabe & Ito 2008).
PALETTE = tuple(sns.color_palette("colorblind").as_hex())

#: ``rcParams`` applied (with :func:`matplotlib.rc_context`) to every figure: seaborn's
#: ``"whitegrid"`` style and ``"paper"`` context as dictionaries (globals untouched),
#: with the palette above and a few adjustments for small multi-panel figures.
STYLE = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper"),
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.edgecolor": ".35",
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "xtick.bottom": True,
    "ytick.left": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.5,
    "grid.linewidth": 0.6,
    "axes.prop_cycle": mpl.cycler(color=list(PALETTE)),
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "patch.edgecolor": "white",
    "image.interpolation": "nearest",
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}
#: Largest side (pixels) of a heatmap before block max-pooling.
MAX_PIXELS = 600

#: Axis label of each metric of :func:`curvkit.diagnostics.metrics.compare` (``A``: the
#: approximation, ``B``: the reference; every metric is a dimensionless ratio).
METRIC_LABELS = {
    "frobenius": r"relative Frobenius error $\|A - B\|_F \,/\, \|B\|_F$",
    "cosine": r"matrix cosine $\mathrm{tr}(AB) \,/\, (\|A\|_F \|B\|_F)$",
    "spectral": r"relative spectral error $\|A - B\|_2 \,/\, \|B\|_2$",
    "overlap": r"top-$k$ eigenspace overlap $\|V_A^\top V_B\|_F^2 / k$",
    "directional": r"curvature ratio $v^\top A v \,/\, v^\top B v$",
    "precond_cosine": r"cosine of damped steps $\cos(d_A, d_B)$",
    "precond_reduction": r"model reduction ratio $q(-d_A) / q(-d_B)$",
}
#: Axis label of each quantity of :meth:`curvkit.CurvatureTracker.to_dataframe`.
QUANTITY_LABELS = {
    "loss": "training loss",
    "grad_norm": r"gradient norm $\|g\|_2$",
    "eigenvalue": r"top eigenvalues $\lambda_i$",
    "trace": "trace of the curvature matrix",
    "grad_overlap": r"gradient share in top-$k$ eigenspace",
    "approx_frobenius": METRIC_LABELS["frobenius"],
    "approx_cosine": METRIC_LABELS["cosine"],
}


def metric_label(metric: str, k: int | None = None) -> str:
    """The axis label of a :func:`curvkit.compare` metric (``k`` filled in for ``overlap``).

    Args:
        metric: Metric name, e.g. ``"frobenius"``; unknown names are returned unchanged.
        k: Number of eigenvectors of ``overlap`` (replaces :math:`k` in the label).

    Returns:
        The label (matplotlib mathtext).
    """
    label = METRIC_LABELS.get(metric, QUANTITY_LABELS.get(metric, metric))
    if k is not None and metric == "overlap":
        label = label.replace("top-$k$", f"top-{int(k)}").replace("/ k$", f"/ {int(k)}$")
    return label


# -- helpers -----------------------------------------------------------------------------
def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.0, 3.2), **kwargs):
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save(fig: Figure, path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` to ``path`` with each suffix of ``formats`` (parent folders created).

    Args:
        fig: The figure.
        path: Target without suffix (a suffix is replaced).
        formats: File formats, e.g. ``("png", "pdf")``.

    Returns:
        The written paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with mpl.rc_context(STYLE):
        for fmt in formats:
            target = path.with_suffix(f".{fmt}")
            fig.savefig(target, format=fmt)
            out.append(target)
    return out


def _finish(fig: Figure, path, formats, title: str | None = None) -> Figure:
    if title:
        fig.suptitle(title, fontweight="bold")
    if path is not None:
        save(fig, path, formats)
    return fig


def _colors(names, colors: Mapping[str, str] | None) -> dict[str, str]:
    """A colour per name: ``colors[name]`` where given, else the next unused palette colour."""
    given = dict(colors or {})
    free = itertools.cycle([c for c in PALETTE if c not in given.values()] or PALETTE)
    return {n: given[n] if n in given else next(free) for n in dict.fromkeys(names)}


def _figure_legend(fig: Figure, axes) -> None:
    """One legend below all panels, with the entries of every panel once."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        longest = max(len(label) for label in entries)  # about 130 characters per row
        ncol = max(1, min(5, len(entries), 130 // max(longest, 1)))
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=ncol)


def _legend(ax, outside: bool = False) -> None:
    """A legend inside the axes, or to its right (outside) when there are many entries."""
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(loc="best")


def _label(value) -> str:
    """``3`` for ``3.0`` (pandas turns integer columns with gaps into floats)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _slices(block_slices, n: int) -> list[tuple[str, slice]]:
    """``(name, slice)`` pairs from ``(name, slice)`` pairs, slices or block sizes."""
    if block_slices is None:
        return []
    out, start = [], 0
    for i, b in enumerate(block_slices):
        if isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], slice):
            name, s = str(b[0]), b[1]
        elif isinstance(b, slice):
            name, s = str(i), b
        elif isinstance(b, (int, np.integer)):
            name, s = str(i), slice(start, start + int(b))
        else:
            raise ConfigError(
                f"plotting: block_slices entries must be (name, slice) pairs, slices or sizes; "
                f"got {type(b).__name__}."
            )
        start = s.stop
        out.append((name, s))
    if out and (out[-1][1].stop > n or out[0][1].start < 0):
        raise ShapeError(f"plotting: block_slices reach index {out[-1][1].stop}, matrix has {n}.")
    return out


def _pool(M: np.ndarray, max_pixels: int, reduce) -> np.ndarray:
    """Block-reduce a matrix so that no side exceeds ``max_pixels`` (``reduce`` over blocks)."""
    f = max(1, math.ceil(max(M.shape) / max_pixels))
    if f == 1:
        return M
    rows, cols = math.ceil(M.shape[0] / f), math.ceil(M.shape[1] / f)
    P = np.full((rows * f, cols * f), np.nan)
    P[: M.shape[0], : M.shape[1]] = M
    with warnings.catch_warnings():  # all-NaN padding blocks stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(P.reshape(rows, f, cols, f), axis=(1, 3))


def _draw_blocks(ax, slices, n: int, color: str) -> None:
    if not slices:
        return
    bounds = [s.start for _, s in slices[1:]]
    for b in bounds:
        ax.axhline(b, color=color, lw=0.6, alpha=0.8)
        ax.axvline(b, color=color, lw=0.6, alpha=0.8)
    if len(slices) <= 16:
        centres = [(s.start + s.stop) / 2 for _, s in slices]
        names = [name for name, _ in slices]
        ax.set_xticks(centres, names, rotation=90 if len(slices) > 6 else 0)
        ax.set_yticks(centres, names)
        ax.tick_params(length=0)


def layer_labels(source, with_type: bool = True) -> list[str]:
    """Labels ``"name (Type)"`` of the parametrised layers, in forward order.

    The order is that of the layer blocks of the curvature operators
    (``op.block_slices()``), so the labels can replace their names, e.g.
    ``blocks.0.conv1 (Conv2d)`` instead of a bare ``Sequential`` index ``0``.

    Args:
        source: A :class:`curvkit.records.Records` (its layers' ``name`` and
            ``module``), a sequence of :class:`~curvkit.records.LayerRecord`, or an
            ``nn.Module`` (every sub-module with trainable parameters of its own).
        with_type: Append the module's class name in parentheses.

    Returns:
        One label per layer.

    Raises:
        ShapeError: If ``source`` is none of these.
    """
    if isinstance(source, torch.nn.Module):
        pairs = [
            (name or type(source).__name__, module)
            for name, module in source.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        ]
    else:
        layers = getattr(source, "layers", source)
        try:
            pairs = [(str(r.name), r.module) for r in layers]
        except (AttributeError, TypeError):
            raise ConfigError(
                "layer_labels: give an nn.Module, a Records or a list of LayerRecord; "
                f"got {type(source).__name__}."
            ) from None
    return [f"{n} ({type(m).__name__})" if with_type else n for n, m in pairs]


def coinciding_series(series: Mapping[str, object], rtol: float = 1e-6) -> dict[str, str]:
    """Which series equal an earlier one (same shape, ``allclose``), so a plot can mark them.

    Two series are equal when every entry agrees within ``rtol`` relative to the
    largest finite magnitude of the two (so the test scales with the pair, not
    with other series of the plot); NaNs at the same places count as equal.

    Args:
        series: Name -> array (or tuple of arrays, e.g. ``(x, y)``), in drawing order.
        rtol: Relative tolerance.

    Returns:
        Name -> name of the first earlier series it equals, for every such name.
    """

    def parts(v):
        seq = v if isinstance(v, tuple) else (v,)
        return [_numpy(a).ravel() for a in seq]

    def equal(x, y):
        if x.shape != y.shape:
            return False
        both = np.abs(np.concatenate([x, y]))
        both = both[np.isfinite(both)]
        atol = rtol * float(both.max()) if both.size else 0.0
        return bool(np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))

    arrays = {k: parts(v) for k, v in series.items()}
    out = {}
    names = list(arrays)
    for i, name in enumerate(names):
        for other in names[:i]:
            if other in out:
                continue
            a, b = arrays[name], arrays[other]
            if len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b)):
                out[name] = other
                break
    return out


#: Dash pattern of a series drawn on top of an equal one (gaps show the one below).
COINCIDE_DASHES = (0, (2.5, 2.5))


def _plot_lines(ax, lines: Mapping[str, tuple], palette: Mapping[str, str], **kwargs) -> dict:
    """Plot ``name -> (x, y)``; series equal to an earlier one are dashed, hollow-marked, noted.

    Returns the name -> equal-earlier-name map of :func:`coinciding_series`.
    """
    same = coinciding_series(lines)
    for name, (x, y) in lines.items():
        style = dict(kwargs)
        label = name
        if name in same:
            label = f"{name} (= {same[name]})"
            style.update(ls=COINCIDE_DASHES, lw=style.get("lw", 1.6) + 0.4, zorder=3)
            if style.get("marker"):
                style.update(marker="D", mfc="none", markersize=6)
        ax.plot(x, y, color=palette[name], label=label, **style)
    return same


def _fmt(v: float) -> str:
    """A bar's value label: ``0`` for an exact zero, else three significant digits."""
    if not np.isfinite(v):
        return str(v)
    return "0" if v == 0 else f"{v:.2g}" if abs(v) < 1e-3 else f"{v:.3g}"


# -- dense matrices ----------------------------------------------------------------------
def heatmaps(
    mats: Mapping[str, torch.Tensor],
    block_slices=None,
    log: bool = True,
    decades: float = 8.0,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | None = None,
    max_pixels: int = MAX_PIXELS,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Heatmaps of dense matrices side by side, on one shared colour scale.

    With ``log=True`` each panel shows :math:`\log_{10}|M_{ij}|` (exact zeros
    white) from the largest entry of all matrices down to their 1st percentile,
    at most ``decades`` below; otherwise the signed entries on a symmetric
    diverging scale.
    Matrices larger than ``max_pixels`` are block max-pooled (largest
    :math:`|M_{ij}|` per pixel block), so structure survives down-sampling.
    For the inverse-matrix figure of M&G 2015 (Fig. 3: the inverse Fisher is
    close to block-tri-diagonal) pass the (damped) inverses.

    Args:
        mats: Panel title -> 2-D matrix (tensor or array).
        block_slices: Layer blocks, as ``op.block_slices()`` returns them, a list of
            slices or a list of block sizes; boundaries are drawn and labelled.
        log: Logarithmic magnitude (``True``) or signed linear scale.
        decades: Largest span of the log scale when ``vmin`` is not given.
        vmin: Lower colour limit (``log10`` units when ``log``); shared by all panels.
        vmax: Upper colour limit.
        cmap: Colour map (default ``"magma"`` for log, ``"RdBu_r"`` otherwise).
        max_pixels: Largest side drawn before pooling.
        labels: Tick labels replacing the block names, one per block (e.g.
            :func:`layer_labels` of the model: ``"blocks.0.conv1 (Conv2d)"``).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: one axes per matrix and one colour bar.

    Raises:
        ShapeError: If ``mats`` is empty, a matrix is not 2-D, or ``block_slices`` do not fit.
    """
    if not mats:
        raise ConfigError("heatmaps: give at least one matrix.")
    arrays = {}
    for name, M in mats.items():
        A = _numpy(M)
        if A.ndim != 2:
            raise ShapeError(f"heatmaps: {name!r} has shape {A.shape}, expected a matrix.")
        arrays[name] = A
    if log:
        with np.errstate(divide="ignore"):
            shown = {
                k: _pool(np.log10(np.abs(A)), max_pixels, np.nanmax) for k, A in arrays.items()
            }
        finite = np.concatenate([v[np.isfinite(v)] for v in shown.values()])
        top = float(finite.max()) if finite.size else 0.0
        vmax = top if vmax is None else vmax
        if vmin is None:
            low = float(np.percentile(finite, 1)) if finite.size else vmax - decades
            vmin = max(vmax - decades, low)
        cmap = cmap or "magma"
        label = r"$\log_{10}|M_{ij}|$ (white: 0)"
    else:

        def absmax(P, axis):
            flat = np.moveaxis(P, (1, 3), (-2, -1)).reshape(*P.shape[::2], -1)
            idx = np.nanargmax(np.nan_to_num(np.abs(flat), nan=-1), axis=-1)
            return np.take_along_axis(flat, idx[..., None], -1)[..., 0]

        shown = {k: _pool(A, max_pixels, absmax) for k, A in arrays.items()}
        bound = max(float(np.nanmax(np.abs(v))) for v in shown.values()) or 1.0
        vmax = bound if vmax is None else vmax
        vmin = -vmax if vmin is None else vmin
        cmap = cmap or "RdBu_r"
        label = r"$M_{ij}$"
    colormap = mpl.colormaps[cmap].with_extremes(bad="white")
    with mpl.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = _figure(len(shown), 1, (3.6, 3.5))
        image = None
        for ax, (name, V), A in zip(axes[0], shown.items(), arrays.values()):
            n, m = A.shape
            masked = np.ma.masked_invalid(np.where(np.isneginf(V), np.nan, V))
            image = ax.imshow(
                masked, cmap=colormap, vmin=vmin, vmax=vmax, extent=(0, m, n, 0), aspect="equal"
            )
            slices = _slices(block_slices, n)
            if labels is not None:
                if len(labels) != len(slices):
                    raise ConfigError(f"heatmaps: {len(labels)} labels for {len(slices)} blocks.")
                slices = [(str(label), sl) for label, (_, sl) in zip(labels, slices)]
            _draw_blocks(ax, slices, n, "#4d4d4d" if log else "k")
            ax.set_title(name)
            for spine in ax.spines.values():
                spine.set_visible(True)
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label=label, pad=0.02)
        return _finish(fig, path, formats, title)


def block_norms(mat, block_slices, reference=None) -> np.ndarray:
    r"""Per-block Frobenius norms :math:`\|M_{ij}\|_F`, or relative errors to a reference.

    Args:
        mat: ``D x D`` matrix.
        block_slices: ``L`` blocks (see :func:`heatmaps`).
        reference: Optional ``D x D`` matrix :math:`R`; then the entries are
            :math:`\|M_{ij} - R_{ij}\|_F / \|R_{ij}\|_F` (``0`` where both blocks
            vanish, ``inf`` where only the reference block does).

    Returns:
        An ``L x L`` array.

    Raises:
        ShapeError: On mismatching shapes.
    """
    M = _numpy(mat)
    R = None if reference is None else _numpy(reference)
    if R is not None and R.shape != M.shape:
        raise ShapeError(f"block_norms: shapes {M.shape} and {R.shape} differ.")
    slices = [s for _, s in _slices(block_slices, M.shape[0])]
    if not slices:
        raise ConfigError("block_norms: give the blocks (block_slices).")
    out = np.empty((len(slices), len(slices)))
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            if R is None:
                out[i, j] = np.linalg.norm(M[si, sj])
                continue
            diff, ref = np.linalg.norm(M[si, sj] - R[si, sj]), np.linalg.norm(R[si, sj])
            out[i, j] = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
    return out


def block_heatmap(
    values: Mapping[str, np.ndarray] | np.ndarray,
    names: Sequence[str] | None = None,
    log: bool = True,
    annotate: bool = True,
    label: str = "relative Frobenius error",
    cmap: str = "viridis",
    ncols: int = 4,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    """Annotated ``L x L`` heatmaps (per-layer-block errors or norms), one shared scale.

    Args:
        values: One ``L x L`` array (e.g. from :func:`block_norms`) or a mapping
            panel title -> array.
        names: Layer names for the ticks.
        log: Logarithmic colour scale (non-positive entries are drawn grey).
        annotate: Write each value in its cell.
        label: Colour bar label.
        cmap: Colour map.
        ncols: Panels per row.
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: one axes per panel and one colour bar.
    """
    panels = dict(values) if isinstance(values, Mapping) else {"": values}
    arrays = {k: _numpy(v) for k, v in panels.items()}
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays.values()])
    positive = finite[finite > 0]
    if log and positive.size:
        norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()) * (1 + 1e-12))
    else:
        norm = mpl.colors.Normalize(float(finite.min()), float(finite.max()))
    colormap = mpl.colormaps[cmap].with_extremes(bad="#d9d9d9")
    with mpl.rc_context({**STYLE, "axes.grid": False}):
        L = next(iter(arrays.values())).shape[0]
        side = 0.45 * L + 1.6
        cols = min(ncols, len(arrays))
        fig, axes = _figure(cols, math.ceil(len(arrays) / cols), (side + 0.3, side))
        for ax in axes.ravel()[len(arrays) :]:
            ax.set_visible(False)
        image = None
        for ax, (name, A) in zip(axes.ravel(), arrays.items()):
            shown = np.ma.masked_where(~np.isfinite(A) | ((A <= 0) & log), A)
            image = ax.imshow(shown, cmap=colormap, norm=norm)
            ticks = names if names is not None else [str(i) for i in range(A.shape[0])]
            ax.set_xticks(range(A.shape[1]), ticks, rotation=90 if len(ticks) > 6 else 0)
            ax.set_yticks(range(A.shape[0]), ticks)
            ax.tick_params(length=0)
            ax.set_title(name)
            if annotate and A.shape[0] <= 12:
                for (i, j), v in np.ndenumerate(A):
                    rgba = colormap(norm(v)) if np.isfinite(v) and (v > 0 or not log) else (1,) * 4
                    dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip
        visible = list(axes.ravel()[: len(arrays)])
        fig.colorbar(image, ax=visible, shrink=0.8, label=label, pad=0.02)
        return _finish(fig, path, formats, title)


# -- spectra -----------------------------------------------------------------------------
def _weighted_quantile(u: np.ndarray, w: np.ndarray, q) -> np.ndarray:
    order = np.argsort(u)
    cum = np.cumsum(w[order])
    return np.interp(np.asarray(q) * cum[-1], cum, u[order])


def kernel_width_for(
    ritz_values,
    weights=None,
    log: bool = False,
    cutoff: float | None = None,
    min_fraction: float = 1 / 200,
) -> float:
    r"""Gaussian kernel width for a spectral density from its Ritz values (Silverman's rule).

    The Ritz values :math:`\theta_j` with their SLQ weights :math:`\tau_j` form a
    weighted sample of the spectral measure; Silverman's rule of thumb
    (Silverman 1986, *Density Estimation*, eq. 3.31) for that sample gives

    .. math::
        \sigma = 0.9\,\min\!\big(s, \mathrm{IQR}/1.34\big)\, n_\mathrm{eff}^{-1/5},
        \qquad n_\mathrm{eff} = \frac{(\sum_j \tau_j)^2}{\sum_j \tau_j^2},

    with :math:`s` the weighted standard deviation, IQR the weighted
    inter-quartile range and :math:`n_\mathrm{eff}` Kish's effective sample size
    of the weights. With ``log=True`` the sample is
    :math:`u_j = \log_{10}\theta_j` of the nodes above the cutoff :math:`c` (the
    variable of a log density; the mass at or below the cutoff is a point mass
    placed at it, which would otherwise set the width of the whole density, e.g.
    99.9 % of it for a low-rank GGN) and :math:`\sigma` is in decades. Where the
    IQR vanishes (most mass at one point)
    :math:`s` is used alone; the width is never below ``min_fraction`` of the
    span of the sample (the previous fixed default, 1/200), so that a kernel can
    never be narrower than the spacing that makes a density of isolated Ritz
    values ripple.

    Args:
        ritz_values: Nodes :math:`\theta`, any shape (e.g. ``SpectralDensity.nodes``).
        weights: Quadrature weights of the same shape (default: equal weights).
        log: Width for a density over :math:`\log_{10}\lambda`.
        cutoff: Lower cutoff :math:`c` of the log scale (default
            :math:`10^{-6}\max_j|\theta_j|`, as :func:`curvkit.spectral_density`).
        min_fraction: Smallest width as a fraction of the sample's span.

    Returns:
        The kernel width :math:`\sigma` (eigenvalue units, or decades when ``log``).

    Raises:
        ShapeError: If the shapes differ or there are no values.
    """
    u = _numpy(ritz_values).ravel()
    w = np.ones_like(u) if weights is None else _numpy(weights).ravel()
    if u.size == 0 or w.shape != u.shape:
        raise ShapeError(
            f"kernel_width_for: {u.size} Ritz values and weights of shape {w.shape}; "
            "give equally many, at least one."
        )
    w = np.clip(w, 0.0, None)
    if not w.sum() > 0:
        w = np.ones_like(u)
    if log:
        cut = 1e-6 * float(np.abs(u).max()) if cutoff is None else float(cutoff)
        above = u > cut
        if above.any() and w[above].sum() > 0:  # the mass at the cutoff is a point mass
            u, w = u[above], w[above]
        u = np.log10(np.maximum(u, cut if cut > 0 else np.finfo(float).tiny))
    w = w / w.sum()
    span = float(u.max() - u.min())
    mean = float(w @ u)
    sd = math.sqrt(max(float(w @ (u - mean) ** 2), 0.0))
    q1, q3 = _weighted_quantile(u, w, [0.25, 0.75])
    spread = min(sd, (q3 - q1) / 1.34) if q3 > q1 else sd
    n_eff = 1.0 / float(w @ w)
    sigma = 0.9 * spread * n_eff ** (-0.2)
    floor = min_fraction * span if span > 0 else min_fraction * max(abs(mean), 1.0)
    return float(max(sigma, floor))


def smooth_density(
    sd, kernel_width: float | str = "auto", grid: int = 1024
) -> tuple[np.ndarray, np.ndarray, float]:
    r"""Re-evaluate an SLQ density from its nodes and weights with another kernel width.

    :math:`\phi(t) = \sum_{i,j} \tau^{(i)}_j\, g_\sigma(t - u^{(i)}_j) / n` as in
    :func:`curvkit.spectral_density` (over :math:`u = \log_{10}\max(\theta, c)`
    when ``sd.log``, with the same cutoff ``c``), on ``grid`` points spanning
    the nodes plus five kernel widths on each side.

    Args:
        sd: A :class:`~curvkit.diagnostics.spectral.SpectralDensity`.
        kernel_width: :math:`\sigma` (decades when ``sd.log``), or ``"auto"`` for
            :func:`kernel_width_for`.
        grid: Number of evaluation points.

    Returns:
        ``(points, density, sigma)``: eigenvalues (positive when ``sd.log``), the
        density per unit eigenvalue (per decade when ``sd.log``) and the width used.
    """
    nodes, weights = _numpy(sd.nodes).ravel(), _numpy(sd.weights).ravel()
    log = bool(getattr(sd, "log", False))
    cut = getattr(sd, "cutoff", None)
    if kernel_width == "auto":
        sigma = kernel_width_for(nodes, weights, log=log, cutoff=cut)
    else:
        sigma = float(kernel_width)
    u = np.log10(np.maximum(nodes, cut)) if log else nodes
    x = np.linspace(u.min() - 5 * sigma, u.max() + 5 * sigma, int(grid))
    w = weights / weights.sum()
    density = np.zeros_like(x)
    for chunk in np.array_split(np.arange(u.size), max(1, u.size // 2048)):
        z = (x[:, None] - u[None, chunk]) / sigma
        density += np.exp(-0.5 * z**2) @ w[chunk]
    density /= sigma * math.sqrt(2 * math.pi)
    return (10**x if log else x), density, sigma


def spectral_densities(
    densities: Mapping,
    logy: bool = True,
    floor: float = 1e-6,
    kernel_width: float | str | Mapping | None = "auto",
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Overlaid spectral densities from :func:`curvkit.diagnostics.spectral.spectral_density`.

    Densities over :math:`\log_{10}\lambda` (``sd.log``) share a panel with a
    logarithmic eigenvalue axis; linear densities share another (so a PSD
    GGN on a log axis and an indefinite Hessian on a linear one can sit side by side).

    By default each density is re-smoothed from its Ritz values and weights with
    the kernel width of :func:`kernel_width_for` (Silverman's rule on the
    weighted Ritz values; see :func:`smooth_density`), which removes the ripple
    of a too narrow fixed width; the legend states each width.

    Args:
        densities: Name -> :class:`~curvkit.diagnostics.spectral.SpectralDensity` (``grid``,
            ``density``, ``nodes``, ``weights``, ``log``, ``cutoff``,
            ``mass_below_cutoff`` are used).
        logy: Logarithmic density axis (values below ``floor`` times the largest are clipped).
        floor: Relative floor of the log density axis.
        kernel_width: ``"auto"`` (Silverman's rule per density), a width for all
            (decades for log densities), ``None`` to draw ``sd.density`` as computed,
            or name -> one of these (missing names: ``"auto"``), e.g. one shared
            width for an SLQ estimate and the exact density it is checked against.
        colors: Optional name -> colour (others get palette colours).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: one axes per kind of density present.

    Raises:
        ShapeError: If ``densities`` is empty.
    """
    if not densities:
        raise ConfigError("spectral_densities: give at least one density.")
    kinds = sorted({bool(getattr(sd, "log", False)) for sd in densities.values()}, reverse=True)
    palette = _colors(densities, colors)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(len(kinds), 1, (4.6, 3.3))
        for ax, log in zip(axes[0], kinds):
            panel = {k: sd for k, sd in densities.items() if bool(getattr(sd, "log", False)) == log}
            lines, widths = {}, {}
            for name, sd in panel.items():
                width = kernel_width
                if isinstance(kernel_width, Mapping):
                    width = kernel_width.get(name, "auto")
                if width is None:
                    lines[name] = (_numpy(sd.grid), _numpy(sd.density))
                    widths[name] = float(getattr(sd, "kernel_width", math.nan))
                else:
                    x, y, widths[name] = smooth_density(sd, width)
                    lines[name] = (x, y)
            same = coinciding_series(lines)
            top = max(float(y.max()) for _, y in lines.values())
            for name, (x, y) in lines.items():
                mass = float(getattr(panel[name], "mass_below_cutoff", 0.0) or 0.0)
                pct = 100 * mass  # "99.9%", not a rounded "100%", for a low-rank matrix
                share = f"{pct:.0f}" if 1 <= pct < 99.5 else f"{pct:.3g}"
                extra = f", {share}% below cutoff" if log and mass >= 0.005 else ""
                unit = " dec" if log else ""
                label = f"{name} (σ = {widths[name]:.2g}{unit}{extra})"
                style = {"lw": 1.2}
                if name in same:
                    label = f"{name} (= {same[name]})"
                    style = {"lw": 1.6, "ls": COINCIDE_DASHES, "zorder": 3}
                ax.plot(x, y, color=palette[name], label=label, **style)
                if len(panel) <= 2:
                    ax.fill_between(x, y, color=palette[name], alpha=0.08, lw=0)
            ax.set_xlabel(r"eigenvalue $\lambda$")
            if log:
                ax.set_xscale("log")
                ax.set_ylabel(r"density per decade of $\lambda$")
            else:
                ax.set_ylabel(r"density per unit $\lambda$")
            if logy and top > 0:
                ax.set_yscale("log")
                ax.set_ylim(top * floor, top * 2)
            ax.set_title("log scale" if log else "linear scale", fontweight="normal")
        if len(densities) > 1:
            _figure_legend(fig, axes[0])
        else:
            _legend(axes[0, 0])
        return _finish(fig, path, formats, title)


def eigenvalue_ranks(
    eigs: Mapping[str, object],
    top: int | None = None,
    scale: str = "auto",
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    """Eigenvalues against their rank (largest first), one line per matrix.

    Args:
        eigs: Name -> 1-D array of eigenvalues (any order).
        top: Show only the ``top`` largest of each.
        scale: ``"log"``, ``"symlog"``, ``"linear"`` or ``"auto"`` (log when every
            shown value is positive, else symlog with a linear zone of
            :math:`10^{-6}` times the largest magnitude).
        colors: Optional name -> colour (others get palette colours).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure (one axes).

    Raises:
        ShapeError: If ``eigs`` is empty or ``scale`` unknown.
    """
    if not eigs:
        raise ConfigError("eigenvalue_ranks: give at least one spectrum.")
    if scale not in ("auto", "log", "symlog", "linear"):
        raise ConfigError(f"eigenvalue_ranks: scale={scale!r} is not auto, log, symlog or linear.")
    values = {k: np.sort(_numpy(v).ravel())[::-1][:top] for k, v in eigs.items()}
    allv = np.concatenate(list(values.values()))
    if scale == "auto":
        scale = "log" if (allv > 0).all() else "symlog"
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, 1, (5.0, 3.4))
        ax = axes[0, 0]
        palette = _colors(values, colors)
        lines = {name: (np.arange(1, v.size + 1), v) for name, v in values.items()}
        small = max(v.size for v in values.values()) <= 50
        _plot_lines(ax, lines, palette, marker="." if small else None)
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-6 * float(np.abs(allv).max() or 1.0))
        elif scale == "log":
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel(r"eigenvalue $\lambda_i$")
        _legend(ax, outside=len(values) > 3)
        return _finish(fig, path, formats, title)


def _log_bins(magnitudes: np.ndarray, cutoff: float, bins: int) -> np.ndarray:
    top = float(magnitudes.max()) if magnitudes.size else 1.0
    top = max(top, cutoff * 10)
    return np.geomspace(cutoff, top * (1 + 1e-9), bins + 1)


def eigenvalue_histogram(
    eigs,
    bins: int = 40,
    cutoff: float | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Histogram of exact eigenvalues over log-scaled magnitude bins, negatives mirrored below.

    Bins are logarithmic in :math:`|\lambda|` from ``cutoff`` to the largest
    magnitude; positive eigenvalues are counted upwards, negative ones (by their
    magnitude) downwards on the same bins, so an indefinite Hessian shows both
    sides of its spectrum on one log axis. Eigenvalues with
    :math:`|\lambda| <` ``cutoff`` (numerical zeros) are not binned; their number
    is written in the panel and legend.

    Args:
        eigs: A 1-D array of eigenvalues (e.g. ``torch.linalg.eigvalsh`` of a
            dense matrix), or name -> array (one outline each).
        bins: Number of logarithmic bins.
        cutoff: Smallest binned magnitude (default :math:`10^{-8}\max|\lambda|`).
        colors: Optional name -> colour (others get palette colours).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure (one axes); its ``curvkit_data`` attribute is a DataFrame with
        columns ``name``, ``sign``, ``left``, ``right``, ``count``.

    Raises:
        ShapeError: If no eigenvalues are given or ``bins``/``cutoff`` are not positive.
    """
    spectra = dict(eigs) if isinstance(eigs, Mapping) else {"eigenvalues": eigs}
    values = {k: _numpy(v).ravel() for k, v in spectra.items()}
    if not values or any(v.size == 0 for v in values.values()):
        raise ConfigError("eigenvalue_histogram: give at least one non-empty set of eigenvalues.")
    if bins < 1 or (cutoff is not None and not cutoff > 0):
        raise ConfigError(
            f"eigenvalue_histogram: bins={bins} and cutoff={cutoff} must be positive."
        )
    largest = max(float(np.abs(v).max()) for v in values.values())
    cut = (1e-8 * largest if largest > 0 else 1e-8) if cutoff is None else float(cutoff)
    edges = _log_bins(np.concatenate([np.abs(v) for v in values.values()]), cut, bins)
    palette = _colors(values, colors)
    rows, notes = [], []
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, 1, (5.2, 3.6))
        ax = axes[0, 0]
        filled = len(values) == 1
        for name, v in values.items():
            pos, _ = np.histogram(v[v >= cut], edges)
            neg, _ = np.histogram(-v[v <= -cut], edges)
            zero = int((np.abs(v) < cut).sum())
            color = palette[name]
            label = f"{name}: {int((v >= cut).sum())} positive, {int((v <= -cut).sum())} negative"
            if zero:
                label += f", {zero} with |λ| < {cut:.1g}"
                notes.append(f"{zero} eigenvalues with |λ| < {cut:.1g} not shown")
            ax.stairs(pos, edges, color=color, fill=filled, alpha=0.75 if filled else 1.0,
                      label=label, lw=1.2)  # fmt: skip
            if neg.any():
                ax.stairs(-neg, edges, color=color, fill=filled, alpha=0.4 if filled else 1.0,
                          hatch="///" if filled else None, ls="-" if filled else "--",
                          lw=1.2)  # fmt: skip
            for sign, counts in (("positive", pos), ("negative", neg)):
                for left, right, c in zip(edges[:-1], edges[1:], counts):
                    rows.append({"name": name, "sign": sign, "left": left, "right": right,
                                 "count": int(c)})  # fmt: skip
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(r"eigenvalue magnitude $|\lambda|$")
        ax.set_ylabel(r"count ($\lambda > 0$ up, $\lambda < 0$ down)")
        ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda y, _: f"{abs(y):g}"))
        if notes and len(values) == 1:
            ax.text(0.99, 0.97, notes[0], transform=ax.transAxes, ha="right", va="top", fontsize=7)
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.18), borderaxespad=0.0)
        fig.curvkit_data = pd.DataFrame(rows, columns=["name", "sign", "left", "right", "count"])
        return _finish(fig, path, formats, title)


def kronecker_eigenvalues(G, A) -> np.ndarray:
    r"""Eigenvalues of :math:`G \otimes A`: all products :math:`\lambda_i(G)\,\mu_j(A)`, descending.

    (Van Loan 2000, "The ubiquitous Kronecker product", §2: the eigenvalues of a
    Kronecker product of symmetric matrices are the products of theirs.)

    Args:
        G: Symmetric ``[m, m]`` factor.
        A: Symmetric ``[n, n]`` factor.

    Returns:
        The ``m * n`` eigenvalues, largest first.
    """
    g = np.linalg.eigvalsh(_sym(_numpy(G), "kronecker_eigenvalues", "G"))
    a = np.linalg.eigvalsh(_sym(_numpy(A), "kronecker_eigenvalues", "A"))
    return np.sort(np.outer(g, a).ravel())[::-1]


def _sym(M: np.ndarray, where: str, name: str) -> np.ndarray:
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ShapeError(f"{where}: {name} has shape {M.shape}, expected a square matrix.")
    return (M + M.T) / 2


def kronecker_spectra(records, kind: str = "kflr", labels: Sequence[str] | None = None) -> dict:
    r"""Per-layer eigenvalues of the Kronecker blocks of extraction records.

    A joint block :math:`G \otimes A` (weight and bias) has the eigenvalues of
    :func:`kronecker_eigenvalues`; with ``separate_bias`` the bias block
    :math:`G \cdot s` (``bias_scale`` :math:`s`) adds the eigenvalues of
    :math:`G` times :math:`s`.

    Args:
        records: :class:`curvkit.records.Records` from :func:`curvkit.extract`.
        kind: Which ``G`` factor (``"kfac"``, ``"kflr"``, ``"kfra"``, ``"empirical"``).
        labels: Layer labels (default: :func:`layer_labels`).

    Returns:
        Label -> 1-D eigenvalues (largest first), forward order.

    Raises:
        ShapeError: If a layer lacks ``A`` or ``G[kind]``.
    """
    layers = list(getattr(records, "layers", records))
    labels = layer_labels(layers) if labels is None else list(labels)
    out = {}
    for label, rec in zip(labels, layers):
        if rec.A is None or kind not in rec.G:
            raise ConfigError(
                f"kronecker_spectra: layer {rec.name!r} has no A/G[{kind!r}] (kinds present: "
                f"{sorted(rec.G)}); extract with quantities=({kind!r},)."
            )
        vals = kronecker_eigenvalues(rec.G[kind], rec.A)
        if rec.has_bias and rec.separate_bias:
            bias = np.linalg.eigvalsh(_sym(_numpy(rec.G[kind]), "kronecker_spectra", "G"))
            vals = np.sort(np.concatenate([vals, rec.bias_scale * bias]))[::-1]
        out[label] = vals
    return out


def diagonal_blocks(matrix, block_slices, labels: Sequence[str] | None = None) -> dict:
    """The diagonal blocks of a dense matrix, e.g. the exact per-layer curvature blocks.

    Args:
        matrix: ``D x D`` matrix (e.g. ``ck.ggn(...).to_dense()``).
        block_slices: Layer blocks, as ``op.block_slices()`` returns them (see :func:`heatmaps`).
        labels: Names replacing the block names (e.g. :func:`layer_labels`).

    Returns:
        Name -> block ``matrix[s, s]`` (numpy), in block order.

    Raises:
        ShapeError: If the blocks do not fit the matrix or ``labels`` has another length.
    """
    M = _numpy(matrix)
    slices = _slices(block_slices, M.shape[0])
    if labels is not None and len(labels) != len(slices):
        raise ConfigError(f"diagonal_blocks: {len(labels)} labels for {len(slices)} blocks.")
    names = [n for n, _ in slices] if labels is None else list(labels)
    return {name: M[s, s] for name, (_, s) in zip(names, slices)}


def _spectrum(value, where: str) -> np.ndarray:
    """Eigenvalues (descending) of a 1-D array, a symmetric matrix, or a ``(G, A)`` pair."""
    if isinstance(value, tuple) and len(value) == 2:
        return kronecker_eigenvalues(*value)
    arr = _numpy(value)
    if arr.ndim == 1:
        return np.sort(arr)[::-1]
    return np.sort(np.linalg.eigvalsh(_sym(arr, where, "a block")))[::-1]


def layer_spectra(
    approx_blocks,
    exact_blocks=None,
    kind: str = "kflr",
    approx_name: str = "Kronecker",
    exact_name: str = "exact",
    labels: Sequence[str] | None = None,
    top: int | None = None,
    ncols: int = 4,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Per-layer spectra: a Kronecker block's eigenvalues against the exact block's.

    One panel per layer, eigenvalue against rank (largest first, log-log; a
    symmetric-log value axis where a spectrum is indefinite). The eigenvalues of
    :math:`G \otimes A` are the products of the factors' eigenvalues
    (:func:`kronecker_eigenvalues`), so no Kronecker product is formed. Where the
    two spectra coincide (e.g. KFLR on a linear output layer with MSE, which is
    exact) the approximation is drawn dashed on top and labelled ``"(= exact)"``.

    Args:
        approx_blocks: :class:`curvkit.records.Records` (uses ``G[kind]`` and ``A``,
            see :func:`kronecker_spectra`), or layer -> ``(G, A)`` pair, dense
            block, or 1-D eigenvalues.
        exact_blocks: Optional layer -> dense block or eigenvalues (e.g.
            :func:`diagonal_blocks` of the dense GGN and ``op.block_slices()``),
            paired with ``approx_blocks`` in order.
        kind: The ``G`` factor when ``approx_blocks`` are records.
        approx_name: Legend name of the approximation.
        exact_name: Legend name of the exact blocks.
        labels: Panel titles (default: the keys of ``approx_blocks``, or
            :func:`layer_labels` of the records).
        top: Show only the ``top`` largest eigenvalues per layer.
        ncols: Panels per row.
        colors: Optional ``{approx_name: colour, exact_name: colour}``.
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: one axes per layer (empty grid slots hidden).

    Raises:
        ShapeError: If there are no blocks, ``exact_blocks`` has another number of
            layers, or a block is not square.
    """
    if hasattr(approx_blocks, "layers") or (
        isinstance(approx_blocks, Sequence) and approx_blocks and hasattr(approx_blocks[0], "A")
    ):
        approx = kronecker_spectra(approx_blocks, kind, labels)
    elif isinstance(approx_blocks, Mapping):
        approx = {k: _spectrum(v, "layer_spectra") for k, v in approx_blocks.items()}
    else:
        raise ConfigError("layer_spectra: give Records or a mapping layer -> block.")
    if not approx:
        raise ConfigError("layer_spectra: give at least one layer.")
    exact = None
    if exact_blocks is not None:
        exact = [_spectrum(v, "layer_spectra") for v in dict(exact_blocks).values()]
        if len(exact) != len(approx):
            raise ConfigError(
                f"layer_spectra: {len(approx)} approximate and {len(exact)} exact blocks."
            )
    titles = list(approx) if labels is None else list(labels)
    palette = _colors([exact_name, approx_name], colors)
    n = len(approx)
    cols = min(ncols, n)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(cols, math.ceil(n / cols), (3.3, 2.8))
        for ax in axes.ravel()[n:]:
            ax.set_visible(False)
        for i, (ax, name) in enumerate(zip(axes.ravel(), titles)):
            lines = {}
            if exact is not None:
                e = exact[i][:top]
                lines[exact_name] = (np.arange(1, e.size + 1), e)
            a = list(approx.values())[i][:top]
            lines[approx_name] = (np.arange(1, a.size + 1), a)
            small = max(v[1].size for v in lines.values()) <= 60
            _plot_lines(ax, lines, palette, marker="." if small else None, lw=1.3)
            allv = np.concatenate([v[1] for v in lines.values()])
            if (allv > 0).all():
                ax.set_yscale("log")
            else:
                ax.set_yscale("symlog", linthresh=1e-6 * float(np.abs(allv).max() or 1.0))
            ax.set_xscale("log")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("rank")
            if i % cols == 0:
                ax.set_ylabel(r"eigenvalue $\lambda_i$")
        _figure_legend(fig, axes.ravel()[:n])
        return _finish(fig, path, formats, title)


def factor_heatmaps(
    records,
    kind: str = "kflr",
    labels: Sequence[str] | None = None,
    log: bool = True,
    decades: float = 6.0,
    max_pixels: int = 200,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Heatmaps of every layer's Kronecker factors: ``A`` (top row) and ``G[kind]`` (bottom row).

    Drawn with :func:`seaborn.heatmap`, each panel with its own colour bar
    (factors of different layers have different scales): :math:`\log_{10}|F_{ij}|`
    over at most ``decades`` below the panel's largest entry (exact zeros white),
    or the signed entries on a symmetric diverging scale. Factors larger than
    ``max_pixels`` are block max-pooled (largest magnitude per pixel block).
    The cells are rasterised inside the vector PDF (``rasterized=True``);
    titles, ticks and colour bars stay vectors.

    Args:
        records: :class:`curvkit.records.Records` from :func:`curvkit.extract` (or
            a list of :class:`~curvkit.records.LayerRecord`).
        kind: Which ``G`` (``"kfac"``, ``"kflr"``, ``"kfra"``, ``"empirical"``).
        labels: Column titles (default: :func:`layer_labels`).
        log: Logarithmic magnitude (``True``) or signed linear scale.
        decades: Span of each log colour scale.
        max_pixels: Largest side drawn before pooling.
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: ``2 x L`` heatmap axes (row 0: ``A``, row 1: ``G``) and their colour bars.

    Raises:
        ShapeError: If there are no layers or a layer lacks ``A`` / ``G[kind]``.
    """
    layers = list(getattr(records, "layers", records))
    if not layers:
        raise ConfigError("factor_heatmaps: the records have no layers.")
    for rec in layers:
        if rec.A is None or kind not in rec.G:
            raise ConfigError(
                f"factor_heatmaps: layer {rec.name!r} has no A/G[{kind!r}] (kinds present: "
                f"{sorted(rec.G)}); extract with quantities=({kind!r},)."
            )
    labels = layer_labels(layers) if labels is None else list(labels)
    L = len(layers)
    with mpl.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = _figure(L, 2, (2.9, 2.6))
        for col, (rec, label) in enumerate(zip(layers, labels)):
            for row, (factor, name) in enumerate(((rec.A, "A"), (rec.G[kind], f"G ({kind})"))):
                ax = axes[row, col]
                F = _numpy(factor)
                if log:
                    with np.errstate(divide="ignore"):
                        V = _pool(np.log10(np.abs(F)), max_pixels, np.nanmax)
                    finite = V[np.isfinite(V)]
                    vmax = float(finite.max()) if finite.size else 0.0
                    V = np.where(np.isfinite(V), V, np.nan)
                    opts = dict(vmin=vmax - decades, vmax=vmax, cmap="magma")
                    cbar = r"$\log_{10}|F_{ij}|$"
                else:
                    V = _pool(F, max_pixels, np.nanmax)
                    bound = float(np.nanmax(np.abs(V))) or 1.0
                    opts = dict(vmin=-bound, vmax=bound, cmap="RdBu_r")
                    cbar = r"$F_{ij}$"
                sns.heatmap(V, ax=ax, square=True, xticklabels=False, yticklabels=False,
                            rasterized=True, cbar_kws={"shrink": 0.8, "label": cbar},
                            **opts)  # fmt: skip
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_linewidth(0.6)
                ax.set_title(f"{name}: {label}" if row == 0 else name, fontsize=8)
                ax.set_xlabel(f"{F.shape[0]} x {F.shape[1]}", fontsize=7)
        return _finish(fig, path, formats, title)


# -- comparison tables -------------------------------------------------------------------
def _check_columns(df: pd.DataFrame, where: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{where}: the table lacks columns {missing} (use curvkit.compare's).")


def metric_bars(
    df: pd.DataFrame,
    metric: str = "overlap",
    block: str | None = "all",
    directions: Sequence[str] | None = None,
    colors: Mapping[str, str] | None = None,
    block_labels: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Bars of one metric of :func:`curvkit.diagnostics.metrics.compare` per approximation.

    ``"directional"`` (curvature ratios :math:`v^\top A v / v^\top B v`) is drawn
    as groups per direction (top eigenvectors, gradient) on a log axis with the
    ideal ratio 1 marked (bars start at 1); other metrics (drawn with
    :func:`seaborn.barplot`) as one bar per approximation, or groups per layer
    block when ``block=None``, with error bars from ``stderr`` where it is
    non-zero. The value axis is labelled by :func:`metric_label`.

    Value labels: every bar carries its value when there are at most 40 bars;
    beyond that, only bars too short to see (at most 2% of the axis; an exact
    zero reads ``0``). An approximation whose values all equal an earlier one's
    (``allclose``) gets hatched bars and a legend entry ``"name (= other)"``.

    Args:
        df: The comparison table (columns ``approx``, ``block``, ``metric``,
            ``value``, ``stderr``, ``direction``).
        metric: Which metric (``"overlap"``, ``"directional"``, ``"frobenius"``, ...).
        block: Which block (``"all"``: the whole matrix); ``None`` groups all blocks.
        directions: For ``"directional"``: the directions to show, e.g.
            ``("eigvec_1", "eigvec_2", "gradient")`` (default: all).
        colors: Optional approximation -> colour (others get palette colours).
        block_labels: Optional block name -> tick label (e.g. from
            :func:`layer_labels`: ``{"0": "0 (Linear)"}``).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure (one axes).

    Raises:
        ShapeError: If the table has no rows for ``metric``/``block``/``directions``.
    """
    _check_columns(df, "metric_bars", ("approx", "block", "metric", "value"))
    rows = df[df["metric"] == metric]
    if block is not None:
        rows = rows[rows["block"] == block]
    if directions is not None and "direction" in rows:
        rows = rows[rows["direction"].isin(list(directions))]
    if rows.empty:
        raise ConfigError(
            f"metric_bars: no rows for metric={metric!r}, block={block!r}, directions={directions}."
        )
    group = "direction" if metric == "directional" else ("block" if block is None else None)
    rows = rows.assign(stderr=rows["stderr"] if "stderr" in rows else 0.0)
    keys = [group, "approx"] if group else ["approx"]
    agg = rows.groupby(keys, sort=False).agg(value=("value", "mean"), stderr=("stderr", "max"))
    agg = agg.reset_index()
    approxes = list(dict.fromkeys(agg["approx"]))
    groups = list(dict.fromkeys(agg[group])) if group else [""]
    table = agg.pivot(index="approx", columns=group, values="value") if group else None
    if group:
        values = {a: table.loc[a, groups].to_numpy(float) for a in approxes}
    else:
        values = {a: agg.loc[agg["approx"] == a, "value"].to_numpy(float) for a in approxes}
    same = coinciding_series(values)
    palette = _colors(approxes, colors)
    names = {g: (block_labels or {}).get(g, _label(g)) for g in groups}
    k = rows["k"].dropna().iloc[0] if "k" in rows and rows["k"].notna().any() else None
    nbars = len(agg)
    # slanted group labels when there are many or when long ones would collide
    rotate = len(groups) > 4 or max(len(n) for n in names.values()) > 12
    with mpl.rc_context(STYLE):
        width = min(11.0, max(4.5, 1.5 + 0.2 * nbars + 0.3 * len(groups)))
        fig, axes = _figure(1, 1, (width, 3.6))
        ax = axes[0, 0]
        if metric == "directional":
            w = 0.8 / len(approxes)
            for i, name in enumerate(approxes):
                x = np.arange(len(groups)) + (i - (len(approxes) - 1) / 2) * w
                ax.bar(x, values[name] - 1.0, w, bottom=1.0, color=palette[name],
                       label=name, hatch="///" if name in same else None)  # fmt: skip
            ax.set_xticks(range(len(groups)), [names[g] for g in groups])
            if rotate:
                for t in ax.get_xticklabels():
                    t.set(rotation=30, ha="right", rotation_mode="anchor")
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            low, high = min(map(np.nanmin, values.values())), max(map(np.nanmax, values.values()))
            if low > 0:  # room for the value labels beyond the bar ends
                ax.set_ylim(min(low, 1.0) / 3.0, max(high, 1.0) * 3.0)
        else:
            data = agg.assign(_x=agg[group].map(names) if group else agg["approx"])
            sns.barplot(
                data=data, x="_x", y="value", hue="approx", order=[names[g] for g in groups]
                if group else approxes, hue_order=approxes, palette=palette, errorbar=None,
                dodge=bool(group), legend=False, saturation=1.0, width=0.8, ax=ax,
            )  # fmt: skip
            for container, name in zip(list(ax.containers), approxes):
                sub = agg[agg["approx"] == name]
                err = sub["stderr"].to_numpy(float)
                if name in same:
                    for bar in container:
                        bar.set_hatch("///")
                if np.nan_to_num(err).any():
                    x = [b.get_x() + b.get_width() / 2 for b in container]
                    ax.errorbar(x, sub["value"].to_numpy(float), yerr=err, fmt="none",
                                ecolor="k", elinewidth=0.8, capsize=2)  # fmt: skip
            ax.set_xlabel("")
            if not group or rotate:
                for t in ax.get_xticklabels():
                    t.set(rotation=30, ha="right", rotation_mode="anchor")
        containers = [c for c in ax.containers if isinstance(c, BarContainer)]
        lo, hi = ax.get_ylim()
        log = ax.get_yscale() == "log"
        span = math.log10(hi / lo) if log else hi - lo
        for container in containers:
            tops = [bar.get_y() + bar.get_height() for bar in container]
            length = [abs(math.log10(v)) if log and v > 0 else abs(v) for v in tops]
            labels = [
                _fmt(v) if nbars <= 40 or d <= 0.02 * span else "" for v, d in zip(tops, length)
            ]
            ax.bar_label(container, labels=labels, fontsize=6, padding=1.5,
                         rotation=90 if nbars > 12 else 0)  # fmt: skip
        if group:
            handles = [
                Patch(facecolor=palette[a], hatch="///" if a in same else None,
                      label=f"{a} (= {same[a]})" if a in same else a)
                for a in approxes
            ]  # fmt: skip
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      borderaxespad=0.0)  # fmt: skip
        elif same:
            ticks = [f"{a} (= {same[a]})" if a in same else a for a in approxes]
            ax.set_xticks(range(len(approxes)), ticks, rotation=30, ha="right",
                          rotation_mode="anchor")  # fmt: skip
        ax.set_ylabel(metric_label(metric, k if metric == "overlap" else None))
        ax.grid(axis="x", visible=False)
        return _finish(fig, path, formats, title)


def preconditioning_quality(
    df: pd.DataFrame,
    block: str = "all",
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Preconditioned-step quality against the damping :math:`\lambda` (log axis).

    Two panels from :func:`curvkit.diagnostics.metrics.compare`'s ``precond_cosine``
    (:math:`\cos(d_A, d_B)`) and ``precond_reduction`` (fraction of the optimal
    reduction of the damped quadratic model, M&G 2015 §6.4), one line per approximation.

    Args:
        df: The comparison table (columns ``approx``, ``block``, ``metric``,
            ``value``, ``damping``).
        block: Which block (``"all"``: the whole matrix).
        colors: Optional approximation -> colour (others get palette colours).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure (two axes; the reduction axis is symmetric-log when a ratio
        falls below -1).

    Raises:
        ShapeError: If the table has no preconditioning rows.
    """
    _check_columns(df, "preconditioning_quality", ("approx", "block", "metric", "value", "damping"))
    names = {m: metric_label(m) for m in ("precond_cosine", "precond_reduction")}
    rows = df[df["metric"].isin(list(names)) & (df["block"] == block)]
    if rows.empty:
        raise ConfigError("preconditioning_quality: no precond_* rows (compare needs a gradient).")
    palette = _colors(rows["approx"], colors)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(2, 1, (4.2, 3.3))
        for ax, (metric, label) in zip(axes[0], names.items()):
            sub = rows[rows["metric"] == metric]
            lines = {}
            for name, part in sub.groupby("approx", sort=False):
                part = part.sort_values("damping")
                lines[name] = (part["damping"].to_numpy(float), part["value"].to_numpy(float))
            _plot_lines(ax, lines, palette, marker="o")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xlabel(r"damping $\lambda$")
            ax.set_ylabel(label)
            if float(np.nanmin(sub["value"].to_numpy(float))) < -1.0:
                ax.set_yscale("symlog", linthresh=1.0)
                ax.set_ylim(top=1.5)
        _figure_legend(fig, axes[0])
        return _finish(fig, path, formats, title)


# -- loss landscape ----------------------------------------------------------------------
def loss_landscape(
    model: torch.nn.Module,
    loss_func,
    data,
    directions: Mapping[str, torch.Tensor],
    alphas,
    params: Sequence[torch.Tensor] | None = None,
    normalize: bool = True,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
    table: pd.DataFrame | None = None,
) -> Figure:
    """Loss along directions (e.g. top eigenvectors against random ones), one line each.

    Directions whose name starts with ``"random"`` are drawn grey and dashed.

    Args:
        model: The model (left unchanged).
        loss_func: Its loss.
        data: ``(X, y)`` or an iterable of batches.
        directions: Name -> flat ``[D]`` direction.
        alphas: Step lengths.
        params: Parameters the directions refer to (default: trainable ones).
        normalize: Scale each direction to unit norm first.
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.
        table: A :func:`loss_along_directions` table computed before; drawn as
            it is (the model, data, directions and steps are then not used).

    Returns:
        The figure (one axes); its ``curvkit_data`` attribute holds the
        :func:`loss_along_directions` table.
    """
    if table is None:
        table = loss_along_directions(model, loss_func, data, directions, alphas, params, normalize)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, 1, (5.0, 3.4))
        ax = axes[0, 0]
        colors = iter(itertools.cycle(PALETTE))
        for name, part in table.groupby("direction", sort=False):
            rand = str(name).startswith("random")
            style = {"color": "#8c8c8c", "ls": "--", "lw": 1.0} if rand else {"color": next(colors)}
            ax.plot(part["alpha"], part["loss"], label=name, **style)
        ax.set_xlabel(r"step $\alpha$ along the unit direction")
        ax.set_ylabel(r"loss $L(\theta + \alpha d)$")
        _legend(ax, outside=table["direction"].nunique() > 3)
        fig.curvkit_data = table
        return _finish(fig, path, formats, title)


# -- estimators and training -------------------------------------------------------------
def estimator_error(
    rows,
    x: str = "matvecs",
    y: str = "error",
    hue: str = "method",
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Estimator error against the number of matrix-vector products (log-log).

    Repeated rows (several seeds) are averaged per ``(hue, x)``, with a band
    from their minimum to maximum; a dashed :math:`n^{-1/2}` line (Hutchinson's
    rate) is anchored at the first point for reference.

    Args:
        rows: A DataFrame or a list of dicts with columns ``x``, ``y`` and ``hue``.
        x: Column of the product counts.
        y: Column of the errors.
        hue: Column naming the estimator (one line each).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure (one axes).
    """
    df = pd.DataFrame(rows)
    _check_columns(df, "estimator_error", (x, y, hue))
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, 1, (4.8, 3.4))
        ax = axes[0, 0]
        stats = df.groupby([hue, x], sort=False)[y].agg(["mean", "min", "max"]).reset_index()
        for color, (name, part) in zip(itertools.cycle(PALETTE), stats.groupby(hue, sort=False)):
            part = part.sort_values(x)
            ax.plot(part[x], part["mean"], marker="o", color=color, label=name)
            if (part["max"] > part["min"]).any():
                ax.fill_between(part[x], part["min"], part["max"], color=color, alpha=0.15, lw=0)
        first = stats.sort_values(x).iloc[0]
        n = np.geomspace(stats[x].min(), stats[x].max(), 20)
        if first["mean"] > 0:
            ax.plot(
                n, first["mean"] * np.sqrt(first[x] / n), "k:", lw=1, label=r"$\propto n^{-1/2}$"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("matrix-vector products")
        ax.set_ylabel("relative error")
        ax.legend(loc="best")
        return _finish(fig, path, formats, title)


def curvature_over_training(
    df: pd.DataFrame,
    quantities: Sequence[str] | None = None,
    logy: bool | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    """Curves of a :class:`curvkit.CurvatureTracker` log, one panel per quantity.

    Args:
        df: The tracker's table (columns ``step``, ``quantity``, ``value``;
            optional ``index`` (e.g. eigenvalue rank: one line each), ``stderr``
            (a band of two standard errors) and ``curvature``).
        quantities: Quantities to draw, in order (default: all present).
        logy: Log value axis (default: where every value is positive).
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: one axes per quantity.

    Raises:
        ShapeError: If the table lacks columns or a quantity.
    """
    _check_columns(df, "curvature_over_training", ("step", "quantity", "value"))
    present = list(dict.fromkeys(df["quantity"]))
    quantities = present if quantities is None else list(quantities)
    missing = [q for q in quantities if q not in present]
    if missing or not quantities:
        raise ConfigError(f"curvature_over_training: no rows for {missing}; present: {present}.")
    ncols = min(3, len(quantities))
    nrows = math.ceil(len(quantities) / ncols)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(ncols, nrows, (3.8, 2.9))
        for ax in axes.ravel()[len(quantities) :]:
            ax.set_visible(False)
        for ax, q in zip(axes.ravel(), quantities):
            part = df[df["quantity"] == q]
            keys = [c for c in ("curvature", "index") if c in part and part[c].nunique() > 1]
            groups = part.groupby(keys, sort=True) if keys else [("", part)]
            for color, (key, line) in zip(itertools.cycle(PALETTE), groups):
                line = line.sort_values("step")
                parts = key if isinstance(key, tuple) else (key,)
                label = " ".join(_label(k) for k in parts) or None
                ax.plot(line["step"], line["value"], color=color, label=label)
                if "stderr" in line and np.nan_to_num(line["stderr"].to_numpy(float)).any():
                    se = 2 * line["stderr"].to_numpy(float)
                    v = line["value"].to_numpy(float)
                    ax.fill_between(line["step"], v - se, v + se, color=color, alpha=0.2, lw=0)
            positive = bool((part["value"] > 0).all())
            if logy if logy is not None else positive:
                ax.set_yscale("log")
            ax.set_title(q)
            ax.set_xlabel("step")
            ax.set_ylabel(QUANTITY_LABELS.get(q, q))
            if keys and len(groups) <= 10:
                ax.legend(loc="best", title=keys[-1])
        return _finish(fig, path, formats, title)
