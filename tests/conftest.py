"""Shared test set-up: where the third-party atlas files are (never committed), the book chain's work dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# The JHU Eve files are staged beside a development checkout (and in CI); a user's own
# WMLOC_DATA always wins. Without either, atlas tests fetch into the per-user cache.
if not os.environ.get("WMLOC_DATA") and (SHARED / "jhu-eve").is_dir():
    os.environ["WMLOC_DATA"] = str(SHARED / "jhu-eve")
# Likewise six of the paper authors' 170 subject region maps (Train/WMH_<id>.nii.gz), for the fetcher's tests.
if not os.environ.get("WMLOC_AUTHORS_LABELS") and (SHARED / "authors-labels").is_dir():
    os.environ["WMLOC_AUTHORS_LABELS"] = str(SHARED / "authors-labels")


@pytest.fixture(scope="session")
def eve_dir() -> Path:
    """Folder holding the JHU Eve atlas files (fetched and verified if needed)."""
    from wmloc_utils.fetch import data_dir, fetch_all

    fetch_all()
    return data_dir()


@pytest.fixture(scope="session")
def authors_dir() -> Path:
    """Folder of the authors' subject region maps (``WMLOC_AUTHORS_LABELS``); skipped without the staged samples."""
    from wmloc_utils.fetch import AUTHORS_LABELS, data_dir

    path = data_dir(collection=AUTHORS_LABELS)
    if not (path / "Train" / "WMH_0.nii.gz").exists():
        pytest.skip(f"the authors' region maps are not staged in {path} (set WMLOC_AUTHORS_LABELS to their folder)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The paper authors' refined atlas (``WMLOC_REFERENCE`` or ../shared/data/reference); skipped if absent."""
    path = Path(os.environ.get("WMLOC_REFERENCE", SHARED / "reference"))
    if not (path / "36_labels_merged.nii.gz").exists():
        pytest.skip(f"authors' refined atlas not found in {path} (set WMLOC_REFERENCE to its folder)")
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """The work directory of the tests' book chain (notebooks on ``book.PRESETS["tiny"]``), shared by the session."""
    return tmp_path_factory.mktemp("book-work")


@pytest.fixture(scope="session")
def executed(tmp_path_factory) -> Path:
    """Where the book runner writes the executed notebooks (as book/notebooks/ in ``make book``)."""
    return tmp_path_factory.mktemp("book-executed")


@pytest.fixture
def fake_download(monkeypatch) -> dict:
    """``pooch.retrieve`` replaced by a stand-in that writes a placeholder file; the dict records its url and hash."""
    import pooch

    seen = {}

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        seen.update(url=url, known_hash=known_hash)
        (path / fname).write_text("x")
        return str(path / fname)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    return seen


def train_tiny_lesion_network(table, out: Path) -> Path:
    """A lesion U-Net trained for one step on ``table``'s subjects (enough to predict with); its best.pt."""
    from wmloc_utils import training

    cfg = training.TrainConfig(
        patch_size=16,
        spacing=4.0,
        epochs=1,
        iters_per_epoch=1,
        batch_size=2,
        model_overrides={"channels": (4, 8, 16, 32)},
    )
    return training.train(cfg, training.make_records(table, "t1+flair", "lesion"), [], out, progress=False)["best"]
