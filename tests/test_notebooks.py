"""The book's notebooks: static checks (no outputs, one parameters cell, the skeleton) and a papermill run.

All notebooks run in order on tiny parameters in one shared work directory, as the book does; a
notebook whose predecessor failed fails too (it cannot run without the predecessor's outputs).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from wmloc_utils import artefacts, book
from wmloc_utils.book import notebooks

NOTEBOOKS = notebooks()
HEADINGS = [
    "## Overview",
    "## Prerequisites",
    "## Imports",
    "## Parameters",
    "## Exercises",
    "## Summary",
    "## What's next",
    "## Resources and references",
]

TINY = book.PRESETS["tiny"]  # enough to execute every cell, small enough for CI on 2 cores

_failed: list[str] = []


def test_there_are_notebooks_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names and names[0].startswith("01_")
    numbers = [int(n[:2]) for n in names]
    assert numbers == list(range(1, len(numbers) + 1)), f"notebooks must be numbered 01..NN without gaps: {names}"


def test_toc_lists_every_notebook_in_order():
    import yaml

    toc = yaml.safe_load((Path(__file__).parents[1] / "book" / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"] if c["file"].startswith("notebooks/")]
    assert files == [f"notebooks/{p.stem}" for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_static(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    with_outputs = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not with_outputs, f"{path.name}: code cells {with_outputs} carry outputs; clear them before committing"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: needs exactly one cell tagged 'parameters', found {len(params)}"
    assert "workdir = None" in params[0].source and "seed =" in params[0].source
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert markdown.lstrip().startswith(f"# {path.stem[:2]}."), (
        f"{path.name}: first cell must be the '# NN. Title' heading"
    )
    positions = [markdown.find(h) for h in HEADINGS]
    missing = [h for h, pos in zip(HEADINGS, positions) if pos < 0]
    assert not missing, f"{path.name}: missing skeleton headings {missing}"
    assert positions == sorted(positions), f"{path.name}: skeleton headings out of order"
    long = [
        len(c.source.splitlines())
        for c in code
        if len(c.source.splitlines()) > 15 and "parameters" not in c.metadata.get("tags", [])
    ]
    assert not long, f"{path.name}: code cells longer than 15 lines belong in wmloc_utils ({long})"
    assert "sys.path" not in "\n".join(c.source for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes(path, workdir, executed):
    if _failed:
        pytest.fail(f"{path.name} cannot run: earlier notebook(s) {_failed} failed")
    start = time.perf_counter()
    try:
        ran = book.run(workdir, executed, only=[path.stem], per_notebook=TINY)
    except Exception:
        _failed.append(path.stem)
        raise
    assert list(ran) == [path.stem]
    print(f"{path.name}: {time.perf_counter() - start:.1f} s with {TINY.get(path.stem, {})}")


def _files(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()}


def test_rerun_of_a_finished_book_writes_nothing(workdir, executed, capsys):
    """The whole book again on an unchanged work directory: every notebook skipped, not one file written."""
    if _failed:
        pytest.fail(f"the book chain failed at {_failed}")
    before = _files(workdir, executed)
    assert book.run(workdir, executed, per_notebook=TINY) == {}
    assert _files(workdir, executed) == before
    assert capsys.readouterr().out.count("unchanged since its last run here, skipped") == len(NOTEBOOKS)
    # a changed parameter reruns that notebook (and says why); its unchanged steps still write nothing new.
    # (The last chapter, 10, so that nothing downstream goes stale: the site's book run then reruns nothing.)
    other = {"10_results": {"seed": 1}}
    ran = book.run(workdir, executed, only=["10"], per_notebook=other)
    assert list(ran) == ["10_results"] and "--- 10_results.ipynb (other parameters)" in capsys.readouterr().out
    # a folder that is not the book's (a benchmark's) changes nothing; a touched image of the cohort reruns
    (workdir / "bench_notes").mkdir()
    (workdir / "bench_notes" / "x.txt").write_text("x")
    assert book.run(workdir, executed, only=["10"], per_notebook=other) == {}
    import pandas as pd

    flair = Path(pd.read_csv(workdir / "01_data" / "subjects.csv")["flair"].iloc[0])
    os.utime(flair, ns=(flair.stat().st_atime_ns, flair.stat().st_mtime_ns + 10**9))
    ran = book.run(workdir, executed, only=["10"], per_notebook=other)
    assert list(ran) == ["10_results"] and "the cohort's images changed)" in capsys.readouterr().out
    # the finished tiny book back as it was
    os.utime(flair, ns=(flair.stat().st_atime_ns, flair.stat().st_mtime_ns - 10**9))
    assert list(book.run(workdir, executed, only=["10"], per_notebook=TINY)) == ["10_results"]
    assert book.run(workdir, executed, per_notebook=TINY) == {}


# The bring-your-own-cohort path: a new cohort without masks, the networks trained by the chain above.
APPLY_CHAIN = ["01_data", "02_atlas", "03_regions", "06_evaluate", "07_localization", "08_clustering"]


def test_apply_chain_without_masks(workdir, tmp_path):
    """Notebooks 01 -> 03 -> 06 -> 07 -> 08 on a cohort without reference masks, with checkpoints from elsewhere."""
    if _failed:
        pytest.fail(f"the apply chain needs the checkpoints of the book chain, which failed at {_failed}")
    from wmloc_utils import demo

    data = tmp_path / "new_cohort"
    demo.generate(data, n_subjects=3, seed=7, progress=False)
    demo.withhold_masks(data, tmp_path / "withheld")
    assert not list(data.glob("*/*/wmh.nii.gz"))
    new_work = tmp_path / "work"
    params = {
        "01_data": {"data_dir": str(data), "n_subjects": None},
        "03_regions": {"score_truth": False, "eve_spacing": 3.0, "show_subjects": 1},
        "06_evaluate": {
            "tta": False,
            "min_gm_contrast": 0.0,  # the tiny network's lesions are noise (book.PRESETS["tiny"])
            "lesion_checkpoint": str(artefacts.path(workdir, artefacts.LESION_MODEL)),
            "region_checkpoint": str(artefacts.path(workdir, artefacts.REGION_MODEL)),
        },
        "08_clustering": {"k_range": [2], "n_boot": 3},
    }
    for stem in APPLY_CHAIN:
        path = next(p for p in NOTEBOOKS if p.stem == stem)
        out = tmp_path / path.name
        pm.execute_notebook(
            str(path),
            str(out),
            parameters={"workdir": str(new_work), **params.get(stem, {})},
            cwd=str(tmp_path),
            kernel_name="python3",
            progress_bar=False,
        )
        if stem == "06_evaluate":
            text = out.read_text()
            assert "the lesion evaluation is skipped" in text and "lesion evaluation: skipped" in text
    import pandas as pd

    loads = pd.read_csv(new_work / "07_localization" / "regional_loads.csv", dtype={"subject": str})
    assert set(loads["pairing"]) >= {"automatic"} and "reference" not in set(loads["pairing"])
    assert sorted(loads["subject"].unique()) == sorted(
        pd.read_csv(new_work / "01_data" / "subjects.csv", dtype={"subject": str})["subject"]
    )
    qc = pd.read_csv(new_work / "07_localization" / "lesion_qc.csv")
    assert (qc["unassigned_fraction"] <= 0.01).all(), qc
    assert (new_work / "08_clustering" / "clusters.csv").exists()


def test_a_chapter_opened_alone_prepares_what_it_needs(workdir, tmp_path, monkeypatch):
    """Chapter 07 in a work directory that holds only 01..03 (the chain's): its set-up call runs 04..06
    (tiny preset), says so, then 07 runs."""
    if _failed:
        pytest.fail(f"the book chain failed at {_failed}")
    work = tmp_path / "work"
    assert book.missing_chapters(work, "07") == [
        "01_data",
        "02_atlas",
        "03_regions",
        "04_train_lesions",
        "05_train_regions",
        "06_evaluate",
    ]
    for step in ("01_data", "02_atlas", "03_regions"):
        shutil.copytree(workdir / step, work / step)
    assert book.missing_chapters(work, "07") == ["04_train_lesions", "05_train_regions", "06_evaluate"]
    monkeypatch.setenv(book.PRESET_ENV, "tiny")
    out = tmp_path / "07_localization.ipynb"
    pm.execute_notebook(
        str(next(p for p in NOTEBOOKS if p.stem == "07_localization")),
        str(out),
        parameters={"workdir": str(work)},
        cwd=str(tmp_path),
        kernel_name="python3",
        progress_bar=False,
    )
    text = out.read_text()
    assert "07_localization needs the results of 04_train_lesions, 05_train_regions, 06_evaluate" in text
    assert (work / "07_localization" / "regional_loads_wide.csv").exists()
    assert book.missing_chapters(work, "08") == [] and sorted(p.name for p in (work / "prepared").glob("*.ipynb")) == [
        "04_train_lesions.ipynb",
        "05_train_regions.ipynb",
        "06_evaluate.ipynb",
    ]


def test_compared_networks_see_what_the_main_network_sees(workdir, tmp_path):
    """Notebook 06's compare_checkpoints: notebook 04's own checkpoint, compared, gives notebook 06's lesion masks
    (the same bias-corrected images, brain masks and lesion filters), not a prediction on the raw images."""
    if _failed:
        pytest.fail(f"the book chain failed at {_failed}")
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from wmloc_utils import inference

    work = tmp_path / "work"  # a copy: the book's own work directory stays as its run left it
    for step in ("01_data", "03_regions", "06_evaluate"):
        shutil.copytree(workdir / step, work / step)
    preds = pd.read_csv(work / "06_evaluate" / "predictions.csv", dtype={"subject": str})
    test = preds.loc[preds["split"] == "test", "subject"].tolist()[:1]
    assert test, "the tiny book has no test subject to compare on"
    ckpt = artefacts.path(workdir, artefacts.LESION_MODEL)
    settings = TINY["06_evaluate"]  # the settings notebook 06 ran with
    compared = inference.compare_step(work, [ckpt], test, progress=False, **settings)[str(ckpt)]
    assert compared["subject"].tolist() == test
    assert "compare/model1" in compared["lesion_pred"].iloc[0]
    mine = np.asanyarray(nib.load(compared["lesion_pred"].iloc[0]).dataobj)
    theirs = np.asanyarray(nib.load(preds.set_index("subject").loc[test[0], "lesion_pred"]).dataobj)
    assert np.array_equal(mine, theirs)
