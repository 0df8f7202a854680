"""The paper authors' subject region maps: fetch them by challenge subject id, attach them to a cohort, score ours.

The authors of the method published, for the 170 subjects of the MICCAI 2017 WMH challenge, the
region map their atlas registration produced: labels 0..36 (the refined atlas's ids) on the
subject's own FLAIR grid, ``WMH_refined_labels/{Train,Test}/WMH_<id>.nii.gz`` in the repository
``juliamachnio/WMHLocalization``. wmloc does not ship them: they are fetched like the Eve atlas
(:mod:`wmloc_utils.fetch`, collection :data:`~wmloc_utils.fetch.AUTHORS_LABELS`, registry
``wmloc_utils/data/authors_labels.tsv`` with their SHA-256), into ``$WMLOC_AUTHORS_LABELS``, else
the ``authors-labels/`` subfolder of the data directory, kept as ``Train/WMH_<id>.nii.gz``.

They serve two purposes: an independent check of our registered labels on real subjects
(:func:`score`, :func:`compare`), and an alternative set of region targets for notebook 03
(:func:`wmloc_utils.registration.attach_authors_regions`).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import pandas as pd

from .errors import InputError
from .fetch import AUTHORS_LABELS, DataError, RegistryEntry, fetch
from .fetch import registry as _registry
from .images import check_same_grid
from .metrics import score_regions

SPLITS = ("Train", "Test")
COLUMN = "authors_regions"


def registry() -> dict[str, RegistryEntry]:
    """The 170 registered maps: ``Train/WMH_<id>.nii.gz`` / ``Test/WMH_<id>.nii.gz`` -> SHA-256 and URL."""
    return _registry(AUTHORS_LABELS)


def file_name(challenge_id: str | int, split: str) -> str:
    """Registry name of one subject's map, e.g. ``Train/WMH_0.nii.gz``."""
    return f"{split}/WMH_{challenge_id}.nii.gz"


def challenge_id(subject: str | int, site: str = "") -> str:
    """The challenge id of a subject id: the numeric folder name (``"21"``), or ``<site>_<id>`` as named by
    ``discover(..., site_prefix=True)`` when ``site`` is given; anything else (``"sub-01"``, or ``"001"``:
    challenge ids have no leading zeros, the demo cohort's do) is an :class:`InputError`."""
    text = str(subject).strip()
    if site and text.startswith(f"{site}_"):
        text = text[len(site) + 1 :]
    if text.isdigit() and text == str(int(text)):
        return text
    prefixed = f" or {site}_<number>" if site else ""
    raise InputError(
        f"subject {subject!r}: not a WMH challenge subject id (the challenge names subjects by a "
        f"number{prefixed}); the authors' region maps exist only for the challenge's 170 subjects"
    )


class NotPublishedError(DataError):
    """The authors published no region map for this subject (not a challenge id, or not among their 170)."""


def _splits(split: str | None) -> tuple[str, ...]:
    """The splits to look in: ``split``, or both when None."""
    if split is not None and split not in SPLITS:
        raise InputError(f"split={split!r}: expected one of {SPLITS} or None (try both)")
    return SPLITS if split is None else (split,)


def fetch_map(
    subject: str | int,
    split: str | None = None,
    path: str | os.PathLike | None = None,
    download: bool = True,
    site: str = "",
) -> Path:
    """Local, verified path of the authors' map of challenge subject ``subject`` (fetched if missing).

    ``split`` ("Train" or "Test") says where to look; None tries both (challenge ids are unique across
    them). ``site`` strips a ``<site>_`` prefix (:func:`challenge_id`). ``path`` overrides the folder
    (see :func:`wmloc_utils.fetch.data_dir`). A subject the authors did not publish is a
    :class:`NotPublishedError` naming the id and the files looked for.
    """
    splits = _splits(split)
    try:
        cid = challenge_id(subject, site)
    except InputError as err:
        raise NotPublishedError(str(err)) from err
    names = [file_name(cid, s) for s in splits]
    entries = registry()
    name = next((n for n in names if n in entries), None)
    if name is None:
        raise NotPublishedError(
            f"subject {subject!r}: the authors published no region map for challenge id {cid} "
            f"(looked for {' and '.join(names)} among the {len(entries)} files of "
            f"wmloc_utils/data/{AUTHORS_LABELS.registry})"
        )
    return fetch(name, path, download=download, collection=AUTHORS_LABELS)


def attach(
    subjects: pd.DataFrame,
    path: str | os.PathLike | None = None,
    split: str | None = None,
    download: bool = True,
    missing: str = "error",
) -> pd.DataFrame:
    """A copy of a subjects table (``subject`` and, when present, ``site``) with an ``authors_regions`` column.

    Each subject gets the path of its authors' map (:func:`fetch_map`, matched by challenge id, a
    ``<site>_`` prefix stripped). ``missing="error"`` refuses a subject without one (not a challenge id,
    or one the authors did not publish); ``missing="empty"`` leaves its cell empty. A file that is
    corrupt or cannot be fetched is always an error.
    """
    if missing not in ("error", "empty"):
        raise InputError(f"missing={missing!r}: expected 'error' or 'empty'")
    _splits(split)
    out = subjects.copy()
    sites = out["site"].fillna("").astype(str) if "site" in out else [""] * len(out)
    paths = []
    for subject, site in zip(out["subject"], sites):
        try:
            paths.append(str(fetch_map(subject, split, path, download, site)))
        except NotPublishedError:
            if missing == "error":
                raise
            paths.append("")
    out[COLUMN] = paths
    return out


def score(
    registered: nib.spatialimages.SpatialImage, authors: nib.spatialimages.SpatialImage, subject: str | None = None
) -> pd.Series:
    """Dice of our registered labels against the authors' map of the same subject (same FLAIR grid required).

    As :func:`wmloc_utils.metrics.score_regions`: one Dice per label 1..36, ``mean`` over the WM
    regions 1..34, ``wm`` the overlap of the labelled voxels (their WM segmentation against ours).
    """
    try:
        check_same_grid(authors, registered, "the authors' region map", "the registered region map", subject)
    except InputError as err:
        raise InputError(
            f"{err}. The authors' maps lie on the challenge FLAIR grids: is this subject the WMH "
            f"challenge subject of that id?"
        ) from err
    return score_regions(registered, authors)


def compare(table: pd.DataFrame, regions: str = "regions", authors: str = COLUMN) -> pd.DataFrame:
    """Long table (subject, region, dice) of :func:`score` for every row of ``table`` with both maps.

    ``table`` holds ``subject`` and the two path columns ``regions`` (ours) and ``authors``; rows
    with an empty path are skipped.
    """
    from .images import load_nifti

    rows = []
    for row in table.to_dict("records"):
        ours, theirs = str(row.get(regions) or ""), str(row.get(authors) or "")
        if ours in ("", "nan") or theirs in ("", "nan"):
            continue
        scores = score(
            load_nifti(ours, row["subject"], "region map"),
            load_nifti(theirs, row["subject"], "authors' region map"),
            row["subject"],
        )
        rows += [{"subject": row["subject"], "region": str(k), "dice": v} for k, v in scores.items()]
    return pd.DataFrame(rows, columns=["subject", "region", "dice"])
