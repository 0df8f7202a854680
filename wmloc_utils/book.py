"""Run the book's notebooks in order with papermill, sharing one work directory.

Each notebook reads what the earlier ones wrote, so they must run in order. The executed
copies land in ``book/notebooks/`` (git-ignored), which ``jupyter-book build book/`` renders.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import papermill as pm

REPO = Path(__file__).resolve().parents[1]


def notebooks(folder: Path = REPO / "notebooks") -> list[Path]:
    """The book's notebooks, in order (their names start with a two-digit number)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def run(workdir: str | Path, out_dir: str | Path = REPO / "book" / "notebooks", only: list[str] | None = None,
        parameters: dict | None = None, per_notebook: dict[str, dict] | None = None) -> dict[str, float]:
    """Execute the notebooks in order; return seconds per notebook. Stops at the first failing cell."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    os.environ["TQDM_DISABLE"] = "1"  # progress bars help at a terminal; in a published page they are noise
    for nb in notebooks():
        if only and not any(nb.stem.startswith(o) for o in only):
            continue
        declared = pm.inspect_notebook(str(nb))  # pass each notebook only the parameters it declares
        params = {"workdir": str(workdir), **(parameters or {}), **((per_notebook or {}).get(nb.stem, {}))}
        params = {k: v for k, v in params.items() if k in declared}
        start = time.perf_counter()
        print(f"--- {nb.name} {params}", flush=True)
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, cwd=str(out_dir),
                            kernel_name="python3", progress_bar=False, log_output=False)
        timings[nb.stem] = round(time.perf_counter() - start, 1)
        print(f"    done in {timings[nb.stem]} s", flush=True)
    (workdir / "book_timings.json").write_text(json.dumps(timings, indent=1))
    return timings


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m wmloc_utils.book --workdir WORK [--only 01 02] [-p name value ...]``."""
    parser = argparse.ArgumentParser(description="Execute the wmloc notebooks in order (papermill).")
    parser.add_argument("--workdir", default=str(REPO / "work"))
    parser.add_argument("--out", default=str(REPO / "book" / "notebooks"))
    parser.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    parser.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="a parameter for every notebook (value parsed as JSON when possible)")
    args = parser.parse_args(argv)

    def parse(v: str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    timings = run(args.workdir, args.out, args.only, {k: parse(v) for k, v in args.p})
    print("seconds per notebook:", json.dumps(timings), f"total {sum(timings.values()):.0f} s")


if __name__ == "__main__":
    main()
