"""Render the report in headless Chromium: screenshot, images, console, layout.

Needs the ``chromium`` executable (Debian package ``chromium``); skipped without it.
A script appended to a copy of the page reports, on ``load``, how many images
decoded and whether the page overflows the window; every console message of the
page is read from Chromium's log on stderr.
"""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from curvkit.app import report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER = next((b for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="headless Chromium not installed (apt-get install chromium)"
)
WIDTH, HEIGHT = 1200, 3000
MARKER = "CURVKIT_CHECK "
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var de = document.documentElement;
  console.log("MARKER" + JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
    scrollWidth: de.scrollWidth, innerWidth: window.innerWidth,
    sections: document.querySelectorAll("section").length}));
});
</script>""".replace("MARKER", MARKER)


def _render(page, tmp_path, name):
    """Screenshot a copy of ``page`` with the probe; returns (probe result, console, png path)."""
    probed = page.parent / f"{name}.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / f"{name}.png"
    cmd = [
        BROWSER, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
        "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000", f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={shot}", probed.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = re.findall(r':CONSOLE[^\]]*\] "(.*)", source:', proc.stderr)
    probes = [json.loads(m[len(MARKER) :]) for m in console if m.startswith(MARKER)]
    others = [m for m in console if not m.startswith(MARKER)]
    others += [line for line in proc.stderr.splitlines() if "Uncaught" in line]
    assert len(probes) == 1, proc.stderr[-2000:]
    return probes[0], others, shot


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report.build_report(
        "tiny_mlp", out, n_samples=32, train_steps=5, progress=False
    )  # fmt: skip


@pytest.fixture(scope="module")
def matrix_free_page(tmp_path_factory):
    """tiny_mlp (D = 43) above max_dense = 20: the matrix-free page."""
    out = tmp_path_factory.mktemp("matrix_free")
    return report.build_report(
        "tiny_mlp", out, n_samples=32, train_steps=0, progress=False, max_dense=20
    )  # fmt: skip


def _figure_files(page):
    results = json.loads((page.parent / "results.json").read_text())
    return results, results["figures"]


def test_page_renders_with_all_images_and_no_console_errors(page, tmp_path):
    from PIL import Image

    results, figures = _figure_files(page)
    assert results["failures"] == [] and "tracking" in figures
    probe, console, shot = _render(page, tmp_path, "probed")
    assert console == []
    assert probe["images"] == len(figures) == 15 and probe["broken"] == 0
    assert probe["sections"] == 10
    assert probe["scrollWidth"] <= probe["innerWidth"]  # nothing wider than the window
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    pixels = np.asarray(image.resize((300, 750)), dtype=float)
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, tables and figures


def test_figures_decode_and_pdfs_are_linked(page):
    """Every PNG decodes to a non-blank image; every PDF beside it is a PDF and linked."""
    from PIL import Image

    _, figures = _figure_files(page)
    html = page.read_text()
    for key, files in figures.items():
        png, pdf = (page.parent / f for f in files)
        with Image.open(png) as image:
            image.load()
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 5, key
        assert pdf.read_bytes()[:5] == b"%PDF-", key
        assert f'href="{files[1]}"' in html, key


def test_matrix_free_page_renders(matrix_free_page, tmp_path):
    results, figures = _figure_files(matrix_free_page)
    assert results["settings"]["mode"] == "matrix-free" and results["failures"] == []
    assert {"densities", "ranks", "overlap", "directional", "frobenius", "landscape"} <= set(
        figures
    )
    assert not {"matrices", "inverses", "preconditioning", "estimators"} & set(figures)
    probe, console, _ = _render(matrix_free_page, tmp_path, "matrix_free")
    assert console == []
    assert probe["images"] == len(figures) and probe["broken"] == 0
    assert probe["sections"] == 9
    assert probe["scrollWidth"] <= probe["innerWidth"]


def test_probe_detects_a_broken_image(page, tmp_path):
    """The check above can fail: a corrupt embedded image is reported as broken."""
    broken = page.parent / "broken_source.html"
    text = page.read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 40 :])
    probe, _, _ = _render(broken, tmp_path, "broken")
    assert probe["images"] == len(_figure_files(page)[1]) == 15 and probe["broken"] == 1
