"""The work directory's artefacts: each named once, in its notebook's folder, and a missing one names its notebook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wmloc_utils import artefacts, book

REPO = Path(__file__).resolve().parents[1]
STEMS = [nb.stem for nb in book.notebooks()]
FIELDS = {"subject": "001", "map": "bullseye", "number": 1}  # fills every placeholder of an artefact's path


def test_every_notebook_writes_artefacts_into_its_own_folder():
    assert list(artefacts.NOTEBOOKS) == STEMS
    relpaths = [a.relpath for a in artefacts.ARTEFACTS]
    assert len(set(relpaths)) == len(relpaths), "an artefact is named twice"
    for a in artefacts.ARTEFACTS:
        assert a.about and not a.path.startswith(("/", ".")), a
        assert artefacts.path("w", a, **FIELDS).parts[:2] == ("w", a.notebook)


def test_finished_files_are_artefacts_of_their_chapter():
    assert list(book.FINISHED) == STEMS
    for chapter, files in book.FINISHED.items():
        assert files and all(a in artefacts.ARTEFACTS and a.notebook == chapter for a in files), chapter


@pytest.mark.parametrize("artefact", artefacts.ARTEFACTS, ids=lambda a: a.relpath)
def test_a_missing_artefact_names_the_notebook_that_writes_it(artefact, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is missing: run notebook (\S+\.ipynb) first") as err:
        artefacts.require(tmp_path, artefact, **FIELDS)
    notebook = re.search(r"run notebook (\S+\.ipynb)", str(err.value)).group(1)
    assert (REPO / "notebooks" / notebook).exists()
    assert str(artefacts.path(tmp_path, artefact, **FIELDS)) in str(err.value) and artefact.about in str(err.value)


def test_require_returns_what_is_there_and_checks_a_file_given_instead(tmp_path):
    made = artefacts.folder(tmp_path, "04") / artefacts.LESION_MODEL.path
    made.write_text("x")
    assert artefacts.require(tmp_path, artefacts.LESION_MODEL) == made
    assert artefacts.require(tmp_path / "elsewhere", artefacts.LESION_MODEL, given=made) == made
    with pytest.raises(FileNotFoundError, match="other.pt is missing: check the path given for the lesion network"):
        artefacts.require(tmp_path, artefacts.LESION_MODEL, given=tmp_path / "other.pt")


def test_a_chapter_by_number_name_or_file_name():
    assert artefacts.notebook("07") == artefacts.notebook("07_localization.ipynb") == "07_localization"
    assert artefacts.notebook(artefacts.SPLIT) == "04_train_lesions"
    with pytest.raises(ValueError, match="no chapter '99'"):
        artefacts.notebook("99")


def _sources() -> dict[str, str]:
    """Every text that names work-directory folders.

    Notebooks (all cells), package, benchmarks, tests, README and the book's pages (``book/*.md``).
    """
    texts = {
        p.name: "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"]) for p in book.notebooks()
    }
    for pattern in ("wmloc_utils/*.py", "benchmarks/*.py", "tests/*.py", "README.md", "book/*.md"):
        texts.update({str(p.relative_to(REPO)): p.read_text() for p in REPO.glob(pattern)})
    return texts


def test_every_folder_or_notebook_named_anywhere_is_a_notebook():
    """``NN_name/`` and ``NN_name.ipynb`` in any text: a notebook's name (no folder named otherwise)."""
    for name, text in _sources().items():
        named = set(re.findall(r"\b(\d\d_[a-z_]+)(?:/|\.ipynb)", text))
        assert named <= set(STEMS), f"{name} names {sorted(named - set(STEMS))}, which are no notebook"


def test_notebooks_quote_no_work_directory_folder():
    """Notebooks' code cells quote no ``"NN_..."`` string: they ask wmloc_utils.artefacts (and runtime.start("NN"))."""
    for path in book.notebooks():
        code = "\n".join(
            "".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"
        )
        quoted = re.findall(r"""["']\d\d_\w*""", code)
        assert not quoted, f"{path.name}: use wmloc_utils.artefacts, not {quoted}"


def test_every_notebook_starts_with_the_same_set_up_call():
    """The first code cell after the parameters is ``workdir = runtime.start("NN", workdir, seed, ...)``."""
    for path in book.notebooks():
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        params = next(i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", []))
        setup = "".join(code[params + 1]["source"])
        assert setup.startswith(f'workdir = runtime.start("{path.stem[:2]}", workdir, seed'), (
            f"{path.name}: {setup[:80]}"
        )


def test_the_package_and_benchmarks_join_no_work_directory_path():
    """Only wmloc_utils/artefacts.py spells ``NN_name/...``: the package and benchmarks ask it."""
    for name, text in _sources().items():
        if name.startswith(("wmloc_utils/", "benchmarks/")) and name != "wmloc_utils/artefacts.py":
            joined = re.findall(r"""/ *["']\d\d_\w*|["']\d\d_\w+/""", text)
            assert not joined, f"{name}: use wmloc_utils.artefacts, not {joined}"
