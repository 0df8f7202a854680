"""Run the book's notebooks in order with papermill, sharing one work directory.

Each notebook reads what the earlier ones wrote, so they must run in order. The executed
copies land in ``book/notebooks/`` (git-ignored), which ``jupyter-book build book/`` renders.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import time
from pathlib import Path

import papermill as pm

from .provenance import write_text_if_changed

REPO = Path(__file__).resolve().parents[1]


def notebooks(folder: Path = REPO / "notebooks") -> list[Path]:
    """The book's notebooks, in order (their names start with a two-digit number)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


# Parameter sets for ``run(per_notebook=...)``. "tiny": enough to execute every cell, small enough for CI
# on 2 cores (the tests' notebook chain and the small site they build from it).
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "01_data": {"n_subjects": 6},
        "02_atlas": {},
        "03_regions": {"score_truth": False, "eve_spacing": 3.0, "show_subjects": 1},
        "04_train_lesions": {"epochs": 1, "iters_per_epoch": 2, "patch_size": 48, "batch_size": 2},
        "05_train_regions": {"epochs": 1, "iters_per_epoch": 2, "patch_size": 48, "batch_size": 2},
        "06_evaluate": {"tta": False},
        "07_localization": {},
        "08_clustering": {"k_range": [2, 3], "n_boot": 5},
        "09_new_cohort": {"n_subjects": 2, "tta": False,
                          "demo_options": {"brain": "eve", "grid": "2mm", "skull": "mixed", "lesion_free_every": 2}},
    },
}

RECORD = "book_runs.json"  # in the work directory: what each notebook was run with, for reruns
TIMINGS = "book_timings.json"


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def package_sha256() -> str:
    """One hash of the package's code and data files: a notebook reruns when the code it calls changes."""
    root = Path(__file__).resolve().parent
    return _sha256_files(sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".tsv", ".json")))


def _manifest(folder: Path, skip=lambda rel: False) -> dict[str, list[int]]:
    """relative path -> [size, mtime_ns] of every file under ``folder`` (a file: itself)."""
    if folder.is_file():
        st = folder.stat()
        return {folder.name: [st.st_size, st.st_mtime_ns]}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not skip(rel):
            st = path.stat()
            out[rel] = [st.st_size, st.st_mtime_ns]
    return out


def _upstream(workdir: Path, number: int) -> dict[str, list[int]]:
    """The step folders of notebooks 01..``number`` as notebook ``number`` leaves them (data flows one way,
    01 to the end; other folders, such as a benchmark's, are not the book's)."""
    def not_a_step_up_to_here(rel: str) -> bool:
        top = rel.split("/", 1)[0]
        return "/" not in rel or not (top[:2].isdigit() and int(top[:2]) <= number)
    return _manifest(workdir, not_a_step_up_to_here)


def _cohort(workdir: Path) -> dict[str, dict]:
    """The images of the cohort that notebook 01 listed (wherever they are): every later step reads them."""
    table = workdir / "01_data" / "subjects.csv"
    if not table.exists():
        return {}
    rows = list(csv.DictReader(table.open()))
    paths = sorted({r[c] for r in rows for c in ("t1", "flair", "lesion", "truth_dir") if r.get(c)})
    return {p: _manifest(Path(p)) if Path(p).exists() else {} for p in paths}


def _state(nb: Path, params: dict, workdir: Path, out: Path, code: str) -> dict:
    """Everything an executed notebook depends on and made: source, code, parameters, files it read and wrote."""
    paths = {k: v for k, v in params.items() if k != "workdir" and isinstance(v, str) and os.path.exists(v)}
    atlas = os.environ.get("WMLOC_DATA", "")
    return {"notebook": _sha256_files([nb]), "package": code, "params": params,
            "path_params": {k: _manifest(Path(v)) for k, v in paths.items()},
            "atlas_data": _manifest(Path(atlas)) if atlas and Path(atlas).is_dir() else {},
            "executed": _manifest(out) if out.exists() else {}, "workdir": _upstream(workdir, int(nb.stem[:2])),
            "cohort": _cohort(workdir)}


def _why_rerun(old: dict | None, new: dict) -> str | None:
    """Why a notebook must run again (None: it ran with exactly this and its results are untouched)."""
    if not old:
        return "not run in this work directory yet"
    labels = {"notebook": "the notebook changed", "package": "wmloc_utils changed", "params": "other parameters",
              "path_params": "a file given as a parameter changed", "atlas_data": "the atlas files changed",
              "executed": "the executed copy is missing or changed", "workdir": "its inputs or results changed",
              "cohort": "the cohort's images changed"}
    changed = [text for key, text in labels.items() if old.get(key) != new.get(key)]
    return ", ".join(changed) if changed else None


def run(workdir: str | Path, out_dir: str | Path = REPO / "book" / "notebooks", only: list[str] | None = None,
        parameters: dict | None = None, per_notebook: dict[str, dict] | None = None,
        force: bool = False) -> dict[str, float]:
    """Execute the notebooks in order; return seconds per notebook run. Stops at the first failing cell.

    A notebook is skipped when it already ran here with the same source, package code, parameters and
    inputs and its results and executed copy are untouched (recorded in ``workdir/book_runs.json``), so
    rerunning a finished book writes no file; ``force`` runs every notebook again (each step still
    reuses its own unchanged results).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    record_path, timings_path = workdir / RECORD, workdir / TIMINGS
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    all_timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    code, timings = package_sha256(), {}
    os.environ["TQDM_DISABLE"] = "1"  # progress bars help at a terminal; in a published page they are noise
    for nb in notebooks():
        if only and not any(nb.stem.startswith(o) for o in only):
            continue
        declared = pm.inspect_notebook(str(nb))  # pass each notebook only the parameters it declares
        params = {"workdir": str(workdir), **(parameters or {}), **((per_notebook or {}).get(nb.stem, {}))}
        params = {k: v for k, v in params.items() if k in declared}
        out = out_dir / nb.name
        why = "force=True" if force else _why_rerun(record.get(nb.stem), _state(nb, params, workdir, out, code))
        if why is None:
            print(f"--- {nb.name}: unchanged since its last run here, skipped", flush=True)
            continue
        start = time.perf_counter()
        print(f"--- {nb.name} ({why}) {params}", flush=True)
        pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(out_dir),
                            kernel_name="python3", progress_bar=False, log_output=False)
        timings[nb.stem] = round(time.perf_counter() - start, 1)
        print(f"    done in {timings[nb.stem]} s", flush=True)
        record[nb.stem] = _state(nb, params, workdir, out, code)
        write_text_if_changed(record_path, json.dumps(record, indent=1))
    if timings:
        write_text_if_changed(timings_path, json.dumps({**all_timings, **timings}, indent=1))
    return timings


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m wmloc_utils.book --workdir WORK [--only 01 02] [-p name value ...]``."""
    parser = argparse.ArgumentParser(description="Execute the wmloc notebooks in order (papermill).")
    parser.add_argument("--workdir", default=str(REPO / "work"))
    parser.add_argument("--out", default=str(REPO / "book" / "notebooks"))
    parser.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    parser.add_argument("--force", action="store_true", help="run every notebook, even those unchanged since their last run")
    parser.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="a parameter for every notebook (value parsed as JSON when possible)")
    args = parser.parse_args(argv)

    def parse(v: str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    timings = run(args.workdir, args.out, args.only, {k: parse(v) for k, v in args.p}, force=args.force)
    print("seconds per notebook:", json.dumps(timings), f"total {sum(timings.values()):.0f} s")


if __name__ == "__main__":
    main()
