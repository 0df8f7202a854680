"""The book runner's helpers: what a chapter opened alone must run first, and pages without machine paths."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from wmloc_utils import artefacts, book


def _finish(work: Path, *chapters: str) -> None:
    for chapter in chapters:
        for artefact in book.FINISHED[chapter]:
            artefacts.path(work, artefact).parent.mkdir(parents=True, exist_ok=True)
            artefacts.path(work, artefact).write_text("x")


def test_missing_chapters_follow_the_needs(tmp_path):
    assert book.missing_chapters(tmp_path, "01") == []
    assert book.missing_chapters(tmp_path, "03_regions") == ["01_data", "02_atlas"]
    _finish(tmp_path, "01_data", "02_atlas", "03_regions")
    assert book.missing_chapters(tmp_path, "07_localization.ipynb") == [
        "04_train_lesions",
        "05_train_regions",
        "06_evaluate",
    ]
    # notebook 06 given checkpoints needs neither training chapter
    assert book.missing_chapters(tmp_path, "07", provided=["04", "05"]) == ["06_evaluate"]
    assert book.missing_chapters(tmp_path, "06", provided=["04_train_lesions", "05"]) == []
    # a chapter counts as run only when all its files are there
    artefacts.folder(tmp_path, artefacts.SPLIT)
    artefacts.path(tmp_path, artefacts.SPLIT).write_text("x")
    assert "04_train_lesions" in book.missing_chapters(tmp_path, "05")
    with pytest.raises(ValueError, match="no chapter"):
        book.missing_chapters(tmp_path, "99")


def test_every_chapter_has_needs_files_and_presets():
    stems = [nb.stem for nb in book.notebooks()]
    assert sorted(book.NEEDS) == sorted(book.FINISHED) == stems
    for preset in book.PRESETS.values():
        assert set(preset) <= set(stems)
    for chapter, needs in book.NEEDS.items():
        assert all(n < chapter for n in needs), f"{chapter} needs a later chapter: data flows one way"


def test_prepare_does_nothing_when_the_results_are_there(tmp_path, capsys):
    _finish(tmp_path, *book.NEEDS)
    assert book.prepare(tmp_path, "08") == {}
    assert "are in the work directory" in capsys.readouterr().out


def test_scrub_paths_removes_machine_paths(tmp_path, monkeypatch):
    work = tmp_path / "my-work"
    monkeypatch.setenv("WMLOC_DATA", str(tmp_path / "atlas"))
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {
        "input_path": f"{book.REPO}/notebooks/01_data.ipynb",
        "output_path": f"{tmp_path}/out/01_data.ipynb",
        "parameters": {"workdir": str(work)},
    }
    nb.cells = [nbformat.v4.new_code_cell(f'# Parameters\nworkdir = "{work}"\n')]
    nb.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=f"{work}/01_data/subjects.csv {tmp_path}/atlas/x\n"),
        nbformat.v4.new_output(
            "execute_result",
            data={"text/plain": f"PosixPath('{work}')", "text/html": f"<td>{book.REPO}/notebooks</td>"},
        ),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert book.scrub_paths(path, work) == 2  # the cell and the metadata
    text = path.read_text()
    assert str(tmp_path) not in text and str(book.REPO) not in text
    meta = nbformat.read(path, as_version=4).metadata["papermill"]
    assert meta == {
        "input_path": "notebooks/01_data.ipynb",
        "output_path": "01_data.ipynb",
        "parameters": {"workdir": "my-work"},
    }
    cell = nbformat.read(path, as_version=4).cells[0]
    assert 'workdir = "my-work"' in cell.source
    assert cell.outputs[0]["text"] == "my-work/01_data/subjects.csv $WMLOC_DATA/x\n"
    assert cell.outputs[1]["data"]["text/html"] == "<td><repo>/notebooks</td>"
    assert book.scrub_paths(path, work) == 0  # nothing left to change: the file is not rewritten


def test_chapter_times_table():
    text = book.chapter_times({"01_data": 60.0, "03_regions": 90.0})
    assert "| 01 | data | 1.0 |" in text and "| 03 | regions | 1.5 |" in text and "**2.5**" in text


def test_start_is_a_notebooks_set_up(tmp_path, capsys):
    """runtime.start: the work directory, the chapters it needs (here all there), the seed and the printed parameters."""
    from wmloc_utils import runtime

    _finish(tmp_path, *book.NEEDS)
    assert runtime.start("08", tmp_path, 3, k=2) == tmp_path.resolve()
    out = capsys.readouterr().out
    assert "08_clustering: the results it needs from earlier chapters are in the work directory" in out
    assert f"  workdir = '{tmp_path.resolve()}'\n  seed = 3\n  k = 2" in out
    assert runtime.start("01", tmp_path / "new", 0) == (tmp_path / "new").resolve()  # 01 needs nothing: no word of it
    assert "results it needs" not in capsys.readouterr().out


def test_defaults_are_the_parameters_cell_of_a_chapter():
    """One source for notebook settings used elsewhere (the benchmarks train with notebooks 04/05's)."""
    import json

    from wmloc_utils import book

    lesions = book.defaults("04")
    cell = next(
        c for c in json.loads(book.notebooks()[3].read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])
    )
    assert lesions["workdir"] is None and set(lesions) == {
        line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line.split("#")[0]
    }
    assert book.defaults("05_train_regions")["augment"] == "tissue"
    with pytest.raises(ValueError):
        book.defaults("99")
