"""The JHU Eve atlas and its refinement into 34 WM regions + 2 non-WM labels (method part A1).

The JHU "Eve" white-matter parcellation map type II (Oishi et al. 2009) has 130 labels.
Machnio et al. (2025) merge them into 34 white-matter regions (17 per hemisphere) plus one
"non-WM and infratentorial" label per hemisphere. The merge is a pure label look-up,
encoded once as data in ``wmloc_utils/data/refined_regions.tsv``.

Geometry: the Eve files are 181x217x181 at 1 mm, oriented LAS (x flipped) with a zero
origin (translation 0), so their world coordinates are not MNI coordinates. Anything that
aligns Eve to a subject must initialise from centres of mass or moments, not from headers.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from . import artefacts
from .errors import InputError
from .fetch import fetch
from .images import like, load_nifti, save_nifti, write_table_atomic

EVE_FILES = {
    "t1": "JHU_MNI_SS_T1_brain.nii.gz",
    "mask": "JHU_MNI_SS_T1_mask.nii.gz",
    "tissue": "JHU_MNI_SS_T1_Tissue_Classes.nii.gz",
    "type2": "JHU_MNI_SS_WMPM_Type-II.nii.gz",
}
LUT_FILE = "JHU_MNI_SS_WMPM_Type-II_SlicerLUT.txt"
N_TYPE2 = 130
WM_REGIONS = tuple(range(1, 35))  # refined ids of the 34 WM regions
NON_WM = (35, 36)  # refined ids of "non-WM and infratentorial", left and right
LABEL_IDS = WM_REGIONS + NON_WM  # every refined label id (0 is background)
LOBES = ("frontal", "parietal", "occipital", "temporal", "limbic", "deep", "callosal", "infratentorial")


def read_lut(path: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Parse the Eve type II Slicer look-up table (``id name R G B A``) into a table.

    Columns: id, name, r, g, b, a, hemisphere (L/R/-), is_wm. The hemisphere comes from the
    ``_left``/``_right`` suffix; the Eve LUT omits ``_left`` on some left labels (15-28), so
    ids without a suffix take the side of their id block (1-65 left, 66-130 right).
    ``is_wm`` is True for the labels the refinement maps into the WM regions 1..34. Without
    ``path`` the Eve LUT is fetched (from ``data_dir``, see :func:`wmloc_utils.fetch.fetch`).
    """
    path = Path(path) if path is not None else fetch(LUT_FILE, data_dir)
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 6:
            raise InputError(f"{path}: line {n} is not 'id name R G B A': {line!r}")
        try:
            rows.append([int(parts[0]), parts[1], *(int(p) for p in parts[2:])])
        except ValueError as err:
            raise InputError(f"{path}: line {n} has a non-integer id or colour: {line!r}") from err
    lut = pd.DataFrame(rows, columns=["id", "name", "r", "g", "b", "a"])
    if lut["id"].duplicated().any():
        raise InputError(f"{path}: duplicated label ids {lut.loc[lut['id'].duplicated(), 'id'].tolist()}")

    def side(row) -> str:
        lower = row["name"].lower()
        if lower.endswith("_left"):
            return "L"
        if lower.endswith("_right"):
            return "R"
        if row["id"] == 0:
            return "-"
        return "L" if row["id"] <= N_TYPE2 // 2 else "R"

    lut["hemisphere"] = lut.apply(side, axis=1)
    to_refined = _lookup_table()
    lut["is_wm"] = [bool(i <= N_TYPE2 and 1 <= to_refined[i] <= 34) for i in lut["id"]]
    return lut


def regions_table() -> pd.DataFrame:
    """The refined regions (ids 0..36: short, name, hemisphere, lobe, type2_ids, r, g, b), validated.

    Raises :class:`InputError` unless every Type-II id 0..130 is merged into exactly one region.
    """
    with resources.files("wmloc_utils").joinpath("data/refined_regions.tsv").open() as fh:
        table = pd.read_csv(fh, sep="\t", dtype={"type2_ids": str})
    where = "wmloc_utils/data/refined_regions.tsv"
    if table["id"].tolist() != list(range(37)):
        raise InputError(f"{where}: ids must be 0..36 in order, got {table['id'].tolist()}")
    bad = sorted(set(table["lobe"]) - set(LOBES) - {"-"})
    if bad:
        raise InputError(f"{where}: unknown lobes {bad}; allowed: {LOBES}")
    ids = [int(t) for cell in table["type2_ids"] for t in str(cell).split(",")]
    counts = pd.Series(ids).value_counts()
    missing = sorted(set(range(N_TYPE2 + 1)) - set(ids))
    twice = sorted(counts[counts > 1].index.tolist())
    extra = sorted(set(ids) - set(range(N_TYPE2 + 1)))
    if missing or twice or extra:
        raise InputError(
            f"{where}: each Type-II id 0..{N_TYPE2} must appear exactly once; "
            f"missing {missing}, repeated {twice}, unknown {extra}"
        )
    return table


def mirror_labels() -> np.ndarray:
    """``m[id]`` = the contralateral region of ``id`` (left <-> right by name; background to itself).

    Lets a left-right flip of a region map stay a valid region map (flip augmentation and test-time flips).
    """
    table = regions_table()
    ids = dict(zip(table["short"], table["id"]))
    mirror = np.arange(len(table), dtype=np.int64)
    for short, i in ids.items():
        for side, other in (("_L", "_R"), ("_R", "_L")):
            if short.endswith(side):
                partner = short[: -len(side)] + other
                if partner not in ids:
                    raise InputError(f"wmloc_utils/data/refined_regions.tsv: {short} has no contralateral {partner}")
                mirror[i] = ids[partner]
    return mirror


def _lookup_table() -> np.ndarray:
    """Array ``lut`` with ``lut[type2_id] = refined_id`` for ids 0..130."""
    lut = np.zeros(N_TYPE2 + 1, dtype=np.int16)
    for row in regions_table().itertuples():
        lut[[int(t) for t in str(row.type2_ids).split(",")]] = row.id
    return lut


def refine_labels(type2: np.ndarray | nib.spatialimages.SpatialImage) -> np.ndarray | nib.Nifti1Image:
    """Map a Type-II label map (0..130) to the refined ids (0..36); array in, array out; image in, image out.

    Raises :class:`InputError` on non-integer values or ids outside 0..130.
    """
    is_img = isinstance(type2, nib.spatialimages.SpatialImage)
    data = np.asanyarray(type2.dataobj) if is_img else np.asarray(type2)
    what = f"Type-II label map {type2.get_filename() or ''}".strip() if is_img else "Type-II label array"
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.allclose(data, np.rint(data)):
            raise InputError(f"{what}: labels must be integers")
        data = np.rint(data)
    data = data.astype(np.int64)
    bad = np.unique(data[(data < 0) | (data > N_TYPE2)])
    if bad.size:
        raise InputError(f"{what}: unknown Type-II ids {bad[:10].tolist()} (expected 0..{N_TYPE2})")
    refined = _lookup_table()[data]
    return like(type2, refined, np.int16) if is_img else refined


def load_eve(data_dir: str | os.PathLike | None = None) -> dict[str, nib.Nifti1Image]:
    """The Eve images ``t1``, ``mask``, ``tissue`` (0 bg, 1 CSF, 2 GM, 3 WM) and ``type2``, fetched and verified."""
    return {key: load_nifti(fetch(name, data_dir), what=f"Eve {key}") for key, name in EVE_FILES.items()}


def refined_atlas(data_dir: str | os.PathLike | None = None) -> nib.Nifti1Image:
    """The refined atlas (int16 labels 0..36) on the Eve grid and affine (LAS, zero origin)."""
    type2 = load_nifti(fetch(EVE_FILES["type2"], data_dir), what="Eve Type-II map")
    return refine_labels(type2)


def write_refined_atlas(outdir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``refined_atlas.nii.gz`` and its colour LUT ``refined_atlas_lut.tsv`` (atomic writes).

    Returns ``{"atlas": path, "lut": path}``.
    """
    outdir = Path(outdir)
    atlas = save_nifti(refined_atlas(data_dir), outdir / artefacts.REFINED_ATLAS.path)
    lut = write_table_atomic(regions_table(), outdir / artefacts.REFINED_LUT.path, index=False)
    return {"atlas": atlas, "lut": lut}


def lobe_table() -> pd.DataFrame:
    """Lobe codes used by :func:`lobe_map` and the bullseye: ``code = 2*i+1`` (left) / ``2*i+2`` (right).

    ``i`` indexes :data:`LOBES` (frontal, parietal, occipital, temporal, limbic, deep, callosal,
    infratentorial); 0 is background. The "infratentorial" lobe also holds the deep grey nuclei,
    amygdala and hippocampus (the BGIT compartment of Sudre et al. 2018).
    """
    rows = [(0, "background", "-", "-")]
    for i, lobe in enumerate(LOBES):
        rows += [(2 * i + 1, lobe, "L", f"{lobe} L"), (2 * i + 2, lobe, "R", f"{lobe} R")]
    return pd.DataFrame(rows, columns=["code", "lobe", "hemisphere", "name"])


def lobe_map(
    regions: np.ndarray | nib.spatialimages.SpatialImage,
    absorb_deep: bool = False,
    zooms: tuple[float, float, float] | None = None,
) -> np.ndarray | nib.Nifti1Image:
    """Map refined region ids (0..36) to lobe codes (see :func:`lobe_table`); array or image, as given.

    With ``absorb_deep=True`` the voxels of the "deep" regions (corona radiata, internal and
    external capsules...) take the lobe of the nearest lobar region instead (distance in mm,
    ``zooms`` from the image or given), so every lobe reaches from ventricles to cortex as in
    the bullseye of Sudre et al. (2018).
    """
    is_img = isinstance(regions, nib.spatialimages.SpatialImage)
    data = np.asarray(np.asanyarray(regions.dataobj) if is_img else regions).astype(np.int64)
    if data.min() < 0 or data.max() > 36:
        raise InputError(
            f"refined region map holds ids outside 0..36: {np.unique(data[(data < 0) | (data > 36)])[:10].tolist()}"
        )
    table = regions_table()
    lut = np.zeros(37, dtype=np.int16)
    for row in table.itertuples():
        if row.lobe != "-":
            lut[row.id] = 2 * LOBES.index(row.lobe) + (1 if row.hemisphere == "L" else 2)
    codes = lut[data]
    if absorb_deep:
        if zooms is None:
            zooms = regions.header.get_zooms()[:3] if is_img else (1.0, 1.0, 1.0)
        deep = np.isin(codes, [2 * LOBES.index("deep") + 1, 2 * LOBES.index("deep") + 2])
        lobar = np.isin(codes, [2 * LOBES.index(lobe) + s for lobe in LOBES[:4] for s in (1, 2)])
        if deep.any() and lobar.any():
            idx = ndimage.distance_transform_edt(~lobar, sampling=zooms, return_distances=False, return_indices=True)
            codes[deep] = codes[tuple(i[deep] for i in idx)]
    return like(regions, codes, np.int16) if is_img else codes
