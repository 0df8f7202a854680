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
import sys
import time
from pathlib import Path

import nbformat
import papermill as pm

from . import artefacts
from .provenance import write_text_if_changed

REPO = Path(__file__).resolve().parents[1]

# Parameter presets per notebook. "tiny": enough to execute every cell (the test suite, on 2 cores);
# "quick": small but meaningful, what a chapter opened alone runs for its missing predecessors.
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "01_data": {"n_subjects": 6},
        "02_atlas": {},
        "03_regions": {"score_truth": False, "eve_spacing": 3.0, "show_subjects": 1},
        "04_train_lesions": {"epochs": 1, "iters_per_epoch": 2, "patch_size": 48, "batch_size": 2},
        "05_train_regions": {"epochs": 1, "iters_per_epoch": 2, "patch_size": 48, "batch_size": 2},
        # a lesion network trained for 2 steps marks noise, which the hyperintensity filter rightly drops: it
        # is off here, or notebook 08 would have no lesion to cluster (the filter has its own tests)
        "06_evaluate": {"tta": False, "min_gm_contrast": 0.0},
        "07_localization": {},
        "08_clustering": {"k_range": [2, 3], "n_boot": 5},
        "09_new_cohort": {
            "n_subjects": 2,
            "tta": False,
            "min_gm_contrast": 0.0,
            "demo_options": {"brain": "eve", "grid": "2mm", "skull": "mixed", "lesion_free_every": 2},
        },
    },
    "quick": {
        "01_data": {"n_subjects": 12},
        "02_atlas": {},
        "03_regions": {"score_truth": False, "eve_spacing": 3.0, "show_subjects": 1},
        "04_train_lesions": {"epochs": 6, "iters_per_epoch": 20},
        "05_train_regions": {"epochs": 3, "iters_per_epoch": 40},
        "06_evaluate": {"tta": False},
        "07_localization": {},
        "08_clustering": {"k_range": [2, 3, 4], "n_boot": 20},
        "09_new_cohort": {"n_subjects": 3, "tta": False},
    },
}
PRESET_ENV = "WMLOC_PREPARE_PRESET"  # the preset that prepare() runs (default "quick")

# What each chapter needs from earlier ones, and the files that say it has run in a work directory.
NEEDS: dict[str, tuple[str, ...]] = {
    "01_data": (),
    "02_atlas": (),
    "03_regions": ("01_data", "02_atlas"),
    "04_train_lesions": ("03_regions",),
    "05_train_regions": ("03_regions", "04_train_lesions"),
    "06_evaluate": ("01_data", "03_regions", "04_train_lesions", "05_train_regions"),
    "07_localization": ("02_atlas", "06_evaluate"),
    "08_clustering": ("01_data", "02_atlas", "07_localization"),
    "09_new_cohort": ("04_train_lesions", "05_train_regions"),  # apply.run makes its own atlas folder
    "10_results": ("03_regions", "06_evaluate", "07_localization", "08_clustering"),
}
FINISHED: dict[str, tuple[artefacts.Artefact, ...]] = {
    files[0].notebook: files
    for files in (
        (artefacts.SUBJECTS, artefacts.PARTICIPANTS),
        (artefacts.REFINED_ATLAS, artefacts.REFINED_LUT),
        (artefacts.REGIONS,),
        (artefacts.SPLIT, artefacts.LESION_MODEL),
        (artefacts.REGION_MODEL,),
        (artefacts.PREDICTIONS,),
        (artefacts.REGIONAL_LOADS_WIDE,),
        (artefacts.CLUSTERS,),
        (artefacts.NEW_COHORT_LOADS,),
        (artefacts.RESULT_CLUSTERS,),
    )
}


def notebooks(folder: Path = REPO / "notebooks") -> list[Path]:
    """The book's notebooks, in order (their names start with a two-digit number)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def defaults(chapter: str) -> dict:
    """The default parameters of a chapter: its ``parameters`` cell, name -> value.

    One source for settings used elsewhere too (the benchmarks train networks with notebooks 04/05's).
    """
    import ast

    name = artefacts.notebook(chapter)
    nb = nbformat.read(next(p for p in notebooks() if p.stem == name), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }


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
    table = artefacts.path(workdir, artefacts.SUBJECTS)
    if not table.exists():
        return {}
    rows = list(csv.DictReader(table.open()))
    paths = sorted({r[c] for r in rows for c in ("t1", "flair", "lesion", "truth_dir") if r.get(c)})
    return {p: _manifest(Path(p)) if Path(p).exists() else {} for p in paths}


def _state(nb: Path, params: dict, workdir: Path, out: Path, code: str) -> dict:
    """Everything an executed notebook depends on and made: source, code, parameters, files it read and wrote."""
    paths = {k: v for k, v in params.items() if k != "workdir" and isinstance(v, str) and os.path.exists(v)}
    atlas = os.environ.get("WMLOC_DATA", "")
    return {
        "notebook": _sha256_files([nb]),
        "package": code,
        "params": params,
        "path_params": {k: _manifest(Path(v)) for k, v in paths.items()},
        "atlas_data": _manifest(Path(atlas)) if atlas and Path(atlas).is_dir() else {},
        "executed": _manifest(out) if out.exists() else {},
        "workdir": _upstream(workdir, int(nb.stem[:2])),
        "cohort": _cohort(workdir),
    }


def missing_chapters(workdir: str | Path, chapter: str, provided: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The earlier chapters whose results ``chapter`` needs and ``workdir`` lacks, in running order.

    ``provided``: chapters whose results come from elsewhere (e.g. notebook 06 given checkpoints needs
    neither 04 nor 05).
    """
    workdir, provided = Path(workdir), {artefacts.notebook(c) for c in provided}
    needed: set[str] = set()

    def visit(name: str) -> None:
        for dep in NEEDS[name]:
            if dep in provided or dep in needed:
                continue
            if not all(artefacts.path(workdir, a).exists() for a in FINISHED[dep]):
                needed.add(dep)
                visit(dep)

    visit(artefacts.notebook(chapter))
    return sorted(needed)


def prepare(
    workdir: str | Path, chapter: str, provided: tuple[str, ...] | list[str] = (), preset: str | None = None
) -> dict[str, float]:
    """Let a chapter start alone: run the earlier chapters it needs that have not run in ``workdir``.

    They run with the ``preset`` parameters (default ``$WMLOC_PREPARE_PRESET`` or "quick": small, a few
    minutes), their executed copies in ``workdir/prepared/``; says what it runs and how long it should take.
    Nothing runs when the work directory already holds their results (as after ``make book``).
    """
    workdir, chapter = Path(workdir), artefacts.notebook(chapter)
    missing = missing_chapters(workdir, chapter, provided)
    if not missing:
        print(f"{chapter}: the results it needs from earlier chapters are in the work directory")
        return {}
    preset = preset or os.environ.get(PRESET_ENV, "quick")
    params = PRESETS[preset]
    seconds = json.loads((REPO / "wmloc_utils" / "data" / "preset_seconds.json").read_text()).get(preset, {})
    estimate = sum(seconds.get(m, 60) for m in missing) / 60
    print(
        f"{chapter} needs the results of {', '.join(missing)}, which have not run in this work directory.\n"
        f"Running them now with the {preset!r} parameters (about {estimate:.0f} min on 2 CPU cores); "
        f"for the book's own results run every chapter with its defaults (make book):"
    )
    for name in missing:
        print(f"  {name}: {params.get(name, {})}")
    sys.stdout.flush()
    return run(workdir, workdir / artefacts.PREPARED, only=missing, per_notebook=params, announce=False)


def _why_rerun(old: dict | None, new: dict) -> str | None:
    """Why a notebook must run again (None: it ran with exactly this and its results are untouched)."""
    if not old:
        return "not run in this work directory yet"
    labels = {
        "notebook": "the notebook changed",
        "package": "wmloc_utils changed",
        "params": "other parameters",
        "path_params": "a file given as a parameter changed",
        "atlas_data": "the atlas files changed",
        "executed": "the executed copy is missing or changed",
        "workdir": "its inputs or results changed",
        "cohort": "the cohort's images changed",
    }
    changed = [text for key, text in labels.items() if old.get(key) != new.get(key)]
    return ", ".join(changed) if changed else None


def run(
    workdir: str | Path,
    out_dir: str | Path = REPO / "book" / "notebooks",
    only: list[str] | None = None,
    parameters: dict | None = None,
    per_notebook: dict[str, dict] | None = None,
    force: bool = False,
    announce: bool = True,
) -> dict[str, float]:
    """Execute the notebooks in order; return seconds per notebook run. Stops at the first failing cell.

    A notebook is skipped when it already ran here with the same source, package code, parameters and
    inputs and its results and executed copy are untouched (recorded in ``workdir/book_runs.json``), so
    rerunning a finished book writes no file; ``force`` runs every notebook again (each step still
    reuses its own unchanged results). The executed copies show no path of this machine
    (:func:`scrub_paths`); ``chapter_times.md`` beside them tabulates each chapter's last run time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    record_path, timings_path = workdir / artefacts.BOOK_RUNS, workdir / artefacts.BOOK_TIMINGS
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    all_timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    code, timings = package_sha256(), {}
    os.environ["TQDM_DISABLE"] = "1"  # progress bars help at a terminal; in a published page they are noise
    for nb in notebooks():
        if only is not None and not any(nb.stem.startswith(o) for o in only):
            continue
        declared = pm.inspect_notebook(str(nb))  # pass each notebook only the parameters it declares
        params = {"workdir": str(workdir), **(parameters or {}), **((per_notebook or {}).get(nb.stem, {}))}
        params = {k: v for k, v in params.items() if k in declared}
        out = out_dir / nb.name
        why = "force=True" if force else _why_rerun(record.get(nb.stem), _state(nb, params, workdir, out, code))
        if why is None:
            if announce:
                print(f"--- {nb.name}: unchanged since its last run here, skipped", flush=True)
            continue
        start = time.perf_counter()
        print(f"--- {nb.name} ({why}) {scrub_text(str(params), workdir)}", flush=True)
        pm.execute_notebook(
            str(nb),
            str(out),
            parameters=params,
            cwd=str(out_dir),
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
        )
        scrub_paths(out, workdir)
        timings[nb.stem] = round(time.perf_counter() - start, 1)
        print(f"    done in {timings[nb.stem]} s", flush=True)
        record[nb.stem] = _state(nb, params, workdir, out, code)
        write_text_if_changed(record_path, json.dumps(record, indent=1))
    if timings:
        all_timings = {**all_timings, **timings}
        write_text_if_changed(timings_path, json.dumps(all_timings, indent=1))
    if announce:
        write_text_if_changed(out_dir / "chapter_times.md", chapter_times(all_timings))
    return timings


def machine_paths(workdir: str | Path) -> dict[str, str]:
    """This machine's paths that a published page must not show -> what it shows instead (longest first)."""
    from .fetch import data_dir

    home = Path.home()
    shown = {
        str(Path(workdir).resolve()): Path(workdir).name,
        str(data_dir()): "$WMLOC_DATA",
        str(Path(data_dir()).resolve()): "$WMLOC_DATA",
        sys.prefix: "<python>",
        str(REPO): "<repo>",
        str(home): "~",
    }
    return dict(sorted(((k, v) for k, v in shown.items() if len(k) > 1), key=lambda kv: -len(kv[0])))


def scrub_text(text: str, workdir: str | Path) -> str:
    """``text`` with this machine's paths replaced (the work directory by its name, the atlas folder by
    $WMLOC_DATA, the repository by <repo>, the home folder by ~)."""
    for path, shown in machine_paths(workdir).items():
        text = text.replace(path, shown)
    return text


def scrub_paths(notebook: str | Path, workdir: str | Path) -> int:
    """Rewrite an executed notebook so that no source or output shows a path of the build machine.

    Papermill writes ``workdir = "/abs/path"`` into the injected-parameters cell and outputs may print
    absolute paths, and its metadata names the input and output files; a published page shows them relative
    to the work directory. Returns the number of cells changed (the metadata counts as one).
    """
    nb = nbformat.read(notebook, as_version=4)
    before = json.dumps(nb.metadata, sort_keys=True)
    paper = nb.metadata.get("papermill", {})
    if paper.get("input_path"):  # where papermill read and wrote it: the source's place in the repository
        paper["input_path"] = f"notebooks/{Path(paper['input_path']).name}"
    if paper.get("output_path"):
        paper["output_path"] = Path(paper["output_path"]).name
    nb.metadata = json.loads(scrub_text(json.dumps(nb.metadata), workdir))
    changed = int(json.dumps(nb.metadata, sort_keys=True) != before)
    for cell in nb.cells:
        before = json.dumps(cell, sort_keys=True)
        cell.source = scrub_text(cell.source, workdir)
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = scrub_text(output["text"], workdir)
            for mime, value in output.get("data", {}).items():
                if isinstance(value, str) and not mime.startswith("image/"):
                    output["data"][mime] = scrub_text(value, workdir)
            if "traceback" in output:
                output["traceback"] = [scrub_text(t, workdir) for t in output["traceback"]]
        changed += json.dumps(cell, sort_keys=True) != before
    if changed:
        nbformat.write(nb, notebook)
    return changed


def chapter_times(seconds: dict[str, float]) -> str:
    """A Markdown table of each chapter's run time in the last book run (for the course page)."""
    import platform

    rows = [
        f"| {nb.stem[:2]} | {nb.stem[3:].replace('_', ' ')} | {seconds[nb.stem] / 60:.1f} |"
        for nb in notebooks()
        if nb.stem in seconds
    ]
    total = sum(seconds.get(nb.stem, 0) for nb in notebooks()) / 60
    return "\n".join(
        [
            f"Measured in the last book run on this build machine ({os.cpu_count()} CPU cores, {platform.machine()}, "
            "no GPU unless the device line of a chapter says so):",
            "",
            "| chapter | title | minutes |",
            "| --- | --- | --- |",
            *rows,
            f"| | **all chapters** | **{total:.1f}** |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m wmloc_utils.book --workdir WORK [--only 01 02] [-p name value ...]``."""
    parser = argparse.ArgumentParser(description="Execute the wmloc notebooks in order (papermill).")
    parser.add_argument("--workdir", default=str(REPO / "work"))
    parser.add_argument("--out", default=str(REPO / "book" / "notebooks"))
    parser.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    parser.add_argument(
        "--force", action="store_true", help="run every notebook, even those unchanged since their last run"
    )
    parser.add_argument(
        "-p",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        default=[],
        help="a parameter for every notebook (value parsed as JSON when possible)",
    )
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
