"""The published site: a small book built from the tiny notebook chain, checked as a reader gets it.

Light pages (plotly.js once for the site), internal links, no path of the build machine, and every page
opened in headless Chromium (figures drawn, images loaded, no script errors; screenshots kept in
``_build/test-site/screenshots``). The checkers themselves are tested on pages made to fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wmloc_utils import book, figures, site

REPO = Path(__file__).resolve().parents[1]
SITE_ROOT = REPO / "_build" / "test-site"  # git-ignored; the screenshots are the build's artefact


@pytest.fixture(scope="session")
def built_site(workdir: Path, executed: Path) -> Path:
    """The book of the tiny chain (a no-op when test_notebooks ran it), built as ``make book`` does: its HTML folder."""
    book.run(workdir, executed, per_notebook=book.PRESETS["tiny"])
    if SITE_ROOT.exists():
        shutil.rmtree(SITE_ROOT)
    SITE_ROOT.mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", SITE_ROOT / "_config.yml")
    shutil.copytree(REPO / "book", SITE_ROOT / "book", ignore=shutil.ignore_patterns("notebooks", "_build"))
    shutil.copytree(executed, SITE_ROOT / "book" / "notebooks", ignore=shutil.ignore_patterns(".*"))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    start = time.perf_counter()
    done = subprocess.run(
        [str(jupyter_book), "build", "-W", "-n", "--keep-going", str(SITE_ROOT / "book")],
        capture_output=True,
        text=True,
    )
    print(f"site built in {time.perf_counter() - start:.0f} s")
    assert done.returncode == 0, f"jupyter-book build failed:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    return SITE_ROOT / "_build" / "html"


# --- the built site ---------------------------------------------------------------------------------


def test_plotly_js_once_for_the_whole_site(built_site):
    copies = [p for p in built_site.rglob("*.js") if p.read_bytes()[:20000].find(b"plotly.js v") >= 0]
    assert [p.relative_to(built_site).as_posix() for p in copies] == ["_static/plotly.min.js"]
    assert not list(built_site.rglob("*.map")), "source maps are for developer tools, not for readers"
    chapters = sorted((built_site / "notebooks").glob("*.html"))
    assert len(chapters) == len(book.notebooks())
    for page in [built_site / "intro.html", *chapters]:  # index.html only redirects to intro.html
        head = page.read_text().split("</head>", 1)[0]
        scripts = [s.split("?")[0] for s in re.findall(r'<script[^>]*src="([^"]+)"', head)]  # no ?v=hash
        plotly = [i for i, s in enumerate(scripts) if s.endswith("_static/plotly.min.js")]
        assert len(plotly) == 1, f"{page.name}: plotly.min.js loaded {len(plotly)} times in <head>"
        assert not any("require" in s for s in scripts[: plotly[0]]), f"{page.name}: require.js before plotly.js"


def test_site_pages_within_size_limits(built_site):
    report = site.size_report(built_site)
    print("\n".join(report.lines()))
    assert (built_site / "_sources" / "notebooks").is_dir(), "the notebook downloads must be kept"
    assert not report.too_big, [f"{p.page}: {p.total / 1e6:.2f} MB" for p in report.too_big]
    assert report.site_bytes <= report.site_limit


def test_site_internal_links_resolve(built_site):
    assert site.check_links(built_site) == []


def test_no_path_of_the_build_machine_in_any_page(built_site, tmp_path_factory):
    forbidden = site.machine_paths(tmp_path_factory.getbasetemp())
    leaks = site.find_strings(built_site, forbidden)
    assert not leaks, "\n".join(f"{leak.file}: {leak.string!r} in ...{leak.snippet}..." for leak in leaks)


def test_every_page_works_in_a_real_browser(built_site):
    start = time.perf_counter()
    report = site.check_in_browser(built_site, SITE_ROOT / "screenshots")
    print(f"browser check of {len(report.pages)} pages in {time.perf_counter() - start:.0f} s")
    print("\n".join(report.lines()))
    assert report.ok, "\n".join(report.lines())
    assert len(report.pages) == len(site.html_pages(built_site))
    assert sum(p.figures for p in report.pages) > 0, "no plotly figure on any page: the check checked nothing"
    assert all(Path(p.screenshot).stat().st_size > 0 for p in report.pages)


# --- the figure output ------------------------------------------------------------------------------


def test_figures_carry_no_plotly_js_and_no_cdn():
    import plotly.graph_objects as go
    import plotly.io as pio

    figures.setup_plotly()
    fig = go.Figure(go.Scatter(y=[1, 2, 3]))
    bundle = pio._renderers.renderers._build_mime_bundle(fig.to_dict())
    assert set(bundle) == {"application/vnd.plotly.v1+json"}  # the figure's data once in the notebook
    html = figures.figure_html(bundle["application/vnd.plotly.v1+json"])  # what the book's build makes of it
    node = site.PlotlyMime.handle_mime(None, _mime(bundle), inline=False)[0]
    assert node["format"] == "html" and "Plotly.newPlot" in node.astext() and len(node.astext()) < 20_000
    assert "Plotly.newPlot" in html and 'class="plotly-graph-div"' in html
    assert "<script src" not in html and "cdn" not in html.lower() and "MathJax" not in html
    assert len(html) < 20_000  # the figure and its template, no 4.8 MB library


def _mime(bundle: dict):
    from myst_nb.core.render import MimeData

    return MimeData("application/vnd.plotly.v1+json", bundle["application/vnd.plotly.v1+json"])


def test_slice_viewer_sends_8_bit_slices_with_a_transparent_background():
    import nibabel as nib
    import numpy as np

    data = np.random.default_rng(0).normal(100, 10, (20, 20, 10)).astype(np.float32)
    lesion = np.zeros(data.shape, np.uint8)
    lesion[5:8, 5:8, 4:6] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fig = figures.slice_viewer(nib.Nifti1Image(data, affine), nib.Nifti1Image(lesion, affine), n_slices=4)
    assert all(np.asarray(t.z).dtype == np.uint8 for t in fig.data)
    assert fig.data[1].colorscale[0][1] == "rgba(0,0,0,0)" and fig.data[1].zmin == 0
    prob = nib.Nifti1Image(lesion * np.float32(0.7), affine)  # continuous values: scaled to 0..255 of their maximum
    overlays = figures.slice_viewer(nib.Nifti1Image(data, affine), prob).data[1::2]
    assert max(np.asarray(t.z).max() for t in overlays) == 255


# --- the checkers, on pages made to fail -----------------------------------------------------------


def _page(path: Path, body: str, head: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'>{head}</head><body>{body}</body></html>")
    return path


def test_link_checker_finds_missing_files_and_anchors(tmp_path):
    _page(
        tmp_path / "a.html",
        '<h1 id="top">a</h1><a href="#top">ok</a><a href="b.html#there">ok</a>'
        '<a href="sub/">ok</a><a href="https://example.org/x">external, not fetched</a>'
        '<a href="b.html#nowhere">bad anchor</a><a href="#gone">bad self anchor</a><img src="_images/none.png">',
    )
    _page(tmp_path / "b.html", '<p id="there">b</p>')
    _page(tmp_path / "sub" / "index.html", '<a href="../a.html">up</a>')
    broken = {(b.page, b.ref) for b in site.check_links(tmp_path)}
    assert broken == {("a.html", "b.html#nowhere"), ("a.html", "#gone"), ("a.html", "_images/none.png")}


def test_size_report_flags_pages_over_the_limit(tmp_path):
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "big.png").write_bytes(b"x" * 3000)
    (tmp_path / "_images" / "shared.png").write_bytes(b"x" * 5000)
    _page(tmp_path / "a.html", '<img src="_images/big.png"><img src="_images/shared.png">')
    _page(tmp_path / "b.html", '<img src="_images/shared.png">')
    report = site.size_report(tmp_path, page_limit=2000, site_limit=10_000)
    sizes = {p.page: p for p in report.pages}
    assert sizes["a.html"].own_asset_bytes == 3000 and sizes["b.html"].own_asset_bytes == 0
    assert [p.page for p in report.too_big] == ["a.html"] and report.ok is False
    assert report.site_bytes == 8000 + sizes["a.html"].html_bytes + sizes["b.html"].html_bytes


def test_find_strings_reports_files_and_snippets(tmp_path):
    _page(tmp_path / "a.html", "<p>clean</p>")
    (tmp_path / "_sources" / "notebooks").mkdir(parents=True)
    (tmp_path / "_sources" / "notebooks" / "n.ipynb").write_text('{"source": "workdir = \\"/build/machine/work\\""}')
    leaks = site.find_strings(tmp_path, ["/build/machine", "/home/nobody"])
    assert [(leak.file, leak.string) for leak in leaks] == [("_sources/notebooks/n.ipynb", "/build/machine")]
    assert "workdir = " in leaks[0].snippet


def test_browser_check_fails_on_broken_figures_images_and_scripts(tmp_path):
    js = site.write_plotly_js(tmp_path / "_static")
    figure = {"text/html": figures.figure_html({"data": [{"type": "scatter", "y": [1, 3, 2]}], "layout": {}})}
    good = _page(
        tmp_path / "good.html",
        figure["text/html"],
        head=f'<script src="_static/{js.name}"></script><script src="https://cdn.example.org/lib.js"></script>',
    )
    no_plotly = _page(tmp_path / "no_plotly.html", figure["text/html"])
    broken = _page(tmp_path / "broken.html", '<img src="missing.png"><script>undefinedFunction()</script>')
    report = site.check_in_browser(tmp_path, tmp_path / "shots", pages=[good, no_plotly, broken], timeout_ms=3000)
    checks = {p.page: p for p in report.pages}
    assert checks["good.html"].ok, checks["good.html"]
    assert (checks["good.html"].figures, checks["good.html"].figures_drawn) == (1, 1)
    assert report.aborted == ["https://cdn.example.org/lib.js"]  # refused and listed, not an error of the page
    assert not checks["no_plotly.html"].ok and checks["no_plotly.html"].figures_drawn == 0
    assert any("Plotly is not defined" in e for e in checks["no_plotly.html"].errors)
    assert checks["broken.html"].broken_images == ["missing.png"]
    assert any("undefinedFunction" in e for e in checks["broken.html"].errors)
    assert not report.ok and len(list((tmp_path / "shots").glob("*.png"))) == 3


def test_no_browser_says_how_to_install_one(monkeypatch):
    monkeypatch.setattr(site, "BROWSER_NAMES", ("no-such-chromium",))
    with pytest.raises(FileNotFoundError, match="apt-get install chromium-headless-shell"):
        site.find_browser()
