"""The book's notebooks: static checks (no outputs, one parameters cell, the skeleton) and a papermill run.

All notebooks run in order on tiny parameters in one shared work directory, as the book does; a
notebook whose predecessor failed fails too (it cannot run without the predecessor's outputs).
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from wmloc_utils.book import notebooks

NOTEBOOKS = notebooks()
HEADINGS = ["## Overview", "## Prerequisites", "## Imports", "## Parameters", "## Summary", "## What's next",
            "## Resources and references"]

# Tiny parameters: enough to execute every cell, small enough for CI on 2 cores.
TINY: dict[str, dict] = {
    "01_data": {"n_subjects": 6},
    "02_atlas": {},
    "03_regions": {"score_truth": False, "eve_spacing": 3.0, "show_subjects": 1},
    "04_train_lesions": {"epochs": 1, "iters_per_epoch": 2, "patch_size": 48, "batch_size": 2},
    "05_train_regions": {"epochs": 1, "iters_per_epoch": 2, "patch_size": 48, "batch_size": 2},
    "06_evaluate": {"tta": False},
    "07_localization": {},
    "08_clustering": {"k_range": [2, 3], "n_boot": 5},
    "09_new_cohort": {"n_subjects": 2, "grid": "2mm", "skull": True, "tta": False, "score_regions": False},
}

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
    assert markdown.lstrip().startswith(f"# {path.stem[:2]}."), f"{path.name}: first cell must be the '# NN. Title' heading"
    positions = [markdown.find(h) for h in HEADINGS]
    missing = [h for h, pos in zip(HEADINGS, positions) if pos < 0]
    assert not missing, f"{path.name}: missing skeleton headings {missing}"
    assert positions == sorted(positions), f"{path.name}: skeleton headings out of order"
    long = [len(c.source.splitlines()) for c in code
            if len(c.source.splitlines()) > 15 and "parameters" not in c.metadata.get("tags", [])]
    assert not long, f"{path.name}: code cells longer than 15 lines belong in wmloc_utils ({long})"
    assert "sys.path" not in "\n".join(c.source for c in code)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("book-work")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes(path, workdir, tmp_path):
    if _failed:
        pytest.fail(f"{path.name} cannot run: earlier notebook(s) {_failed} failed")
    params = {"workdir": str(workdir), **TINY.get(path.stem, {})}
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(tmp_path / path.name), parameters=params, cwd=str(tmp_path),
                            kernel_name="python3", progress_bar=False)
    except Exception:
        _failed.append(path.stem)
        raise
    print(f"{path.name}: {time.perf_counter() - start:.1f} s with {params}")
