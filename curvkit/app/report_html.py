"""Figures and the HTML page of :mod:`curvkit.app.report` (one self-contained file, no scripts)."""

from __future__ import annotations

import base64
import datetime
import html
import math

import numpy as np
import torch

from curvkit.errors import CurvkitError

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
"""


# -- figures ------------------------------------------------------------------------------
def make_figures(
    folder, model, loss_func, data, ops, dense, ref_op, eigs, densities, table, error_rows,
    directions, span, damping, bar,
):  # fmt: skip
    """Draw and save every figure; returns ``(figures, block_errors)``.

    ``figures`` maps a key to ``title``, ``caption``, ``png`` (base64) and
    ``files``, plus ``"_landscape"``: the loss table of the landscape figure.
    """
    from curvkit import plotting as P

    blocks = ref_op.block_slices()
    names = ref_op.block_names
    figures, block_errors = {}, {}
    todo = []

    def add(key, title, caption, draw):
        todo.append((key, title, caption, draw))

    shown = {n: dense[n] for n in ("GGN", "KFLR", "tri-diag KFLR") if n in dense}
    add(
        "matrices", "GGN, KFLR and tri-diagonal KFLR",
        "log<sub>10</sub>|entry| of the dense matrices on one colour scale; lines separate the "
        "layers (weight and bias of a layer form one block). KFLR keeps only the diagonal "
        "blocks (white: exact zeros); the tri-diagonal model fills the off-diagonal blocks.",
        lambda: P.heatmaps(shown, blocks),
    )  # fmt: skip
    inverses = {}
    G = dense["GGN"]
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    inverses["(GGN + λI)⁻¹"] = torch.cholesky_inverse(
        torch.linalg.cholesky((G + G.T) / 2 + damping * eye)
    )
    for name, label, kwargs in (
        ("KFLR", "KFLR inverse", {"damping_mode": "factored"}),
        ("tri-diag KFLR", "tri-diag KFLR inverse", {}),
    ):
        if name in ops:
            try:
                inverses[label] = ops[name].inverse(damping=damping, **kwargs).to_dense().to(G)
            except (NotImplementedError, CurvkitError):
                pass
    add(
        "inverses", f"Damped inverses (λ = {damping:.3g})",
        "(GGN + λI)<sup>−1</sup> against the inverses of the two Kronecker models, both damped "
        "as M&amp;G 2015 do (factored Tikhonov, §6.3, with the same λ). M&amp;G (Fig. 3) found "
        "the exact inverse close to block-tri-diagonal, which motivates the tri-diagonal model "
        "(its inverse is exactly block-tri-diagonal; KFLR's is block-diagonal).",
        lambda: P.heatmaps(inverses, blocks),
    )  # fmt: skip
    for name in ("KFLR", "tri-diag KFLR", "KFAC", "EKFAC", "EF", "Fisher (MC)"):
        if name in dense:
            block_errors[name] = P.block_norms(dense[name], blocks, G)
    add(
        "block_errors", "Per-block relative error against the GGN",
        "‖A<sub>ij</sub> − G<sub>ij</sub>‖<sub>F</sub> / ‖G<sub>ij</sub>‖<sub>F</sub> for every "
        "pair of layers (i, j): 1 on blocks an approximation sets to zero.",
        lambda: P.block_heatmap(block_errors, names, ncols=3),
    )  # fmt: skip
    exact_inv = inverses["(GGN + λI)⁻¹"]
    inv_errors = {k: P.block_norms(v, blocks, exact_inv) for k, v in inverses.items()
                  if k != "(GGN + λI)⁻¹"}  # fmt: skip
    if inv_errors:
        add(
            "block_errors_inverse", "Per-block relative error of the damped inverses",
            "Block errors against (GGN + λI)<sup>−1</sup>; the block-diagonal inverse sets the "
            "off-diagonal blocks to zero (error 1), the tri-diagonal one models the first "
            "off-diagonal blocks.",
            lambda: P.block_heatmap(inv_errors, names),
        )  # fmt: skip
    if densities:
        add(
            "densities", "Spectral densities (stochastic Lanczos quadrature)",
            "Gaussian-smoothed densities from 10 Rademacher probes; positive semi-definite "
            "matrices over log<sub>10</sub> λ (left; eigenvalues below 10<sup>−6</sup> λ<sub>max"
            "</sub> are placed at that cutoff), the indefinite Hessian over λ (right).",
            lambda: P.spectral_densities(densities, colors=COLORS),
        )  # fmt: skip
    add(
        "ranks", "Eigenvalues by rank",
        "All eigenvalues (dense eigh), largest first; a symmetric-log axis where some are "
        "negative or zero.",
        lambda: P.eigenvalue_ranks(eigs, colors=COLORS),
    )  # fmt: skip
    add(
        "overlap", "Top eigenspace overlap with the GGN",
        "‖V<sub>A</sub><sup>T</sup>V<sub>G</sub>‖<sub>F</sub><sup>2</sup>/k of the top-k "
        "eigenvectors (Gur-Ari et al. 2018): 1 when the top eigenspaces coincide.",
        lambda: P.metric_bars(table, "overlap", colors=COLORS),
    )  # fmt: skip
    top3 = ("eigvec_1", "eigvec_2", "eigvec_3", "gradient")
    add(
        "directional", "Directional curvature relative to the GGN",
        "v<sup>T</sup>Av / v<sup>T</sup>Gv along the GGN's top three eigenvectors and the "
        "gradient (all k in metrics.csv); 1 is exact, bars start at 1.",
        lambda: P.metric_bars(table, "directional", directions=top3, colors=COLORS),
    )  # fmt: skip
    add(
        "frobenius", "Relative Frobenius error, whole matrix and per layer",
        "‖A − G‖<sub>F</sub>/‖G‖<sub>F</sub> on the whole matrix (“all”) and on each "
        "layer's diagonal block.",
        lambda: P.metric_bars(table, "frobenius", block=None, colors=COLORS),
    )  # fmt: skip
    add(
        "preconditioning", "Preconditioning quality against the damping",
        "Left: cosine between (A + λI)<sup>−1</sup>g and (G + λI)<sup>−1</sup>g. Right: the "
        "fraction of the optimal decrease of the damped quadratic model "
        "q(δ) = g<sup>T</sup>δ + ½δ<sup>T</sup>(G + λI)δ (M&amp;G 2015, §6.4) the step achieves.",
        lambda: P.preconditioning_quality(table, colors=COLORS),
    )  # fmt: skip
    if error_rows:
        add(
            "estimators", "Trace estimators: relative error against the budget",
            "|estimate − tr G| / tr G, mean over 5 seeds (band: min–max), against the number "
            "of matrix-vector products.",
            lambda: P.estimator_error(error_rows),
        )  # fmt: skip
    alphas = np.linspace(-span, span, 41)
    add(
        "landscape", "Loss along top eigenvectors, the gradient and random directions",
        f"L(θ + αd) for unit directions d, |α| ≤ {span:.3g} (= 2/√λ<sub>max</sub>, where the "
        "quadratic model along the top eigenvector rises by 2): top Hessian eigenvectors, the "
        "normalised gradient and random Gaussian directions (grey, dashed).",
        lambda: P.loss_landscape(model, loss_func, data, directions, alphas),
    )  # fmt: skip
    for key, title, caption, draw in bar(todo, desc="figures"):
        fig = draw()
        if key == "landscape":
            figures["_landscape"] = fig.curvkit_data
        files = P.save(fig, folder / key, ("png",))
        png = files[0].read_bytes()
        figures[key] = {
            "title": title,
            "caption": caption,
            "png": base64.b64encode(png).decode("ascii"),
            # CSS pixels: 1.2 x the figure's physical size (96 px per inch) for screen reading
            "width": round(int.from_bytes(png[16:20], "big") * 1.2 * 96 / P.STYLE["savefig.dpi"]),
            "files": [f"{folder.name}/{f.name}" for f in files],
        }
    block_errors["inverse"] = inv_errors
    return figures, _lists(block_errors)


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return np.asarray(value).tolist()


# -- formatting ---------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
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


def _bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return ""


def _table(rows, columns, raw=()) -> str:
    """HTML table of ``rows`` (dicts); ``columns`` are ``(key, label)``; ``raw`` keys hold HTML."""
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
    links = " · ".join(f'<a href="{html.escape(p)}">{p.rsplit(".", 1)[1].upper()}</a>'
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
def _operators(results) -> str:
    rows = []
    for r in results["operators"]:
        ok = r["status"] == "ok"
        status = (
            '<span class="badge ok">ok</span>'
            if ok
            else '<span class="badge na">not available</span><span class="na-reason">'
            + html.escape(r["status"].removeprefix("not available: "))
            + "</span>"
        )
        rows.append({**r, "status_html": status})
    return _table(
        rows,
        [("name", "operator"), ("description", "what"), ("status_html", "status"),
         ("build_s", "build [s]"), ("dense_s", "dense [s]"), ("matvecs", "products"),
         ("notes", "notes")],
        raw=("status_html",),
    )  # fmt: skip


def _comparison(results) -> tuple[str, str]:
    rows = [r for r in results["comparison"] if r["block"] == "all"]
    grid = results["settings"]["damping_grid"]
    mid = grid[len(grid) // 2]
    summary = {}
    for r in rows:
        s = summary.setdefault(r["approx"], {"approx": r["approx"]})
        if r["metric"] in ("frobenius", "cosine", "spectral", "overlap"):
            s[r["metric"]] = r["value"]
        elif r["metric"] == "directional" and r["direction"] == "gradient":
            s["dir_grad"] = r["value"]
        elif r["metric"] == "directional" and r["direction"] == "eigvec_1":
            s["dir_top"] = r["value"]
        elif r["metric"] == "precond_reduction" and r["damping"] == mid:
            s["reduction"] = r["value"]
        elif r["metric"] == "precond_cosine" and r["damping"] == mid:
            s["pcos"] = r["value"]
    k = results["settings"]["k"]
    highlights = []
    for key, label, best in (
        ("frobenius", "smallest relative Frobenius error", min),
        ("overlap", f"largest top-{k} eigenspace overlap", max),
        ("reduction", f"largest model reduction at λ = {mid:.2g}", max),
    ):
        scored = [(s[key], s["approx"]) for s in summary.values() if s.get(key) is not None]
        if scored:
            value, name = best(scored)
            highlights.append(f"<li>{label}: <b>{html.escape(name)}</b> ({_fmt(value)})</li>")
    main = _table(
        list(summary.values()),
        [("approx", "approximation"), ("frobenius", "rel. Frobenius"), ("cosine", "cosine"),
         ("spectral", "rel. spectral"), ("overlap", f"overlap (k={k})"),
         ("dir_top", "v₁ᵀAv₁ / v₁ᵀGv₁"), ("dir_grad", "gᵀAg / gᵀGg"),
         ("pcos", f"step cosine (λ={mid:.2g})"), ("reduction", f"model reduction (λ={mid:.2g})")],
    )  # fmt: skip
    per_block = {}
    for r in results["comparison"]:
        if r["metric"] == "frobenius" and r["block"] != "all":
            per_block.setdefault(r["approx"], {"approx": r["approx"]})[r["block"]] = r["value"]
    blocks = [b["name"] for b in results["problem"]["blocks"]]
    layers = _table(
        list(per_block.values()),
        [("approx", "approximation")] + [(b, f"layer {b}") for b in blocks],
    )
    return f'<ul class="highlights">{"".join(highlights)}</ul>' + main, layers


def _spectra(results) -> tuple[str, str]:
    main = _table(
        results["spectra"],
        [("name", "matrix"), ("lambda_max", "λ<sub>max</sub>"), ("lambda_min", "λ<sub>min</sub>"),
         ("trace", "trace"), ("negative", "# λ &lt; 0"), ("effective_rank", "effective rank")],
    )  # fmt: skip
    lz = [r for r in results["lanczos"] if r.get("index") in (1, 2, 3)]
    lanczos = _table(
        lz,
        [("name", "matrix"), ("index", "i"), ("lanczos", "Lanczos λ<sub>i</sub>"),
         ("dense", "dense λ<sub>i</sub>"), ("abs_diff", "|difference|"),
         ("residual", "‖Av − λv‖"), ("matvecs", "products"), ("restarts", "restarts")],
    )  # fmt: skip
    return main, lanczos


def _memory(memory_wide) -> str:
    rows = []
    for layer, r in memory_wide.iterrows():
        rows.append({"layer": layer, **{k: _bytes(None if v is None else v) for k, v in r.items()}})
    labels = {
        "full": "full (layer's rows)", "block_diagonal": "block-diagonal",
        "kronecker": "Kronecker", "kronecker_cross": "cross factors", "diagonal": "diagonal",
    }  # fmt: skip
    return _table(rows, [("layer", "layer")] + [(c, labels.get(c, c)) for c in memory_wide.columns])


def render(results, figures, memory_wide) -> str:
    """The whole page as one HTML string (figures inlined as base64 PNG)."""
    p, s = results["problem"], results["settings"]
    esc = html.escape
    facts = [
        ("parameters D", _fmt(p["num_params"])), ("examples N", _fmt(p["n_samples"])),
        ("loss", _fmt(p["loss"])),
        ("‖gradient‖", _fmt(p["gradient_norm"])), ("training", f"{p['train_steps']} Adam steps"),
        ("device · dtype", f"{esc(s['device'])} · {esc(s['dtype'])}"), ("seed", str(s["seed"])),
        ("total time", f"{results['timings_s']['total']:.1f} s"),
    ]  # fmt: skip
    toc = [("operators", "Operators"), ("comparison", "Comparison"), ("structure", "Structure"),
           ("spectra", "Spectra"), ("preconditioning", "Preconditioning"),
           ("traces", "Traces"), ("landscape", "Landscape"), ("memory", "Memory"),
           ("reproduce", "Reproduce")]  # fmt: skip
    header = (
        f'<header><div class="wrap"><h1>Curvature report · {esc(p["name"])}</h1>'
        f"<p>{esc(p['description'])}; curvature on {p['n_samples']} training examples, "
        f"reference: the exact {esc(s['reference'])}.</p>"
        '<div class="facts">'
        + "".join(f'<div class="fact"><b>{k}</b><span>{v}</span></div>' for k, v in facts)
        + "</div><nav>"
        + "".join(f'<a href="#{a}">{t}</a>' for a, t in toc)
        + "</nav></div></header>"
    )
    comp_main, comp_layers = _comparison(results)
    spec_main, spec_lanczos = _spectra(results)
    trace_rows = results["traces"]
    timings = [{"phase": k, "seconds": v} for k, v in results["timings_s"].items()]
    versions = [{"package": k, "version": v} for k, v in results["versions"].items()]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [
        _section(
            "operators", "Operators",
            "Every matrix is formed densely (D products) in flat parameter order. An "
            "approximation the model does not support is listed with the reason.",
            _operators(results),
        ),
        _section(
            "comparison", f"Comparison with the {esc(s['reference'])}",
            "Whole-matrix metrics of <code>curvkit.compare</code> (exact, dense); all rows, per "
            "layer and per damping, are in <a href=\"metrics.csv\">metrics.csv</a>.",
            comp_main, _figure(figures, "overlap"), _figure(figures, "directional"),
            "<h3>Relative Frobenius error per layer block</h3>", comp_layers,
            _figure(figures, "frobenius"),
        ),
        _section(
            "structure", "Structure of the matrices and their inverses", None,
            _figure(figures, "matrices"), _figure(figures, "inverses"),
            _figure(figures, "block_errors"), _figure(figures, "block_errors_inverse"),
        ),
        _section(
            "spectra", "Spectra",
            "Dense eigenvalues of every matrix; restarted Lanczos checked against them.",
            spec_main, "<h3>Lanczos against dense eigenvalues (top 3)</h3>", spec_lanczos,
            _figure(figures, "densities"), _figure(figures, "ranks"),
        ),
        _section(
            "preconditioning", "Preconditioning",
            "Damping grid: " + ", ".join(f"{v:.3g}" for v in s["damping_grid"])
            + " (λ<sub>max</sub>(GGN) × 10<sup>−5…0</sup>).",
            _figure(figures, "preconditioning"),
        ),
        _section(
            "traces", "Traces",
            "Randomised estimates (99 products each) with standard errors against the exact "
            "trace; z = (estimate − exact) / standard error (– where the error is zero: "
            "Hutch++ is exact when the rank is below its sketch size).",
            _table(trace_rows, [("name", "matrix"), ("method", "method"),
                                ("estimate", "estimate"), ("stderr", "std. error"),
                                ("exact", "exact"), ("z", "z"), ("matvecs", "products"),
                                ("note", "note")]),
            _figure(figures, "estimators"),
        ),  # fmt: skip
        _section("landscape", "Loss landscape", None, _figure(figures, "landscape")),
        _section(
            "memory", "Memory",
            "Storage (float32) of each representation of a D × D curvature matrix, per layer.",
            _memory(memory_wide),
        ),
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
            '<a href="results.json">results.json</a> · figures/ (PNG).</p>',
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
