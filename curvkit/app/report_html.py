"""Figures and the HTML page of :mod:`curvkit.app.report` (one self-contained file, no scripts)."""

from __future__ import annotations

import base64
import datetime
import html
import math

import numpy as np

#: One colour per operator in every figure.
COLORS = {
    "GGN": "#000000", "Hessian": "#D55E00", "Fisher (MC)": "#E69F00", "EF": "#CC79A7",
    "KFAC": "#56B4E9", "KFLR": "#0072B2", "KFRA": "#009E73", "EKFAC": "#882255",
    "diag GGN": "#999999", "tri-diag KFLR": "#44AA99",
}  # fmt: skip

_CSS = """
:root { --fg:#1c2331; --muted:#5d6678; --line:#dfe3ea; --bg:#f4f6f9; --accent:#1f5fae;
        --head:#14284b; --ok:#1e6b34; --okbg:#e5f3e9; --na:#9b2c12; --nabg:#fbe9e4; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:var(--head); color:#fff; padding:26px 0 22px; }
header h1 { margin:0 0 4px; font-size:24px; font-weight:650; letter-spacing:.2px; }
header p { margin:0; color:#c9d4e8; }
.wrap { max-width:1140px; margin:0 auto; padding:0 24px; }
.facts { display:grid; grid-template-columns:repeat(auto-fill, minmax(165px, 1fr)); gap:10px;
         margin-top:18px; }
.fact { background:rgba(255,255,255,.08); border-radius:6px; padding:8px 12px; }
.fact b { display:block; font-size:11px; text-transform:uppercase; letter-spacing:.6px;
          color:#a9b8d3; font-weight:600; }
.fact span { font-size:15px; font-variant-numeric:tabular-nums; }
nav { margin:18px 0 0; font-size:13px; }
nav a { color:#dbe6fa; margin-right:14px; text-decoration:none; white-space:nowrap; }
nav a:hover { text-decoration:underline; }
section { background:#fff; border:1px solid var(--line); border-radius:8px;
          padding:18px 24px 20px; margin:20px 0; }
h2 { margin:0 0 10px; font-size:19px; color:var(--head); }
h3 { margin:18px 0 6px; font-size:15px; color:var(--head); }
p.lead { margin:0 0 12px; color:var(--muted); }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; font-size:13px; margin:6px 0 4px; }
th { text-align:left; font-weight:600; color:var(--muted); border-bottom:2px solid var(--line);
     padding:5px 10px; white-space:nowrap; background:#fafbfc; }
td { padding:4px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap;
         font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px; }
th.num { text-align:right; }
tbody tr:hover td { background:#f3f7fd; }
td.note { color:var(--muted); font-size:12px; max-width:420px; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
         font-weight:600; }
.badge.ok { background:var(--okbg); color:var(--ok); }
.badge.na { background:var(--nabg); color:var(--na); }
.na-reason { display:block; color:var(--na); font-size:12px; margin-top:2px; }
figure { margin:18px 0 8px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
figcaption b { color:var(--fg); }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:6px; padding:10px 12px;
      white-space:pre-wrap; overflow-wrap:anywhere; font-size:12.5px; margin:6px 0; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:8px 24px; }
@media (max-width: 900px) { .grid2 { grid-template-columns:1fr; } }
footer { color:var(--muted); font-size:12px; text-align:center; padding:8px 0 28px; }
a { color:var(--accent); }
ul.highlights { margin:4px 0 12px; padding-left:20px; }
ul.highlights li { margin:2px 0; }
header p.failed { color:#ffd2c4; font-weight:600; margin-top:6px; }
header p.failed a { color:#ffd2c4; }
"""


# -- figures ------------------------------------------------------------------------------
def layer_label(block: dict) -> str:
    """``"blocks.0.conv1 (Conv2d)"`` for a block entry ``{"name", "type"}`` (plain text)."""
    name = block["name"] or "(root)"
    return f"{name} ({block['type']})" if block.get("type") else name


def _draw_tracking(P, records):
    import pandas as pd

    df = pd.DataFrame(records)
    eig = df[df["quantity"] == "eigenvalue"].assign(quantity="top GGN eigenvalues")
    tr = df[df["quantity"] == "trace"].assign(quantity="GGN trace (Hutch++)")
    loss = df[df["quantity"] == "loss"].assign(quantity="loss")
    parts = [p for p in (loss, eig, tr) if len(p)]
    return P.curvature_over_training(pd.concat(parts, ignore_index=True))


def make_figures(run, folder, state) -> None:
    """Draw and save every figure whose inputs exist (PNG and PDF), one at a time.

    Each figure lands in ``run.figures`` (``title``, ``caption``, ``png`` as
    base64, ``width``, ``files``) as soon as it is saved; a figure that fails
    is recorded in ``run.results["failures"]`` and the others go on. Block
    errors go to ``run.results["block_errors"]`` and the bin counts of the
    eigenvalue histogram to ``run.results["eigenvalue_histogram"]``. Nothing
    here computes curvature: the damped inverses and the landscape come in
    ``state`` from their phases.
    """
    from curvkit import plotting as P

    dense, ref_op = state.get("dense", {}), state.get("ref_op")
    table, eigs = state.get("table"), state.get("eigs", {})
    labels = state.get("labels", {})
    blocks = ref_op.block_slices() if ref_op is not None else []
    names = [labels.get(n, n) for n, _ in blocks]
    shown_blocks = [(labels.get(n, n), s) for n, s in blocks]
    damping = state.get("damping", 1e-3)
    todo = []

    def add(key, title, caption, draw):
        todo.append((key, title, caption, draw))

    G = dense.get("GGN")
    block_errors, inverses = {}, {}
    if G is not None:
        shown = {n: dense[n] for n in ("GGN", "KFLR", "tri-diag KFLR") if n in dense}
        add(
            "matrices", "GGN, KFLR and tri-diagonal KFLR" if len(shown) == 3 else "Dense matrices",
            "log<sub>10</sub>|entry| of the dense matrices on one colour scale; lines separate "
            "the layers (weight and bias of a layer form one block). KFLR keeps only the "
            "diagonal blocks (white: exact zeros); the tri-diagonal model fills the off-diagonal "
            "blocks.",
            lambda: P.heatmaps(shown, shown_blocks),
        )  # fmt: skip

        def draw_inverses():
            inverses.update(state.get("inverses") or {})
            return P.heatmaps(inverses, shown_blocks) if inverses else None

        add(
            "inverses", f"Damped inverses (λ = {damping:.3g})",
            "(GGN + λI)<sup>−1</sup> against the inverses of the two Kronecker models, both "
            "damped as M&amp;G 2015 do (factored Tikhonov, §6.3, with the same λ). M&amp;G "
            "(Fig. 3) found the exact inverse close to block-tri-diagonal, which motivates the "
            "tri-diagonal model (its inverse is exactly block-tri-diagonal; KFLR's is "
            "block-diagonal).",
            draw_inverses,
        )  # fmt: skip
        for name in ("KFLR", "tri-diag KFLR", "KFAC", "EKFAC", "EF", "Fisher (MC)"):
            if name in dense:
                block_errors[name] = P.block_norms(dense[name], blocks, G)
        if block_errors:
            add(
                "block_errors", "Per-block relative error against the GGN",
                "‖A<sub>ij</sub> − G<sub>ij</sub>‖<sub>F</sub> / ‖G<sub>ij</sub>‖<sub>F</sub> for "
                "every pair of layers (i, j): 1 on blocks an approximation sets to zero.",
                lambda: P.block_heatmap(block_errors, names, ncols=3),
            )  # fmt: skip

        def draw_inverse_errors():
            if EXACT_INVERSE not in inverses:
                return None
            exact_inv = inverses[EXACT_INVERSE]
            errors = {k: P.block_norms(v, blocks, exact_inv) for k, v in inverses.items()
                      if k != EXACT_INVERSE}  # fmt: skip
            block_errors["inverse"] = errors
            if not errors:
                return None
            return P.block_heatmap(errors, names)

        add(
            "block_errors_inverse", "Per-block relative error of the damped inverses",
            "Block errors against (GGN + λI)<sup>−1</sup>; the block-diagonal inverse sets the "
            "off-diagonal blocks to zero (error 1), the tri-diagonal one models the first "
            "off-diagonal blocks.",
            draw_inverse_errors,
        )  # fmt: skip
    densities = state.get("densities")
    if densities:
        probes = (
            "10 Rademacher probes"
            if state["dense_mode"]
            else "3 Rademacher probes × 20 Lanczos steps"
        )
        add(
            "densities", "Spectral densities (stochastic Lanczos quadrature)",
            f"Gaussian-smoothed densities from {probes}; positive semi-definite "
            "matrices over log<sub>10</sub> λ (left; eigenvalues below 10<sup>−6</sup> λ<sub>max"
            "</sub> are placed at that cutoff), the indefinite Hessian over λ (right).",
            lambda: P.spectral_densities(densities, colors=COLORS),
        )  # fmt: skip
    if eigs:
        dense_caption = (
            "All eigenvalues (dense eigh), largest first; a symmetric-log axis where some are "
            "negative or zero."
        )
        free_caption = "Top eigenvalues by restarted Lanczos (residuals in the Spectra table)."
        add(
            "ranks", "Eigenvalues by rank" if state["dense_mode"] else "Top eigenvalues by rank",
            dense_caption if state["dense_mode"] else free_caption,
            lambda: P.eigenvalue_ranks(eigs, colors=COLORS),
        )  # fmt: skip
    hist = {n: eigs[n] for n in ("GGN", "Hessian", "EF", "Fisher (MC)", "KFLR") if n in eigs}
    if state["dense_mode"] and hist:
        add(
            "histogram", "Eigenvalue histograms",
            "Counts of the exact eigenvalues (dense eigh) in logarithmic bins of |λ|: positive "
            "eigenvalues upwards, negative ones (by magnitude) downwards; eigenvalues below "
            "10<sup>−8</sup> max|λ| are not binned (their number is in the legend).",
            lambda: P.eigenvalue_histogram(hist, colors=COLORS),
        )  # fmt: skip
    kron = next((n for n in ("KFLR", "KFAC", "EKFAC") if n in dense), None)
    if G is not None and kron is not None and blocks:
        add(
            "layer_spectra", f"Per-layer spectra: {kron} against the GGN",
            f"Eigenvalues of each layer's diagonal block of the GGN and of {kron}, largest "
            "first (log-log; a symmetric-log axis where a block is indefinite); dashed and "
            "marked “= exact” where the two coincide.",
            lambda: P.layer_spectra(
                {label: dense[kron][s, s] for label, s in shown_blocks},
                {label: G[s, s] for label, s in shown_blocks},
                approx_name=kron, exact_name="GGN", colors=COLORS,
            ),
        )  # fmt: skip
    if table is not None and len(table):
        if (table["metric"] == "overlap").any():
            add(
                "overlap", "Top eigenspace overlap with the GGN",
                "‖V<sub>A</sub><sup>T</sup>V<sub>G</sub>‖<sub>F</sub><sup>2</sup>/k of the top-k "
                "eigenvectors (Gur-Ari et al. 2018): 1 when the top eigenspaces coincide.",
                lambda: P.metric_bars(table, "overlap", colors=COLORS),
            )  # fmt: skip
        top3 = ("eigvec_1", "eigvec_2", "eigvec_3", "gradient")
        if (table["metric"] == "directional").any():
            add(
                "directional", "Directional curvature relative to the GGN",
                "v<sup>T</sup>Av / v<sup>T</sup>Gv along the GGN's top three eigenvectors and "
                "the gradient (all k in metrics.csv); 1 is exact, bars start at 1.",
                lambda: P.metric_bars(table, "directional", directions=top3, colors=COLORS),
            )  # fmt: skip
        add(
            "frobenius", "Relative Frobenius error, whole matrix and per layer",
            "‖A − G‖<sub>F</sub>/‖G‖<sub>F</sub> on the whole matrix (“all”) and on each "
            "layer's diagonal block"
            + ("." if state["dense_mode"] else " (block-probe estimates; standard errors in "
               "metrics.csv)."),
            lambda: P.metric_bars(table, "frobenius", block=None, colors=COLORS),
        )  # fmt: skip
        if (table["metric"] == "precond_cosine").any():
            add(
                "preconditioning", "Preconditioning quality against the damping",
                "Left: cosine between (A + λI)<sup>−1</sup>g and (G + λI)<sup>−1</sup>g. Right: "
                "the fraction of the optimal decrease of the damped quadratic model "
                "q(δ) = g<sup>T</sup>δ + ½δ<sup>T</sup>(G + λI)δ (M&amp;G 2015, §6.4) the step "
                "achieves.",
                lambda: P.preconditioning_quality(table, colors=COLORS),
            )  # fmt: skip
    if state.get("error_rows"):
        add(
            "estimators", "Trace estimators: relative error against the budget",
            "|estimate − tr G| / tr G, mean over 5 seeds (band: min–max), against the number "
            "of matrix-vector products.",
            lambda: P.estimator_error(state["error_rows"]),
        )  # fmt: skip
    if state.get("landscape") is not None:
        add(
            "landscape", "Loss along top eigenvectors, the gradient and random directions",
            f"L(θ + αd) for unit directions d, |α| ≤ {state['span']:.3g} (= 2/√λ<sub>max</sub>, "
            "where the quadratic model along the top eigenvector rises by 2): top Hessian "
            "eigenvectors, the normalised gradient and random Gaussian directions (grey, dashed).",
            lambda: P.loss_landscape(None, None, None, None, None, table=state["landscape"]),
        )  # fmt: skip
    if run.results.get("tracking"):
        add(
            "tracking", "Curvature over training",
            "Loss, top-3 GGN eigenvalues (Lanczos) and the GGN trace (Hutch++, band: ±2 standard "
            "errors) on a fixed batch of 32 examples of the report's data, recorded by "
            "<code>curvkit.CurvatureTracker</code> during the Adam steps.",
            lambda: _draw_tracking(P, run.results["tracking"]),
        )  # fmt: skip
    for key, title, caption, draw in run.bar(todo, desc="figures"):
        try:
            fig = draw()
            if fig is None:
                continue
            if key == "histogram":
                run.results["eigenvalue_histogram"] = fig.curvkit_data.to_dict(orient="records")
            files = P.save(fig, folder / key, ("png", "pdf"))
        except Exception as e:  # noqa: BLE001 - one figure less, the report goes on
            run.fail(f"figure {key}", e)
            continue
        png = files[0].read_bytes()
        run.figures[key] = {
            "title": title,
            "caption": caption,
            "png": base64.b64encode(png).decode("ascii"),
            # CSS pixels: 1.2 x the figure's physical size (96 px per inch) for screen reading
            "width": round(int.from_bytes(png[16:20], "big") * 1.2 * 96 / P.STYLE["savefig.dpi"]),
            "files": [f"{folder.name}/{f.name}" for f in files],
        }
    run.results["block_errors"] = _lists(block_errors)
    run.results["figures"] = {k: f["files"] for k, f in run.figures.items()}
    run.save()


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return np.asarray(value).tolist()


# -- formatting ---------------------------------------------------------------------------
def _fmt(value) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == 0:
            return "0"
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3e}" if abs(v) >= 1e5 or abs(v) < 1e-3 else f"{v:.4g}"
    return html.escape(str(value))


def _missing(value) -> bool:
    import pandas as pd

    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _bytes(n) -> str:
    if _missing(n):
        return "–"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return ""


def _table(rows, columns, raw=()) -> str:
    """HTML table of ``rows`` (dicts); ``columns`` are ``(key, label)``; ``raw`` keys hold HTML.

    Labels are HTML written by this module; text from the model or the user
    (module names, problem names) must be escaped before it becomes a label.
    """
    head = "".join(
        f'<th class="num">{label}</th>'
        if any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
               for r in rows)
        else f"<th>{label}</th>"
        for key, label in columns
    )  # fmt: skip
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            if key in raw:
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                text = f"{v:.3f}" if key.endswith("_s") or key == "seconds" else _fmt(v)
                cells.append(f'<td class="num">{text}</td>')
            elif key in ("notes", "note"):
                cells.append(f'<td class="note">{_fmt(v)}</td>')
            else:
                cells.append(f"<td>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _figure(figures, key) -> str:
    if key not in figures:
        return ""
    f = figures[key]
    links = " · ".join(f'<a href="{html.escape(p)}">{html.escape(p.rsplit(".", 1)[1].upper())}</a>'
                       for p in f["files"])  # fmt: skip
    return (
        f'<figure id="fig-{key}"><img alt="{html.escape(f["title"])}" '
        f'style="width:{f["width"]}px" src="data:image/png;base64,{f["png"]}">'
        f"<figcaption><b>{html.escape(f['title'])}.</b> {f['caption']} "
        f"<span>({links})</span></figcaption></figure>"
    )


def _section(anchor, title, lead, *parts) -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{anchor}"><h2>{title}</h2>{lead_html}{"".join(parts)}</section>'


# -- sections -----------------------------------------------------------------------------
#: Exact matrices: compared with the GGN, never ranked as its approximations.
EXACT = ("GGN", "Hessian", "Fisher (MC)", "EF")
#: Name of the exact damped inverse among ``state["inverses"]``.
EXACT_INVERSE = "(GGN + λI)⁻¹"


def _operators(results) -> str:
    rows = []
    for r in results.get("operators", []):
        status = r["status"]
        if status == "ok":
            badge = '<span class="badge ok">ok</span>'
        else:
            kind, _, reason = status.partition(": ")
            badge = (
                f'<span class="badge na">{html.escape(kind)}</span><span class="na-reason">'
                + html.escape(reason)
                + "</span>"
            )
        rows.append({**r, "status_html": badge})
    return _table(
        rows,
        [("name", "operator"), ("description", "what"), ("status_html", "status"),
         ("build_s", "build [s]"), ("dense_s", "dense [s]"), ("dense_method", "dense from"),
         ("matvecs", "products (all phases)"), ("notes", "notes")],
        raw=("status_html",),
    )  # fmt: skip


def _comparison(results, labels) -> tuple[str, str]:
    table = results.get("comparison") or []
    rows = [r for r in table if r["block"] == "all"]
    grid = results["settings"].get("damping_grid") or []
    mid = grid[len(grid) // 2] if grid else None
    summary = {}
    for r in rows:
        s = summary.setdefault(r["approx"], {"approx": r["approx"]})
        if r["metric"] in ("frobenius", "cosine", "spectral", "overlap"):
            s[r["metric"]] = r["value"]
            if r["metric"] == "frobenius":
                s["frobenius_se"] = r.get("stderr")
        elif r["metric"] == "directional" and r["direction"] == "gradient":
            s["dir_grad"] = r["value"]
        elif r["metric"] == "directional" and r["direction"] == "eigvec_1":
            s["dir_top"] = r["value"]
        elif r["metric"] == "precond_reduction" and r["damping"] == mid:
            s["reduction"] = r["value"]
        elif r["metric"] == "precond_cosine" and r["damping"] == mid:
            s["pcos"] = r["value"]
    k = results["settings"]["k"]
    approximations = [s for s in summary.values() if s["approx"] not in EXACT]
    highlights = []
    for key, label, best in (
        ("frobenius", "smallest relative Frobenius error", min),
        ("overlap", f"largest top-{k} eigenspace overlap", max),
    ):
        scored = [(s[key], s["approx"]) for s in approximations if s.get(key) is not None]
        if scored:
            value, name = best(scored)
            highlights.append(
                f"<li>best approximation by {label}: <b>{html.escape(name)}</b> "
                f"({_fmt(value)})</li>"
            )
    reductions = [(s["reduction"], s["approx"]) for s in approximations
                  if s.get("reduction") is not None]  # fmt: skip
    if reductions:
        value, name = max(reductions)
        if value > 0:
            highlights.append(
                f"<li>largest model reduction at λ = {mid:.2g}: <b>{html.escape(name)}</b> "
                f"({_fmt(value)} of the optimum)</li>"
            )
        else:
            highlights.append(
                f"<li>no approximation's step reduces the damped quadratic model at "
                f"λ = {mid:.2g} (best: {html.escape(name)}, {_fmt(value)})</li>"
            )
    exact = [s["approx"] for s in summary.values() if s["approx"] in EXACT]
    if exact:
        highlights.append(
            "<li>exact matrices compared with the GGN (not ranked as approximations): "
            + ", ".join(html.escape(n) for n in exact)
            + "</li>"
        )
    columns = [("approx", "matrix"), ("frobenius", "rel. Frobenius")]
    if results["settings"].get("mode") == "matrix-free":
        columns.append(("frobenius_se", "± std. error"))
    columns += [("cosine", "cosine"), ("spectral", "rel. spectral"),
                ("overlap", f"overlap (k={k})"), ("dir_top", "v₁ᵀAv₁ / v₁ᵀGv₁"),
                ("dir_grad", "gᵀAg / gᵀGg")]  # fmt: skip
    if mid is not None:
        columns += [("pcos", f"step cosine (λ={mid:.2g})"),
                    ("reduction", f"model reduction (λ={mid:.2g})")]  # fmt: skip
    shown = [c for c in columns if c[0] == "approx" or any(c[0] in s for s in summary.values())]
    main = _table(list(summary.values()), shown)
    per_block = {}
    for r in table:
        if r["metric"] == "frobenius" and r["block"] != "all":
            per_block.setdefault(r["approx"], {"approx": r["approx"]})[r["block"]] = r["value"]
    blocks = [b["name"] for b in results["problem"].get("blocks", [])]
    layers = _table(
        list(per_block.values()),
        [("approx", "matrix")] + [(b, html.escape(labels.get(b, b))) for b in blocks],
    )
    return f'<ul class="highlights">{"".join(highlights)}</ul>' + main, layers


def _spectra(results) -> tuple[str, str]:
    main = _table(
        results.get("spectra", []),
        [("name", "matrix"), ("lambda_max", "λ<sub>max</sub>"), ("lambda_min", "λ<sub>min</sub>"),
         ("trace", "trace"), ("negative", "# λ &lt; 0"), ("effective_rank", "effective rank"),
         ("method", "method")],
    )  # fmt: skip
    lz = [r for r in results.get("lanczos", []) if r.get("index") in (1, 2, 3)]
    lanczos = _table(
        lz,
        [("name", "matrix"), ("index", "i"), ("lanczos", "Lanczos λ<sub>i</sub>"),
         ("dense", "dense λ<sub>i</sub>"), ("abs_diff", "|difference|"),
         ("residual", "‖Av − λv‖"), ("matvecs", "products"), ("restarts", "restarts")],
    )  # fmt: skip
    return main, lanczos


def _memory(memory_wide, labels) -> str:
    if memory_wide is None:
        return ""
    rows = []
    for layer, r in memory_wide.iterrows():
        name = labels.get(layer, layer) if isinstance(layer, str) else layer
        rows.append({"layer": name, **{k: _bytes(v) for k, v in r.items()}})
    names = {
        "full": "full (layer's rows)", "block_diagonal": "block-diagonal",
        "kronecker": "Kronecker", "kronecker_cross": "cross factors", "diagonal": "diagonal",
    }  # fmt: skip
    return _table(
        rows,
        [("layer", "layer")]
        + [(c, names.get(c, html.escape(str(c)))) for c in memory_wide.columns],
    )


def _failures(results) -> str:
    failures = results.get("failures", [])
    if not failures:
        return ""
    return (
        '<section id="failures"><h2>What failed</h2><p class="lead">These parts of the report '
        "could not be computed; everything else on the page is complete.</p>"
        + _table(failures, [("phase", "phase"), ("error", "error"), ("where", "where")])
        + "</section>"
    )


def _tracking(results, figures) -> str:
    records = results.get("tracking")
    if not records:
        return ""
    last = {}
    for r in records:
        key = r["quantity"] + (f" {r['index']}" if r.get("index") is not None else "")
        last.setdefault(key, []).append(r)
    rows = [{"quantity": k, "first": v[0]["value"], "last": v[-1]["value"],
             "stderr": v[-1]["stderr"], "steps": len(v)} for k, v in last.items()]  # fmt: skip
    return _section(
        "tracking", "Curvature over training",
        "Recorded during the Adam steps before the analysis (every results row is in "
        "results.json, section <code>tracking</code>).",
        _table(rows, [("quantity", "quantity"), ("first", "first"), ("last", "last"),
                      ("stderr", "last std. error"), ("steps", "records")]),
        _figure(figures, "tracking"),
    )  # fmt: skip


def _safe(part, *args) -> str:
    """A section's HTML, or a note of why it could not be drawn."""
    try:
        return part(*args)
    except Exception as e:  # noqa: BLE001 - one section less, never no page
        return (
            f'<section><h2>Section not rendered</h2><p class="na-reason">'
            f"{html.escape(type(e).__name__)}: {html.escape(str(e))}</p></section>"
        )


def render(results, figures, memory_wide) -> str:
    """The whole page as one HTML string (figures inlined as base64 PNG, PDF files linked).

    Every text that comes from the model, the data or the user (problem and
    module names, error messages) is HTML-escaped.
    """
    p, s = results["problem"], results["settings"]
    esc = html.escape
    labels = {b["name"]: layer_label(b) for b in p.get("blocks", [])}
    matrix_free = s.get("mode") == "matrix-free"
    facts = [
        ("parameters D", _fmt(p["num_params"])), ("examples N", _fmt(p["n_samples"])),
        ("loss", _fmt(p.get("loss"))), ("‖gradient‖", _fmt(p.get("gradient_norm"))),
        ("training", f"{p['train_steps']} Adam steps"),
        ("regime", f"{esc(s['mode'])} (max_dense {s['max_dense']:,})"),
        ("device · dtype", f"{esc(s['device'])} · {esc(s['dtype'])}"), ("seed", str(s["seed"])),
        ("total time", f"{results['timings_s']['total']:.1f} s"),
    ]  # fmt: skip
    toc = [("operators", "Operators"), ("comparison", "Comparison"), ("structure", "Structure"),
           ("spectra", "Spectra"), ("preconditioning", "Preconditioning"),
           ("traces", "Traces"), ("landscape", "Landscape"), ("memory", "Memory"),
           ("reproduce", "Reproduce")]  # fmt: skip
    if results.get("tracking"):
        toc.insert(-1, ("tracking", "Training"))
    if results.get("failures"):
        toc.insert(0, ("failures", "What failed"))
    failed_note = (
        f'<p class="failed">{len(results["failures"])} part(s) failed: see '
        '<a href="#failures">What failed</a>.</p>'
        if results.get("failures")
        else ""
    )
    header = (
        f'<header><div class="wrap"><h1>Curvature report · {esc(p["name"])}</h1>'
        f"<p>{esc(p['description'])}; curvature on {p['n_samples']} training examples "
        f"(model in evaluation mode), reference: the exact {esc(s['reference'])}.</p>"
        + failed_note
        + '<div class="facts">'
        + "".join(f'<div class="fact"><b>{k}</b><span>{v}</span></div>' for k, v in facts)
        + "</div><nav>"
        + "".join(f'<a href="#{a}">{t}</a>' for a, t in toc)
        + "</nav></div></header>"
    )
    timings = [{"phase": k, "seconds": v} for k, v in results["timings_s"].items()]
    versions = [{"package": k, "version": v} for k, v in results["versions"].items()]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    regime = (
        "Matrix-free (D above max_dense): no D × D matrix is formed; spectra by Lanczos and "
        "stochastic Lanczos quadrature, traces and comparisons from randomised products with "
        "standard errors."
        if matrix_free
        else "Every matrix is formed densely from batched products (per-example Jacobians for "
        "the Gauss-Newton forms, vectorised Hessian-vector products for the Hessian) in flat "
        "parameter order."
    )

    def comparison():
        comp_main, comp_layers = _comparison(results, labels)
        how = (
            f"Block-probe estimates ({s.get('probes_per_block')} Rademacher probes per layer "
            "block, shared by the whole matrix and the blocks) and Lanczos vectors"
            if matrix_free
            else "Whole-matrix metrics of <code>curvkit.compare</code> (exact, dense)"
        )
        return _section(
            "comparison", f"Comparison with the {esc(s['reference'])}",
            f"{how}; all rows, per layer (and per damping), with standard errors, are in "
            '<a href="metrics.csv">metrics.csv</a>.',
            comp_main, _figure(figures, "overlap"), _figure(figures, "directional"),
            "<h3>Relative Frobenius error per layer block</h3>", comp_layers,
            _figure(figures, "frobenius"),
        )  # fmt: skip

    def structure():
        parts = [_figure(figures, k) for k in
                 ("matrices", "inverses", "block_errors", "block_errors_inverse")]  # fmt: skip
        lead = (
            None
            if any(parts)
            else ("Dense matrices only (D ≤ max_dense)." if matrix_free else "No figure available.")
        )
        return _section("structure", "Structure of the matrices and their inverses", lead, *parts)

    def spectra():
        spec_main, spec_lanczos = _spectra(results)
        lead = (
            "Top eigenvalues by restarted Lanczos with their residuals ‖Av − λv‖ (an eigenvalue "
            "lies within the residual of each Ritz value)."
            if matrix_free
            else "Dense eigenvalues of every matrix; restarted Lanczos checked against them."
        )
        return _section(
            "spectra", "Spectra", lead, spec_main,
            "<h3>Lanczos (top 3)</h3>", spec_lanczos,
            _figure(figures, "densities"), _figure(figures, "ranks"),
            _figure(figures, "histogram"), _figure(figures, "layer_spectra"),
        )  # fmt: skip

    def preconditioning():
        grid = s.get("damping_grid")
        lead = (
            "Damping grid: " + ", ".join(f"{v:.3g}" for v in grid)
            + " (λ<sub>max</sub>(GGN) × 10<sup>−5…0</sup>)."
            if grid
            else "Dense regime only: damped solves with every approximation need the matrices."
        )  # fmt: skip
        return _section(
            "preconditioning", "Preconditioning", lead, _figure(figures, "preconditioning")
        )

    def traces():
        budget = "99" if not matrix_free else "18"
        return _section(
            "traces", "Traces",
            f"Randomised estimates ({budget} products each) with standard errors"
            + (" against the exact trace; z = (estimate − exact) / standard error (– where the "
               "error is zero: Hutch++ is exact when the rank is below its sketch size)."
               if not matrix_free else "."),
            _table(results.get("traces", []),
                   [("name", "matrix"), ("method", "method"), ("estimate", "estimate"),
                    ("stderr", "std. error"), ("exact", "exact"), ("z", "z"),
                    ("matvecs", "products"), ("note", "note")]),
            _figure(figures, "estimators"),
        )  # fmt: skip

    sections = [
        _safe(_failures, results),
        _safe(
            lambda: _section("operators", "Operators", regime + " An approximation the model "
                             "does not support is listed with the reason.", _operators(results))
        ),  # fmt: skip
        _safe(comparison), _safe(structure), _safe(spectra), _safe(preconditioning),
        _safe(traces),
        _safe(lambda: _section("landscape", "Loss landscape", None,
                               _figure(figures, "landscape"))),  # fmt: skip
        _safe(
            lambda: _section(
                "memory", "Memory",
                "Storage (float32) of each representation of a D × D curvature matrix, per layer.",
                _memory(memory_wide, labels),
            )
        ),
        _safe(_tracking, results, figures),
        _section(
            "reproduce", "Reproduce",
            "Command line, versions and wall-clock time of each phase.",
            f"<pre>{esc(results['command'])}</pre>",
            '<div class="grid2"><div><h3>Versions</h3>',
            _table(versions, [("package", "package"), ("version", "version")]),
            "</div><div><h3>Timings</h3>",
            _table(timings, [("phase", "phase"), ("seconds", "seconds")]),
            "</div></div>",
            '<p>Files: <a href="metrics.csv">metrics.csv</a> · '
            '<a href="results.json">results.json</a> · figures/ (PNG and PDF).</p>',
        ),
    ]  # fmt: skip
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>curvkit report · {esc(p['name'])}</title><style>{_CSS}</style></head><body>"
        f'{header}<main class="wrap">{"".join(sections)}</main>'
        f"<footer>Generated by curvkit {esc(results['versions']['curvkit'])} on {now}.</footer>"
        "</body></html>\n"
    )


def fallback(results) -> str:
    """A plain page when :func:`render` fails: the failures and a pointer to results.json."""
    p = results.get("problem", {})
    rows = "".join(
        f"<li>{html.escape(f['phase'])}: {html.escape(f['error'])}</li>"
        for f in results.get("failures", [])
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>curvkit report · {html.escape(str(p.get('name', '')))}</title></head><body>"
        f"<h1>Curvature report · {html.escape(str(p.get('name', '')))}</h1>"
        f"<p>The page could not be drawn; every number computed is in "
        f'<a href="results.json">results.json</a>.</p><h2>What failed</h2><ul>{rows}</ul>'
        "</body></html>\n"
    )
