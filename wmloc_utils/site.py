"""Publishing the book: plotly.js once for the whole site, and checks of the built HTML site.

As a Sphinx extension (``sphinx: extra_extensions: [wmloc_utils.site]`` in ``_config.yml``) it writes
``plotly.min.js`` from the installed plotly package into the site's ``_static/`` and loads it in the
``<head>`` of every page, so chapter pages carry only their figures' data (``figures.setup_plotly``) and
the site works offline and from a file system, no CDN.

As a command, it checks a built site: page sizes against limits, internal links and anchors, absolute
paths of the build machine that must not be published, and (``--browser``) every page opened in headless
Chromium: no script errors, every plotly figure drawn, every image loaded, one screenshot per page::

    python -m wmloc_utils.site check _build/html [--browser] [--screenshots DIR] [--forbid PATH ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from sphinx.application import Sphinx
    from sphinx.config import Config

PLOTLY_JS = "plotly.min.js"
STATIC_DIR = "wmloc_static"  # under the build's doctree folder: outside the source tree, never committed
PAGE_LIMIT = 1_500_000  # bytes: a chapter page with its own assets
SITE_LIMIT = 25_000_000  # bytes: the whole site, sources and notebook downloads included
MB = 1e6


# --- the Sphinx extension ---------------------------------------------------------------------------


def write_plotly_js(folder: Path) -> Path:
    """Write the installed plotly package's ``plotly.min.js`` into ``folder`` (untouched when already the same)."""
    from plotly.offline import get_plotlyjs

    from .provenance import write_text_if_changed

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLOTLY_JS
    write_text_if_changed(path, get_plotlyjs())
    return path


def _add_plotly_js(app: Sphinx, config: Config) -> None:
    folder = Path(app.doctreedir) / STATIC_DIR
    write_plotly_js(folder)
    config.html_static_path = [*config.html_static_path, str(folder)]
    # Early and synchronous, before any require.js (with define.amd set, plotly.js would not set
    # window.Plotly) and before the figures' inline scripts in the page body.
    app.add_js_file(PLOTLY_JS, priority=100)


def _one_copy_of_each_script(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Drop repeated inline scripts: Sphinx 7 registers an inline script added after the builder started
    (sphinx-thebe's, sphinx-togglebutton's) twice, as filename None and '', and a page that declares
    ``const THEBE_JS_URL`` twice stops with a SyntaxError in the browser."""
    scripts, seen = context.get("script_files"), set()
    if scripts is None:
        return
    kept = []
    for js in scripts:
        key = (js.filename or "", js.priority, tuple(sorted(js.attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept


class PlotlyMime:
    """myst-nb renderer of the plotly mime type (entry point ``myst_nb.mime_renderers``): the figure as HTML
    that draws with the page's plotly.js, so notebooks store each figure's data once (no ``text/html`` copy)."""

    mime_priority_overrides = [
        (builder, "application/vnd.plotly.v1+json", 1) for builder in ("html", "dirhtml", "singlehtml", "readthedocs")
    ]

    @staticmethod
    def handle_mime(renderer, data, inline: bool) -> list | None:
        """One raw HTML node for a plotly figure; None for every other mime type (myst-nb goes on)."""
        if data.mime_type != "application/vnd.plotly.v1+json":
            return None
        import json

        from docutils import nodes

        from .figures import figure_html

        figure = json.loads(data.content) if isinstance(data.content, (str, bytes)) else data.content
        return [nodes.raw("", figure_html(figure), format="html")]


def _drop_source_maps(app: Sphinx, exception: Exception | None) -> None:
    """Delete the theme's ``*.map`` files (3.4 MB): browsers fetch them only for their developer tools."""
    if exception is None and app.builder.format == "html":
        for path in (Path(app.outdir) / "_static").rglob("*.map"):
            path.unlink()


def setup(app: Sphinx) -> dict:
    """Sphinx entry point: every page loads ``_static/plotly.min.js`` once, in its ``<head>``; no script twice."""
    app.connect("config-inited", _add_plotly_js)
    app.connect("html-page-context", _one_copy_of_each_script)
    app.connect("build-finished", _drop_source_maps)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


# --- reading built pages ----------------------------------------------------------------------------


class _Refs(HTMLParser):
    """The ids and the ``href``/``src`` references of one HTML page; ``loads``: those the page itself loads."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[str] = []
        self.loads: list[str] = []  # src of any element, href of <link>: not the links a reader may follow

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (name == "name" and tag == "a"):
                self.ids.add(value)
            elif name in ("href", "src"):
                self.refs.append(value)
                if name == "src" or tag == "link":
                    self.loads.append(value)


def _parse(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return parser


def html_pages(site: Path) -> list[Path]:
    """Every built HTML page of the site (not the copied sources in ``_sources``, nor the theme's templates in ``_static``)."""
    site = Path(site)
    return sorted(p for p in site.rglob("*.html") if not {"_sources", "_static"} & set(p.relative_to(site).parts))


def _is_external(ref: str) -> bool:
    parts = urlsplit(ref)
    return bool(parts.scheme) or ref.startswith("//")


def _local_target(page: Path, ref: str) -> tuple[Path, str]:
    """The file a relative reference points at (the page itself for ``#anchor``) and its fragment."""
    parts = urlsplit(ref)
    target = (page.parent / unquote(parts.path)).resolve() if parts.path else page.resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, unquote(parts.fragment)


# --- sizes ------------------------------------------------------------------------------------------


@dataclass
class PageSize:
    """One page: its HTML file, and the files that only this page references (its figures' images...)."""

    page: str
    html_bytes: int
    own_asset_bytes: int

    @property
    def total(self) -> int:
        return self.html_bytes + self.own_asset_bytes


@dataclass
class SizeReport:
    """Bytes per page and of the whole site, against the limits."""

    pages: list[PageSize]
    site_bytes: int
    page_limit: int = PAGE_LIMIT
    site_limit: int = SITE_LIMIT

    @property
    def too_big(self) -> list[PageSize]:
        return [p for p in self.pages if p.total > self.page_limit]

    @property
    def ok(self) -> bool:
        return not self.too_big and self.site_bytes <= self.site_limit

    def lines(self) -> list[str]:
        """A printable table, biggest page first."""
        out = [f"{'page':<44} {'html MB':>8} {'own assets MB':>14} {'total MB':>9}"]
        for p in sorted(self.pages, key=lambda p: -p.total):
            flag = "  OVER LIMIT" if p.total > self.page_limit else ""
            out.append(
                f"{p.page:<44} {p.html_bytes / MB:8.3f} {p.own_asset_bytes / MB:14.3f} {p.total / MB:9.3f}{flag}"
            )
        out.append(
            f"largest page {max((p.total for p in self.pages), default=0) / MB:.2f} MB (limit {self.page_limit / MB:.1f} MB); "
            f"whole site {self.site_bytes / MB:.2f} MB (limit {self.site_limit / MB:.1f} MB), "
            f"{len(self.pages)} pages"
        )
        return out


def site_bytes(site: Path) -> int:
    """Bytes of every file of the site (``_sources`` and the notebook downloads included)."""
    return sum(p.stat().st_size for p in Path(site).rglob("*") if p.is_file())


def size_report(site: Path, page_limit: int = PAGE_LIMIT, site_limit: int = SITE_LIMIT) -> SizeReport:
    """Bytes of each page (the HTML file plus the local files it loads that no other page loads) and of the site."""
    site = Path(site).resolve()
    pages = html_pages(site)
    used: dict[Path, set[Path]] = {}
    for page in pages:
        targets = {_local_target(page, r)[0] for r in _parse(page).loads if not _is_external(r)}
        used[page] = {t for t in targets if t.is_file() and t.suffix != ".html"}
    count = Counter(t for targets in used.values() for t in targets)
    sizes = [
        PageSize(
            page.relative_to(site).as_posix(),
            page.stat().st_size,
            sum(t.stat().st_size for t in used[page] if count[t] == 1),
        )
        for page in pages
    ]
    return SizeReport(sizes, site_bytes(site), page_limit, site_limit)


# --- links ------------------------------------------------------------------------------------------


@dataclass
class BrokenLink:
    """A relative reference of a page that leads nowhere: a missing file, or an anchor with no such id."""

    page: str
    ref: str
    why: str


def check_links(site: Path) -> list[BrokenLink]:
    """Every relative ``href``/``src`` of every page, anchors included; external links are not fetched."""
    site = Path(site).resolve()
    ids: dict[Path, set[str]] = {}
    broken = []
    for page in html_pages(site):
        for ref in _parse(page).refs:
            if _is_external(ref) or ref in ("", "#"):
                continue
            target, fragment = _local_target(page, ref)
            rel = page.relative_to(site).as_posix()
            if not target.is_file():
                broken.append(BrokenLink(rel, ref, "no such file"))
            elif fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = _parse(target).ids
                if fragment not in ids[target]:
                    broken.append(BrokenLink(rel, ref, f"no id {fragment!r} in {target.name}"))
    return broken


# --- absolute paths of the build machine --------------------------------------------------------------


@dataclass
class Leak:
    """A forbidden string (an absolute path of the build machine) found in a published file."""

    file: str
    string: str
    snippet: str


def published_text_files(site: Path) -> list[Path]:
    """The files a reader gets as text: every HTML page, every file under ``_sources``, every notebook."""
    site = Path(site)
    return sorted(
        p
        for p in site.rglob("*")
        if p.is_file() and (p.suffix in (".html", ".ipynb") or "_sources" in p.relative_to(site).parts)
    )


def find_strings(site: Path, forbidden: list[str], context: int = 60) -> list[Leak]:
    """Every occurrence (the first per file and string) of the ``forbidden`` strings, with its surroundings."""
    site = Path(site)
    leaks = []
    for path in published_text_files(site):
        text = path.read_text(encoding="utf-8", errors="replace")
        for string in (s for s in forbidden if s):
            at = text.find(string)
            if at >= 0:
                snippet = text[max(0, at - context) : at + len(string) + context].replace("\n", "\\n")
                leaks.append(Leak(path.relative_to(site).as_posix(), string, snippet))
    return leaks


def machine_paths(*extra: str | Path) -> list[str]:
    """Absolute paths of this machine that a published page must not show: every path the book's scrub
    replaces (:func:`wmloc_utils.book.machine_paths`: repository, atlas folder, Python prefix, home), ``extra``."""
    from . import book

    paths = [*book.machine_paths(book.REPO), *(str(e) for e in extra)]
    return list(dict.fromkeys(p for p in paths if p not in ("", "/")))


# --- the real browser -------------------------------------------------------------------------------

BROWSER_NAMES = ("chromium-headless-shell", "chromium")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = (
    "no Chromium found for the site's browser check (looked for "
    + ", ".join(BROWSER_NAMES)
    + " on PATH and in /usr/lib/chromium). Install Debian's, as root: "
    "apt-get install chromium-headless-shell (or: apt-get install chromium); `make browser` does it."
)


def find_browser() -> Path:
    """The headless Chromium executable from the system (never one that playwright downloads)."""
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    for name in BROWSER_NAMES:
        path = Path("/usr/lib/chromium") / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(INSTALL_HINT)


@dataclass
class PageCheck:
    """What one page did in the browser."""

    page: str
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, console errors, failed local files
    ignored: list[str] = field(default_factory=list)  # console errors caused by the aborted external requests
    figures: int = 0
    figures_drawn: int = 0
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    screenshot: str | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.figures_drawn == self.figures and not self.broken_images


@dataclass
class BrowserReport:
    """Every page of the site in headless Chromium, and the external requests that were refused."""

    pages: list[PageCheck]
    aborted: list[str]
    browser: str

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.pages)

    def lines(self) -> list[str]:
        """A printable summary: one line a page, then what went wrong."""
        out = [f"browser: {self.browser}"]
        for p in self.pages:
            out.append(
                f"{'ok  ' if p.ok else 'FAIL'} {p.page}: {p.figures_drawn}/{p.figures} figures drawn, "
                f"{p.images - len(p.broken_images)}/{p.images} images loaded, {len(p.errors)} errors"
            )
            out += [f"     error: {e}" for e in p.errors] + [f"     broken image: {i}" for i in p.broken_images]
            out += [f"     ignored (aborted external request): {e}" for e in p.ignored]
        out.append(f"external requests aborted: {len(self.aborted)}")
        out += [f"     {u}" for u in self.aborted]
        return out


_FIGURES_DRAWN = """() => Array.from(document.querySelectorAll('.plotly-graph-div')).every(gd => {
    const svg = gd.querySelector('svg.main-svg'); if (!svg) return false;
    const box = svg.getBoundingClientRect(); return svg.childElementCount > 0 && box.width > 0 && box.height > 0; })"""
_COUNT_FIGURES = """() => { const all = Array.from(document.querySelectorAll('.plotly-graph-div'));
    return [all.length, all.filter(gd => { const svg = gd.querySelector('svg.main-svg');
        return svg && svg.childElementCount > 0 && svg.getBoundingClientRect().width > 0; }).length]; }"""
_LOAD_IMAGES = """async () => { const imgs = Array.from(document.images);
    imgs.forEach(i => { i.loading = 'eager'; });
    await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
    return imgs.map(i => [i.getAttribute('src') || '', i.complete && i.naturalWidth > 0]); }"""


def check_in_browser(
    site: Path,
    screenshots: Path | None = None,
    pages: list[Path] | None = None,
    timeout_ms: int = 20_000,
    executable: Path | None = None,
) -> BrowserReport:
    """Open every page (or ``pages``) as file:// in headless Chromium; record what fails, screenshot each page.

    A page fails on an uncaught exception, a console error (except those of external requests, which are
    all aborted: the site must work offline), a local file that does not load, a ``.plotly-graph-div``
    without a drawn ``svg.main-svg`` within ``timeout_ms``, or an ``<img>`` that did not load.
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    site = Path(site).resolve()
    executable = Path(executable) if executable else find_browser()
    if screenshots is not None:
        screenshots = Path(screenshots)
        screenshots.mkdir(parents=True, exist_ok=True)
    aborted: list[str] = []
    results = []
    with tempfile.TemporaryDirectory(prefix="wmloc-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(executable),
            headless=True,
            args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 900},
        )

        def route(r) -> None:
            if r.request.url.startswith("file:"):
                r.continue_()
            else:
                aborted.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        for path in pages or html_pages(site):
            check = PageCheck(path.resolve().relative_to(site).as_posix())
            page = context.new_page()
            blocked_before = len(aborted)

            def on_console(msg, check=check) -> None:
                if msg.type != "error":
                    return
                where = (msg.location or {}).get("url", "")
                text = f"console: {msg.text} ({where})" if where else f"console: {msg.text}"
                if where in aborted or any(u in msg.text for u in aborted):
                    check.ignored.append(text)
                else:
                    check.errors.append(text)

            page.on("console", on_console)
            page.on("pageerror", lambda exc, check=check: check.errors.append(f"uncaught: {exc}"))
            page.on(
                "requestfailed",
                lambda req, check=check: (
                    check.errors.append(f"failed to load {req.url}: {req.failure}")
                    if req.url.startswith("file:")
                    else None
                ),
            )
            try:
                page.goto(path.resolve().as_uri(), wait_until="load", timeout=timeout_ms)
                try:
                    page.wait_for_function(_FIGURES_DRAWN, timeout=timeout_ms)
                except PlaywrightError:
                    pass  # counted below
                check.figures, check.figures_drawn = page.evaluate(_COUNT_FIGURES)
                images = page.evaluate(_LOAD_IMAGES)
                check.images = len(images)
                check.broken_images = [src for src, ok in images if not ok]
                if screenshots is not None:
                    shot = screenshots / (check.page.replace("/", "__").removesuffix(".html") + ".png")
                    page.screenshot(path=str(shot), full_page=True)
                    check.screenshot = str(shot)
            except PlaywrightError as exc:
                check.errors.append(f"browser: {exc}")
            page.close()
            # console errors of a page's own aborted requests may arrive after its load: sort them again
            late = set(aborted[blocked_before:])
            check.ignored += [e for e in check.errors if any(u in e for u in late)]
            check.errors = [e for e in check.errors if not any(u in e for u in late)]
            results.append(check)
        context.close()
    return BrowserReport(results, aborted, str(executable))


# --- command line -----------------------------------------------------------------------------------


def check(
    site: Path, browser: bool = False, screenshots: Path | None = None, forbidden: list[str] | None = None
) -> bool:
    """Every check of a built site, printed; True when all pass."""
    site = Path(site)
    sizes = size_report(site)
    print("\n".join(sizes.lines()))
    broken = check_links(site)
    print(f"internal links: {len(broken)} broken")
    for b in broken:
        print(f"     {b.page}: {b.ref} ({b.why})")
    leaks = find_strings(site, machine_paths() if forbidden is None else forbidden)
    print(f"absolute paths of this machine: {len(leaks)} found")
    for leak in leaks:
        print(f"     {leak.file}: {leak.string!r} in ...{leak.snippet}...")
    ok = sizes.ok and not broken and not leaks
    if browser:
        report = check_in_browser(site, screenshots)
        print("\n".join(report.lines()))
        ok = ok and report.ok
    print("site check:", "passed" if ok else "FAILED")
    return ok


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m wmloc_utils.site check SITE [--browser] [--screenshots DIR] [--forbid S ...]``."""
    parser = argparse.ArgumentParser(description="Check a built wmloc site (sizes, links, paths, browser).")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("check", help="check a built HTML site, e.g. _build/html")
    cmd.add_argument("site", type=Path)
    cmd.add_argument("--browser", action="store_true", help="open every page in headless Chromium")
    cmd.add_argument("--screenshots", type=Path, help="folder for one full-page screenshot per page")
    cmd.add_argument(
        "--forbid",
        nargs="*",
        help="strings no page may contain (default: the paths the book's scrub replaces: repository, atlas folder, Python prefix, home)",
    )
    args = parser.parse_args(argv)
    sys.exit(0 if check(args.site, args.browser or args.screenshots is not None, args.screenshots, args.forbid) else 1)


if __name__ == "__main__":
    main()
