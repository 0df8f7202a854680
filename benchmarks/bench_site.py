"""The built book's weight: bytes per page and of the whole site (``_build/html`` of ``make book``), vs the limits.

Another site folder can be given: ``python benchmarks/bench_site.py [SITE ...]`` (e.g. the tests' small
build, ``_build/test-site/_build/html``). Prints numbers only; ``python -m wmloc_utils.site check`` passes or fails.
"""

import json
import sys
from pathlib import Path

from wmloc_utils import site

REPO = Path(__file__).resolve().parents[1]

for folder in [Path(a) for a in sys.argv[1:]] or [REPO / "_build" / "html"]:
    print(f"=== {folder}")
    if not (folder / "index.html").exists():
        print("no built site here (run `make book` first)")
        continue
    report = site.size_report(folder)
    print("\n".join(report.lines()))
    sources = site.site_bytes(folder / "_sources") if (folder / "_sources").is_dir() else 0
    static = site.site_bytes(folder / "_static") if (folder / "_static").is_dir() else 0
    print(
        f"of which _sources (notebook downloads) {sources / site.MB:.2f} MB, _static {static / site.MB:.2f} MB; "
        f"within limits: {report.ok}"
    )
    # the notebook downloads, by output type (a figure is stored once, as the plotly mime type)
    by_type: dict[str, int] = {}
    for nb in sorted((folder / "_sources").rglob("*.ipynb")):
        for cell in json.loads(nb.read_text()).get("cells", []):
            for out in cell.get("outputs", []):
                for mime, value in out.get("data", {}).items():
                    by_type[mime] = by_type.get(mime, 0) + len(json.dumps(value))
    print(
        "notebook downloads, output bytes by type: "
        + ", ".join(f"{k} {v / site.MB:.2f} MB" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:5])
    )
