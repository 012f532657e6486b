r"""Figures of curvature comparisons, spectra and estimators (the only module using matplotlib).

Every function returns a :class:`matplotlib.figure.Figure` built without
``pyplot`` (no global figure registry, works under any backend, Agg included)
and, when ``path`` is given, writes it as PNG and PDF (``path`` without its
suffix plus ``.png`` / ``.pdf``; ``formats`` chooses others). Styles are applied
with :func:`matplotlib.rc_context` around building and saving: the global
``rcParams`` are never changed.

Inputs are the outputs of the other modules: dense matrices and
``block_slices()`` of :mod:`curvkit.operators`, the tidy tables of
:func:`curvkit.compare` and :meth:`curvkit.CurvatureTracker.to_dataframe`,
:class:`curvkit.diagnostics.spectral.SpectralDensity` objects.

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
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from curvkit.data import as_batches
from curvkit.errors import ShapeError

__all__ = [
    "STYLE",
    "block_heatmap",
    "block_norms",
    "curvature_over_training",
    "eigenvalue_ranks",
    "estimator_error",
    "heatmaps",
    "loss_along_directions",
    "loss_landscape",
    "metric_bars",
    "preconditioning_quality",
    "save",
    "spectral_densities",
]

#: Colour-blind-safe qualitative palette (Okabe & Ito 2008; teal and wine from Tol 2021).
PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
    "#56B4E9", "#882255", "#000000", "#44AA99", "#999999",
)  # fmt: skip

#: ``rcParams`` applied (with :func:`matplotlib.rc_context`) to every figure.
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.prop_cycle": mpl.cycler(color=list(PALETTE)),
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "image.interpolation": "nearest",
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}
#: Largest side (pixels) of a heatmap before block max-pooling.
MAX_PIXELS = 600


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
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncol=min(5, len(entries)))  # fmt: skip


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
            raise ShapeError(
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
        title: Figure title.
        path: Where to save (see :func:`save`).
        formats: File formats when ``path`` is given.

    Returns:
        The figure: one axes per matrix and one colour bar.

    Raises:
        ShapeError: If ``mats`` is empty, a matrix is not 2-D, or ``block_slices`` do not fit.
    """
    if not mats:
        raise ShapeError("heatmaps: give at least one matrix.")
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
            _draw_blocks(ax, _slices(block_slices, n), n, "#4d4d4d" if log else "k")
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
        raise ShapeError("block_norms: give the blocks (block_slices).")
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
def spectral_densities(
    densities: Mapping,
    logy: bool = True,
    floor: float = 1e-6,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Overlaid spectral densities from :func:`curvkit.diagnostics.spectral.spectral_density`.

    Densities over :math:`\log_{10}\lambda` (``sd.log``) share a panel with a
    logarithmic eigenvalue axis; linear densities share another (so a PSD
    GGN on a log axis and an indefinite Hessian on a linear one can sit side by side).

    Args:
        densities: Name -> :class:`~curvkit.diagnostics.spectral.SpectralDensity` (``grid``,
            ``density``, ``log``, ``mass_below_cutoff`` are used).
        logy: Logarithmic density axis (values below ``floor`` times the largest are clipped).
        floor: Relative floor of the log density axis.
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
        raise ShapeError("spectral_densities: give at least one density.")
    kinds = sorted({bool(getattr(sd, "log", False)) for sd in densities.values()}, reverse=True)
    palette = _colors(densities, colors)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(len(kinds), 1, (4.6, 3.3))
        for ax, log in zip(axes[0], kinds):
            top = 0.0
            panel = {k: sd for k, sd in densities.items() if bool(getattr(sd, "log", False)) == log}
            for name, sd in panel.items():
                x, y = _numpy(sd.grid), _numpy(sd.density)
                top = max(top, float(y.max()))
                mass = float(getattr(sd, "mass_below_cutoff", 0.0) or 0.0)
                extra = f" ({100 * mass:.0f}% below cutoff)" if log and mass >= 0.005 else ""
                ax.plot(x, y, color=palette[name], label=f"{name}{extra}", lw=1.2)
                if len(panel) <= 2:
                    ax.fill_between(x, y, color=palette[name], alpha=0.08, lw=0)
            if log:
                ax.set_xscale("log")
                ax.set_xlabel(r"eigenvalue $\lambda$")
                ax.set_ylabel(r"density per unit $\log_{10}\lambda$")
            else:
                ax.set_xlabel(r"eigenvalue $\lambda$")
                ax.set_ylabel("density")
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
        raise ShapeError("eigenvalue_ranks: give at least one spectrum.")
    if scale not in ("auto", "log", "symlog", "linear"):
        raise ShapeError(f"eigenvalue_ranks: scale={scale!r} is not auto, log, symlog or linear.")
    values = {k: np.sort(_numpy(v).ravel())[::-1][:top] for k, v in eigs.items()}
    allv = np.concatenate(list(values.values()))
    if scale == "auto":
        scale = "log" if (allv > 0).all() else "symlog"
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, 1, (5.0, 3.4))
        ax = axes[0, 0]
        palette = _colors(values, colors)
        for name, v in values.items():
            rank = np.arange(1, v.size + 1)
            ax.plot(rank, v, label=name, color=palette[name], marker="." if v.size <= 50 else None)
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-6 * float(np.abs(allv).max() or 1.0))
        elif scale == "log":
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel(r"eigenvalue $\lambda_i$")
        _legend(ax, outside=len(values) > 3)
        return _finish(fig, path, formats, title)


# -- comparison tables -------------------------------------------------------------------
def _check_columns(df: pd.DataFrame, where: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ShapeError(f"{where}: the table lacks columns {missing} (use curvkit.compare's).")


def metric_bars(
    df: pd.DataFrame,
    metric: str = "overlap",
    block: str | None = "all",
    directions: Sequence[str] | None = None,
    colors: Mapping[str, str] | None = None,
    title: str | None = None,
    path=None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Figure:
    r"""Bars of one metric of :func:`curvkit.diagnostics.metrics.compare` per approximation.

    ``"directional"`` (curvature ratios :math:`v^\top A v / v^\top B v`) is drawn
    as groups per direction (top eigenvectors, gradient) on a log axis with the
    ideal ratio 1 marked; other metrics as one bar per approximation (error bars
    from ``stderr``), or groups per layer block when ``block=None``.

    Args:
        df: The comparison table (columns ``approx``, ``block``, ``metric``,
            ``value``, ``stderr``, ``direction``).
        metric: Which metric (``"overlap"``, ``"directional"``, ``"frobenius"``, ...).
        block: Which block (``"all"``: the whole matrix); ``None`` groups all blocks.
        directions: For ``"directional"``: the directions to show, e.g.
            ``("eigvec_1", "eigvec_2", "gradient")`` (default: all).
        colors: Optional approximation -> colour (others get palette colours).
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
        raise ShapeError(
            f"metric_bars: no rows for metric={metric!r}, block={block!r}, directions={directions}."
        )
    group = "direction" if metric == "directional" else ("block" if block is None else None)
    approxes = list(dict.fromkeys(rows["approx"]))
    groups = list(dict.fromkeys(rows[group])) if group else [""]
    width = 0.8 / len(approxes) if group else 0.7
    with mpl.rc_context(STYLE):
        bars = len(groups) * len(approxes) if group else len(approxes)
        fig, axes = _figure(1, 1, (min(11.0, max(4.5, 1.5 + 0.17 * bars + 0.3 * len(groups))), 3.4))
        ax = axes[0, 0]
        palette = _colors(approxes, colors)
        for i, name in enumerate(approxes):
            color = palette[name]
            sub = rows[rows["approx"] == name]
            if group:
                sub = sub.set_index(group).reindex(groups)
                x = np.arange(len(groups)) + (i - (len(approxes) - 1) / 2) * width
            else:
                x = np.array([i])
            y = sub["value"].to_numpy(float)
            err = sub["stderr"].to_numpy(float) if "stderr" in sub else None
            err = None if err is None or not np.nan_to_num(err).any() else err
            base = 1.0 if metric == "directional" else 0.0
            ax.bar(x, y - base, width, bottom=base, yerr=err, color=color,
                   label=name if group else None, capsize=2)  # fmt: skip
            if not group:
                ax.annotate(f"{y[0]:.3g}", (x[0], y[0]), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")  # fmt: skip
        if group:
            ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0)
            _legend(ax, outside=True)
        else:
            ax.set_xticks(range(len(approxes)), approxes, rotation=30, ha="right")
        if metric == "directional":
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_ylabel(r"$v^\top A v \,/\, v^\top B v$")
        else:
            ax.set_ylabel(metric)
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
    names = {"precond_cosine": "cosine to exact step", "precond_reduction": "model reduction ratio"}
    rows = df[df["metric"].isin(list(names)) & (df["block"] == block)]
    if rows.empty:
        raise ShapeError("preconditioning_quality: no precond_* rows (compare needs a gradient).")
    palette = _colors(rows["approx"], colors)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(2, 1, (4.2, 3.3))
        for ax, (metric, label) in zip(axes[0], names.items()):
            sub = rows[rows["metric"] == metric]
            for name, part in sub.groupby("approx", sort=False):
                part = part.sort_values("damping")
                ax.plot(part["damping"], part["value"], marker="o", color=palette[name], label=name)
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
def loss_along_directions(
    model: torch.nn.Module,
    loss_func,
    data,
    directions: Mapping[str, torch.Tensor],
    alphas,
    params: Sequence[torch.Tensor] | None = None,
    normalize: bool = True,
) -> pd.DataFrame:
    r"""The loss :math:`L(\theta + \alpha d)` along flat directions ``d``.

    Computed with :func:`torch.func.functional_call` on perturbed copies: the
    model's parameters are never modified. Batches are combined as the
    curvature operators do (the loss of the concatenated data).

    Args:
        model: The model.
        loss_func: Its loss (``reduction`` ``"mean"`` or ``"sum"``).
        data: ``(X, y)`` or an iterable of batches.
        directions: Name -> flat ``[D]`` direction (flat parameter order).
        alphas: Step lengths :math:`\alpha`.
        params: Parameters the directions refer to (default: trainable ones).
        normalize: Scale each direction to unit norm first.

    Returns:
        A DataFrame with columns ``direction``, ``alpha``, ``loss``.

    Raises:
        ShapeError: If a direction has the wrong size.
    """
    named = dict(model.named_parameters())
    params = [p for p in named.values() if p.requires_grad] if params is None else list(params)
    ids = {id(p): n for n, p in named.items()}
    names = [ids[id(p)] for p in params]
    D = sum(p.numel() for p in params)
    batches = as_batches(data)
    N = sum(X.shape[0] for X, _ in batches)
    mean = getattr(loss_func, "reduction", "mean") == "mean"
    rows = []
    with torch.no_grad():
        for label, d in directions.items():
            d = torch.as_tensor(d).reshape(-1).to(params[0])
            if d.numel() != D:
                raise ShapeError(
                    f"loss_along_directions: {label!r} has {d.numel()} entries, D={D}."
                )
            if normalize:
                d = d / d.norm().clamp_min(torch.finfo(d.dtype).tiny)
            parts = d.split([p.numel() for p in params])
            for a in _numpy(alphas).ravel().tolist():
                moved = {n: p + a * v.view_as(p) for n, p, v in zip(names, params, parts)}
                total = 0.0
                for X, y in batches:
                    out = torch.func.functional_call(model, moved, (X,))
                    weight = X.shape[0] / N if mean else 1.0
                    total += weight * float(loss_func(out, y))
                rows.append({"direction": label, "alpha": a, "loss": total})
    return pd.DataFrame(rows, columns=["direction", "alpha", "loss"])


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

    Returns:
        The figure (one axes); its ``curvkit_data`` attribute holds the
        :func:`loss_along_directions` table.
    """
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
        raise ShapeError(f"curvature_over_training: no rows for {missing}; present: {present}.")
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
            if keys and len(groups) <= 10:
                ax.legend(loc="best", title=keys[-1])
        return _finish(fig, path, formats, title)
