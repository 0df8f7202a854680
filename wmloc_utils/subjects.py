"""Subjects: discovery in the layouts users have, lazy loading, validation with clear errors.

Three layouts are understood, detected automatically by :func:`discover`:

1. MICCAI 2017 WMH challenge: ``<root>/[<site>/]<id>/pre/T1.nii.gz``, ``pre/FLAIR.nii.gz`` and
   ``<id>/wmh.nii.gz`` (0 background, 1 WMH, 2 other pathology);
2. BIDS: ``sub-*/[ses-*/]anat/*_T1w.nii.gz`` and ``*_FLAIR.nii.gz``, lesion masks under
   ``derivatives/*/sub-*/[ses-*/]anat/*_FLAIR*(label-WMH|lesion|mask)*.nii.gz``;
3. a CSV manifest with columns ``subject,t1,flair[,lesion]`` (paths relative to the CSV allowed).

Native space is the FLAIR grid, as in the challenge. A lesion mask must lie on it; a T1 on
another grid is rigidly registered to the FLAIR with ANTsPy (:meth:`Subject.t1_on_flair`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .images import InputError, check_labels, check_same_grid, grid_of, load_nifti, same_grid

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

    @cached_property
    def flair_img(self) -> nib.Nifti1Image:
        """The FLAIR image: the subject's native grid."""
        if self.flair is None:
            raise InputError(f"subject {self.id}: FLAIR image is missing")
        return load_nifti(self.flair, self.id, "FLAIR")

    @cached_property
    def t1_img(self) -> nib.Nifti1Image:
        """The T1 image as stored (possibly on another grid than FLAIR)."""
        if self.t1 is None:
            raise InputError(f"subject {self.id}: T1 image is missing")
        return load_nifti(self.t1, self.id, "T1")

    @cached_property
    def lesion_img(self) -> nib.Nifti1Image | None:
        """The lesion mask (challenge labels 0/1/2) on the FLAIR grid, or None when there is none."""
        if self.lesion is None:
            return None
        img = load_nifti(self.lesion, self.id, "lesion mask")
        check_same_grid(self.flair_img, img, f"FLAIR ({self.flair})", f"lesion mask ({self.lesion})", self.id)
        data = check_labels(img, LESION_LABELS, self.lesion, self.id, "lesion mask")
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
        row = {"subject": self.id, "site": self.site, "t1": str(self.t1), "flair": str(self.flair),
               "lesion": str(self.lesion) if self.lesion else "", "shape": "x".join(map(str, g["shape"])),
               "voxel_mm": "x".join(f"{v:g}" for v in g["voxel_mm"]), "orientation": g["orientation"],
               "t1_on_flair_grid": same_grid(t1, flair), "truth_dir": self.extra.get("truth_dir", "")}
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
        raise InputError(f"subject {subj.id}: T1 ({subj.t1}) and FLAIR ({subj.flair}) are on different grids whose "
                         f"centres are {gap:.0f} mm apart: check the headers or that both files belong to this subject")


def register_t1_to_flair(t1: nib.Nifti1Image, flair: nib.Nifti1Image, workdir: str | os.PathLike | None,
                         subject: str, reg_spacing: float | None = None) -> nib.Nifti1Image:
    """Rigidly register T1 to FLAIR (ANTsPy, mutual information) and resample it on the FLAIR grid.

    ``reg_spacing`` (mm) runs the registration on coarser copies (2 mm: ~3x faster than 1 mm, same
    alignment to a fraction of a voxel); the transform is physical and resamples the full-resolution T1.
    """
    import tempfile

    import ants

    from .registration import _coarsen

    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="wmloc-t1reg-"))
    prefix = base / f"{subject}_t1_to_flair_"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fixed, moving = ants.from_nibabel_nifti(flair), ants.from_nibabel_nifti(t1)
    reg = ants.registration(_coarsen(fixed, reg_spacing), _coarsen(moving, reg_spacing), type_of_transform="Rigid",
                            aff_metric="mattes", outprefix=str(prefix))
    warped = reg["warpedmovout"] if not reg_spacing else ants.apply_transforms(fixed, moving, reg["fwdtransforms"])
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
        subjects.append(Subject(id=sdir.name, site=site, t1=_first(pre, ("T1",)), flair=_first(pre, ("FLAIR",)),
                                lesion=_first(sdir, ("wmh",)), extra=extra))
    return subjects


def _bids_entities(name: str) -> str:
    return "_".join(p for p in name.split("_") if p.startswith(("sub-", "ses-")))


def find_bids(root: str | os.PathLike) -> list[Subject]:
    """Subjects of a BIDS data set (T1w + FLAIR per subject/session, lesion masks from derivatives)."""
    root = Path(root)
    lesions = {}
    for p in sorted((root / "derivatives").glob("*/sub-*/**/anat/*.nii*")):
        if re.search(r"(label-(WMH|lesion)|_mask|lesion)", p.name, re.IGNORECASE):
            lesions.setdefault(_bids_entities(p.name), p)
    subjects = []
    for anat in sorted(set(root.glob("sub-*/anat")) | set(root.glob("sub-*/ses-*/anat"))):
        t1s = sorted(anat.glob("*_T1w.nii*"))
        flairs = sorted(anat.glob("*_FLAIR.nii*"))
        key = "_".join(p.name for p in (anat.parent.parent, anat.parent) if p.name.startswith(("sub-", "ses-")))
        subjects.append(Subject(id=key, t1=t1s[0] if t1s else None, flair=flairs[0] if flairs else None,
                                lesion=lesions.get(key)))
    return subjects


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
    return [Subject(id=r["subject"], t1=path(r["t1"]), flair=path(r["flair"]), lesion=path(r.get("lesion", "")),
                    site=r.get("site", "")) for _, r in table.iterrows()]


def discover(source: str | os.PathLike) -> list[Subject]:
    """Find subjects in a folder (challenge or BIDS layout) or a CSV manifest; errors name what is wrong."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise InputError(f"{source}: expected a folder (challenge or BIDS layout) or a .csv manifest")
        subjects = read_manifest(source)
    elif any(source.glob("sub-*")):
        subjects = find_bids(source)
    else:
        subjects = find_challenge(source)
    if not subjects:
        raise InputError(f"{source}: no subjects found. Expected <root>/[<site>/]<id>/pre/FLAIR.nii.gz "
                         f"(WMH challenge), sub-*/anat/*_FLAIR.nii.gz (BIDS), or a CSV manifest subject,t1,flair[,lesion]")
    for s in subjects:
        for what, p in (("T1", s.t1), ("FLAIR", s.flair)):
            if p is None:
                raise InputError(f"subject {s.id}: {what} image not found (looked in {source})")
            if not Path(p).exists():
                raise InputError(f"subject {s.id}: {what} file {p} does not exist")
    return subjects


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
        table.rename(columns={"participant_id": "_key"}), on="_key", how="left")
    return out.drop(columns="_key")


def write_manifest(table: pd.DataFrame, participants: pd.DataFrame, outdir: str | os.PathLike) -> dict[str, Path]:
    """Write ``subjects.csv`` (the validated subjects, with group and truth folder when known) and ``participants.tsv``."""
    from .images import write_table_atomic

    outdir = Path(outdir)
    extra = participants.set_index("participant_id")
    manifest = table.copy()
    manifest["group"] = manifest["subject"].map(extra["group"]) if "group" in extra else ""
    manifest["group"] = manifest["group"].fillna("")
    cols = ["subject", "site", "group", "t1", "flair", "lesion", "truth_dir", "shape", "voxel_mm", "orientation",
            "lesion_ml"]
    for c in cols:
        if c not in manifest:
            manifest[c] = ""
    rest = [c for c in manifest.columns if c not in cols]
    return {"subjects": write_table_atomic(manifest[cols + rest], outdir / "subjects.csv", index=False),
            "participants": write_table_atomic(participants, outdir / "participants.tsv", index=False)}
