"""Subjects: discovery in the layouts users have, lazy loading, validation with clear errors.

Three layouts are understood, detected automatically by :func:`discover`:

1. MICCAI 2017 WMH challenge: ``<root>/[<site>/]<id>/pre/T1.nii.gz``, ``pre/FLAIR.nii.gz`` and
   ``<id>/wmh.nii.gz`` (0 background, 1 WMH, 2 other pathology);
2. BIDS: ``sub-*/[ses-*/]anat/*_T1w.nii.gz`` and ``*_FLAIR.nii.gz``, lesion masks under
   ``derivatives/*/sub-*/[ses-*/]anat/`` named by their entities (``label-WMH``/``label-lesion`` or
   ``desc-lesion``/``desc-wmh``, suffix ``_mask`` or ``_dseg``; see :func:`is_lesion_mask`);
3. a CSV manifest with columns ``subject,t1,flair[,lesion]`` (paths relative to the CSV allowed).

Subject ids must be unique: the same challenge id at two sites is refused unless
``discover(..., site_prefix=True)`` names every subject ``<site>_<id>``.

Native space is the FLAIR grid, as in the challenge. A lesion mask must lie on it; a T1 on
another grid is rigidly registered to the FLAIR with ANTsPy (:meth:`Subject.t1_on_flair`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from . import artefacts
from .errors import InputError
from .images import (
    check_intensities,
    check_labels,
    check_lesion_volume,
    check_same_grid,
    check_voxel_sizes,
    grid_of,
    load_nifti,
    same_grid,
)

LESION_LABELS = (0, 1, 2)
NIFTI = (".nii.gz", ".nii")


@dataclass
class Subject:
    """One subject: id, file paths, and (loaded on first use) its images on the FLAIR grid."""

    id: str
    t1: Path | None
    flair: Path | None
    lesion: Path | None = None
    site: str = ""
    extra: dict = field(default_factory=dict)

    def _scan(self, path: Path | None, what: str) -> nib.Nifti1Image:
        """Load a T1 or FLAIR: readable, oriented 3D image with plausible voxels and usable intensities."""
        if path is None:
            raise InputError(f"subject {self.id}: {what} image is missing")
        img = load_nifti(path, self.id, what)
        check_voxel_sizes(img, path, self.id, what)
        check_intensities(img, path, self.id, what)
        return img

    @cached_property
    def flair_img(self) -> nib.Nifti1Image:
        """The FLAIR image: the subject's native grid."""
        return self._scan(self.flair, "FLAIR")

    @cached_property
    def t1_img(self) -> nib.Nifti1Image:
        """The T1 image as stored (possibly on another grid than FLAIR)."""
        return self._scan(self.t1, "T1")

    @cached_property
    def lesion_img(self) -> nib.Nifti1Image | None:
        """The lesion mask (challenge labels 0/1/2) on the FLAIR grid, or None when there is none."""
        if self.lesion is None:
            return None
        img = load_nifti(self.lesion, self.id, "lesion mask")
        check_same_grid(self.flair_img, img, f"FLAIR ({self.flair})", f"lesion mask ({self.lesion})", self.id)
        data = check_labels(img, LESION_LABELS, self.lesion, self.id, "lesion mask")
        check_lesion_volume(
            data, np.asanyarray(self.flair_img.dataobj), grid_of(self.flair_img)["voxel_ml"], self.lesion, self.id
        )
        return nib.Nifti1Image(data.astype(np.uint8), img.affine, img.header)

    def t1_on_flair(self, workdir: str | os.PathLike | None = None) -> nib.Nifti1Image:
        """T1 on the FLAIR grid: as is when the grids agree, else rigidly registered with ANTsPy."""
        if same_grid(self.t1_img, self.flair_img):
            return self.t1_img
        return register_t1_to_flair(self.t1_img, self.flair_img, workdir, self.id)

    def validate(self, t1_other_grid: str = "register") -> dict:
        """Load and check every file; return a summary row. ``t1_other_grid`` is "register" or "error"."""
        flair = self.flair_img
        t1 = self.t1_img
        if not same_grid(t1, flair):
            if t1_other_grid == "error":
                check_same_grid(flair, t1, f"FLAIR ({self.flair})", f"T1 ({self.t1})", self.id)
            _check_overlap(t1, flair, self)
        lesion = self.lesion_img
        g = grid_of(flair)
        row = {
            "subject": self.id,
            "site": self.site,
            "t1": str(self.t1),
            "flair": str(self.flair),
            "lesion": str(self.lesion) if self.lesion else "",
            "shape": "x".join(map(str, g["shape"])),
            "voxel_mm": "x".join(f"{v:g}" for v in g["voxel_mm"]),
            "orientation": g["orientation"],
            "t1_on_flair_grid": same_grid(t1, flair),
            "truth_dir": self.extra.get("truth_dir", ""),
        }
        if lesion is not None:
            data = np.asanyarray(lesion.dataobj)
            row["lesion_ml"] = float((data == 1).sum() * g["voxel_ml"])
            row["other_pathology_ml"] = float((data == 2).sum() * g["voxel_ml"])
        return row


def _check_overlap(t1: nib.Nifti1Image, flair: nib.Nifti1Image, subj: Subject) -> None:
    """Refuse T1/FLAIR pairs whose fields of view do not even overlap (wrong headers or wrong files)."""

    def centre(img):
        return img.affine[:3, :3] @ ((np.array(img.shape[:3]) - 1) / 2) + img.affine[:3, 3]

    gap = float(np.linalg.norm(centre(t1) - centre(flair)))
    if gap > 100:
        raise InputError(
            f"subject {subj.id}: T1 ({subj.t1}) and FLAIR ({subj.flair}) are on different grids whose "
            f"centres are {gap:.0f} mm apart: check the headers or that both files belong to this subject"
        )


def register_t1_to_flair(
    t1: nib.Nifti1Image,
    flair: nib.Nifti1Image,
    workdir: str | os.PathLike | None,
    subject: str,
    reg_spacing: float | None = None,
) -> nib.Nifti1Image:
    """Rigidly register T1 to FLAIR (ANTsPy, mutual information) and resample it on the FLAIR grid.

    ``reg_spacing`` (mm) runs the registration on coarser copies (2 mm: ~3x faster than 1 mm, same
    alignment to a fraction of a voxel); the transform is physical and resamples the full-resolution T1.
    The transform is kept in ``workdir``; without one it is a scratch file, deleted here.
    """
    import ants

    from .antsio import coarsen, remove_files, scratch_prefix, seed_ants

    if workdir:
        prefix = str(Path(workdir) / f"{subject}_t1_to_flair_")
        Path(workdir).mkdir(parents=True, exist_ok=True)
    else:
        prefix = scratch_prefix("t1reg")
    fixed, moving = ants.from_nibabel_nifti(flair), ants.from_nibabel_nifti(t1)
    seed_ants(0)
    reg = ants.registration(
        coarsen(fixed, reg_spacing),
        coarsen(moving, reg_spacing),
        type_of_transform="Rigid",
        aff_metric="mattes",
        outprefix=prefix,
    )
    warped = reg["warpedmovout"] if not reg_spacing else ants.apply_transforms(fixed, moving, reg["fwdtransforms"])
    if not workdir:
        remove_files(set(reg["fwdtransforms"]) | set(reg["invtransforms"]))
    out = ants.to_nibabel_nifti(warped)
    return nib.Nifti1Image(np.asanyarray(out.dataobj).astype(np.float32), flair.affine)


# ---------------------------------------------------------------- discovery
def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for ext in NIFTI:
            p = folder / f"{name}{ext}"
            if p.exists():
                return p
    return None


def find_challenge(root: str | os.PathLike) -> list[Subject]:
    """Subjects in the WMH challenge layout, with or without a site level."""
    root = Path(root)
    subjects = []
    for pre in sorted(set(root.glob("*/pre")) | set(root.glob("*/*/pre"))):
        if not pre.is_dir() or pre.parent.name.startswith("."):
            continue
        sdir = pre.parent
        site = sdir.parent.name if sdir.parent != root else ""
        extra = {"truth_dir": str(sdir / "truth")} if (sdir / "truth" / "transform.json").exists() else {}
        subjects.append(
            Subject(
                id=sdir.name,
                site=site,
                t1=_first(pre, ("T1",)),
                flair=_first(pre, ("FLAIR",)),
                lesion=_first(sdir, ("wmh",)),
                extra=extra,
            )
        )
    return subjects


@dataclass(frozen=True)
class BidsName:
    """A BIDS file name split into its ``key-value`` entities (in order), bare tokens and final suffix."""

    entities: dict
    suffix: str
    tokens: tuple = ()

    def get(self, key: str) -> str | None:
        """The value of entity ``key`` (None when absent)."""
        return self.entities.get(key)


def parse_bids_name(name: str) -> BidsName | None:
    """Parse ``sub-01_ses-1_run-2_FLAIR.nii.gz`` into entities and suffix; None if it is not a BIDS-like name.

    Parts are split on ``_``; the last one is the suffix (no ``-``), the others are ``key-value``
    entities. Bare tokens between them (``sub-01_FLAIR_label-WMH_mask``, common in derivatives) are
    kept in ``tokens`` rather than mistaken for entities.
    """
    stem = next((name[: -len(ext)] for ext in NIFTI if name.endswith(ext)), None)
    if not stem:
        return None
    *parts, suffix = stem.split("_")
    if not parts or "-" in suffix or not suffix:
        return None
    entities, tokens = {}, []
    for part in parts:
        key, sep, value = part.partition("-")
        if sep and key and value:
            entities[key] = value
        else:
            tokens.append(part)
    if "sub" not in entities:
        return None
    return BidsName(entities, suffix, tuple(tokens))


LESION_WORDS = {"wmh", "lesion", "lesions"}
MASK_SUFFIXES = {"mask", "dseg"}


def is_lesion_mask(name: BidsName) -> bool:
    """True for a lesion mask: ``label-WMH|lesion(s)``, else ``desc-lesion(s)|wmh``, with suffix ``_mask``/``_dseg``.

    The ``label`` entity decides when present, so ``desc-brain_mask`` or ``label-brain_mask`` never count.
    """
    if name.suffix.lower() not in MASK_SUFFIXES:
        return False
    word = name.get("label") if name.get("label") is not None else name.get("desc")
    return word is not None and word.lower() in LESION_WORDS


def _same_label(key: str, a: str | None, b: str | None) -> bool:
    """Entity values compare as strings (``sub-01`` is not ``sub-1``), but a run is an index (``run-01`` is ``run-1``)."""
    if key == "run" and a is not None and b is not None and a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a == b


def _parse_selector(run: str | int | None) -> dict:
    """``run=2`` -> {"run": "2"}; ``run="acq-sag_run-1"`` -> {"acq": "sag", "run": "1"}."""
    if run is None:
        return {}
    text = str(run)
    if "-" not in text:
        return {"run": text}
    pairs = [part.partition("-") for part in text.split("_")]
    if any(not k or not v for k, _, v in pairs):
        raise InputError(
            f"run={run!r}: expected a run number (2) or BIDS entities such as 'acq-sag' or 'acq-sag_run-1'"
        )
    return {k: v for k, _, v in pairs}


def _pick_scan(anat: Path, suffix: str, key: str, selector: dict) -> Path | None:
    """The one ``*_<suffix>.nii*`` of a subject/session: several need ``run=`` to choose (an error lists them)."""
    found = sorted(p for p in anat.glob(f"*_{suffix}.nii*") if (n := parse_bids_name(p.name)) and n.suffix == suffix)
    if len(found) <= 1:
        return found[0] if found else None
    chosen = [p for p in found if all(_same_label(k, parse_bids_name(p.name).get(k), v) for k, v in selector.items())]
    if selector and len(chosen) == 1:
        return chosen[0]
    names = ", ".join(p.name for p in found)
    why = (
        f"{_selector_text(selector)} selects {len(chosen)} of them"
        if selector
        else "wmloc needs exactly one per subject/session"
    )
    raise InputError(
        f"subject {key}: {len(found)} {suffix} images in {anat} ({names}); {why}. Choose one with "
        f"discover(..., run=N) for run-N, or run='acq-<label>' / 'acq-<label>_run-N' for other entities, "
        f"or list the files you want in a CSV manifest (subject,t1,flair[,lesion])"
    )


def _selector_text(selector: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in selector.items())


def _lesion_masks(root: Path) -> list[tuple[BidsName, Path]]:
    """Every lesion mask under ``derivatives/*/sub-*/[ses-*/]anat/``, with its parsed name."""
    out = []
    for p in sorted((root / "derivatives").glob("*/sub-*/**/anat/*.nii*")):
        name = parse_bids_name(p.name)
        if name is not None and is_lesion_mask(name):
            out.append((name, p))
    return out


def _mask_matches(mask: BidsName, scan: BidsName) -> bool:
    """A mask belongs to a scan with the same sub and ses (and run/acq when the mask names them)."""
    return all(_same_label(k, mask.get(k), scan.get(k)) for k in ("sub", "ses")) and all(
        _same_label(k, mask.get(k), scan.get(k)) for k in ("run", "acq") if mask.get(k) is not None
    )


def _mask_for(masks: list[tuple[BidsName, Path]], flair: Path | None, key: str) -> Path | None:
    """The lesion mask of one FLAIR (:func:`_mask_matches`); two is an error."""
    if flair is None:
        return None
    target = parse_bids_name(flair.name)
    hits = [p for name, p in masks if _mask_matches(name, target)]
    if len(hits) > 1:
        raise InputError(
            f"subject {key}: {len(hits)} lesion masks match {flair.name}: {', '.join(str(p) for p in hits)}. "
            f"Keep one (move the others out of derivatives/), or name the one to use in a CSV manifest "
            f"(subject,t1,flair,lesion)"
        )
    return hits[0] if hits else None


def find_bids(root: str | os.PathLike, run: str | int | None = None) -> list[Subject]:
    """Subjects of a BIDS data set: one T1w + FLAIR per subject/session, lesion masks from derivatives.

    ``run`` chooses among several T1w/FLAIR of one subject/session: a run number, or entities such
    as ``"acq-sag"``; without it several are an error (a single one is used as is). Subject ids
    are ``sub-X[_ses-Y]``.
    """
    root = Path(root)
    selector = _parse_selector(run)
    masks = _lesion_masks(root)
    subjects = []
    for anat in sorted(set(root.glob("sub-*/anat")) | set(root.glob("sub-*/ses-*/anat"))):
        key = "_".join(p.name for p in (anat.parent.parent, anat.parent) if p.name.startswith(("sub-", "ses-")))
        t1, flair = _pick_scan(anat, "T1w", key, selector), _pick_scan(anat, "FLAIR", key, selector)
        subjects.append(Subject(id=key, t1=t1, flair=flair, lesion=_mask_for(masks, flair, key)))
    _check_orphan_masks(root, masks)
    return subjects


def _check_orphan_masks(root: Path, masks: list[tuple[BidsName, Path]]) -> None:
    """A lesion mask that fits no FLAIR of the data set (a typo in sub/ses/run/acq) is an error, not a
    subject silently left without its mask. A mask of a run that ``run=`` did not choose is fine."""
    scans = [n for p in root.glob("sub-*/**/anat/*_FLAIR.nii*") if (n := parse_bids_name(p.name))]
    orphans = [p for name, p in masks if not any(_mask_matches(name, scan) for scan in scans)]
    if orphans:
        raise InputError(
            f"{len(orphans)} lesion mask(s) under {root / 'derivatives'} fit no FLAIR of the data set: "
            f"{', '.join(str(p) for p in orphans)}. A mask's sub-/ses- (and run-/acq- when it names them) must "
            f"equal its FLAIR's, e.g. sub-01_ses-1_FLAIR.nii.gz -> sub-01_ses-1_label-WMH_mask.nii.gz: rename it, "
            f"move it out of derivatives/, or list the files in a CSV manifest (subject,t1,flair,lesion)"
        )


def read_manifest(csv: str | os.PathLike) -> list[Subject]:
    """Subjects from a CSV manifest with columns subject,t1,flair[,lesion] (relative paths from the CSV)."""
    csv = Path(csv)
    table = pd.read_csv(csv, dtype=str).fillna("")
    missing = {"subject", "t1", "flair"} - set(table.columns)
    if missing:
        raise InputError(f"{csv}: manifest lacks column(s) {sorted(missing)}; expected subject,t1,flair[,lesion]")

    def path(value: str) -> Path | None:
        return (csv.parent / value).resolve() if value else None

    dup = table["subject"][table["subject"].duplicated()].tolist()
    if dup:
        raise InputError(f"{csv}: subject ids appear more than once: {dup[:5]}")
    return [
        Subject(
            id=r["subject"],
            t1=path(r["t1"]),
            flair=path(r["flair"]),
            lesion=path(r.get("lesion", "")),
            site=r.get("site", ""),
        )
        for _, r in table.iterrows()
    ]


def discover(source: str | os.PathLike, run: str | int | None = None, site_prefix: bool = False) -> list[Subject]:
    """Find subjects in a folder (challenge or BIDS layout) or a CSV manifest; errors name what is wrong.

    ``run`` (BIDS only) chooses among several T1w/FLAIR runs, see :func:`find_bids`. Subject ids must
    be unique; ``site_prefix=True`` makes every id ``<site>_<id>`` (for challenge data whose sites
    reuse ids).
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    bids = source.is_dir() and any(source.glob("sub-*"))
    if run is not None and not bids:
        raise InputError(f"{source}: run={run!r} chooses among BIDS runs, but this is not a BIDS data set")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise InputError(f"{source}: expected a folder (challenge or BIDS layout) or a .csv manifest")
        subjects = read_manifest(source)
    elif bids:
        subjects = find_bids(source, run=run)
    else:
        subjects = find_challenge(source)
    if not subjects:
        raise InputError(
            f"{source}: no subjects found. Expected <root>/[<site>/]<id>/pre/FLAIR.nii.gz "
            f"(WMH challenge), sub-*/anat/*_FLAIR.nii.gz (BIDS), or a CSV manifest subject,t1,flair[,lesion]"
        )
    if site_prefix:
        for s in subjects:
            s.id = f"{s.site}_{s.id}" if s.site else s.id
    _check_unique_ids(subjects, source, site_prefix)
    for s in subjects:
        for what, p in (("T1", s.t1), ("FLAIR", s.flair)):
            if p is None:
                raise InputError(f"subject {s.id}: {what} image not found (looked in {source})")
            if not Path(p).exists():
                raise InputError(f"subject {s.id}: {what} file {p} does not exist")
    return subjects


def _check_unique_ids(subjects: list[Subject], source: Path, site_prefix: bool) -> None:
    """Refuse two subjects with one id (their outputs would overwrite each other), listing their folders."""
    folders: dict[str, list[str]] = {}
    for s in subjects:
        where = Path(s.flair or s.t1 or source).parent
        folders.setdefault(s.id, []).append(str(where.parent if where.name == "pre" else where))
    dup = {k: v for k, v in folders.items() if len(v) > 1}
    if dup:
        listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(dup.items())[:10])
        fix = (
            "make them unique in the data"
            if site_prefix
            else "use discover(..., site_prefix=True) to name every subject <site>_<id>, or rename them"
        )
        raise InputError(f"{source}: {len(dup)} subject id(s) appear more than once ({listed}); {fix}")


def validate(subjects: list[Subject], t1_other_grid: str = "register", progress: bool = True) -> pd.DataFrame:
    """Validate every subject (readable 3D images, grids, lesion labels) and tabulate them."""
    from tqdm.auto import tqdm

    return pd.DataFrame([s.validate(t1_other_grid) for s in tqdm(subjects, desc="validate", disable=not progress)])


def read_participants(root: str | os.PathLike, ids: list[str]) -> pd.DataFrame:
    """``participants.tsv`` of a data set (BIDS style) restricted to ``ids``; ids only when there is none."""
    root = Path(root)
    path = (root if root.is_dir() else root.parent) / "participants.tsv"
    if not path.exists():
        return pd.DataFrame({"participant_id": ids})
    table = pd.read_csv(path, sep="\t", dtype={"participant_id": str})
    if "participant_id" not in table:
        raise InputError(f"{path}: participants table lacks the participant_id column")
    table["participant_id"] = table["participant_id"].str.replace("^sub-", "", regex=True)
    key = [i.split("_")[0].removeprefix("sub-") for i in ids]
    out = pd.DataFrame({"participant_id": ids, "_key": key}).merge(
        table.rename(columns={"participant_id": "_key"}), on="_key", how="left"
    )
    return out.drop(columns="_key")


def write_manifest(table: pd.DataFrame, participants: pd.DataFrame, outdir: str | os.PathLike) -> dict[str, Path]:
    """Write ``subjects.csv`` (the validated subjects, with group and truth folder when known) and ``participants.tsv``."""
    from .images import write_table_atomic

    outdir = Path(outdir)
    extra = participants.set_index("participant_id")
    manifest = table.copy()
    manifest["group"] = manifest["subject"].map(extra["group"]) if "group" in extra else ""
    manifest["group"] = manifest["group"].fillna("")
    cols = [
        "subject",
        "site",
        "group",
        "t1",
        "flair",
        "lesion",
        "truth_dir",
        "shape",
        "voxel_mm",
        "orientation",
        "lesion_ml",
    ]
    for c in cols:
        if c not in manifest:
            manifest[c] = ""
    rest = [c for c in manifest.columns if c not in cols]
    return {
        "subjects": write_table_atomic(manifest[cols + rest], outdir / artefacts.SUBJECTS.path, index=False),
        "participants": write_table_atomic(participants, outdir / artefacts.PARTICIPANTS.path, index=False),
    }


NO_MASKS = "no reference lesion masks: evaluation sections will be skipped"


def with_lesion_masks(cohort: pd.DataFrame) -> pd.DataFrame:
    """The subjects of a table (``subjects.csv``) that have a reference lesion mask; empty when none has."""
    if "lesion" not in cohort:
        return cohort.iloc[:0]
    return cohort[cohort["lesion"].fillna("").astype(str).str.strip().ne("")]


def lesion_mask_summary(cohort: pd.DataFrame) -> str:
    """One line for the reader: how many subjects have a reference lesion mask, or :data:`NO_MASKS`."""
    n = len(with_lesion_masks(cohort))
    return NO_MASKS if n == 0 else f"{n} of {len(cohort)} subjects have a reference lesion mask"
