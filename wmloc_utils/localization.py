"""Regional lesion loads (method part C): where in the white matter are a subject's lesions?

A binary lesion mask is combined with a labelled region map (the 36 refined atlas regions,
a periventricular/deep map, a bullseye map: any map with a table of ``id`` and ``name``)
into a tidy per-region table: lesion volume, region volume, the fraction of the region that
is lesion, the region's share of the subject's load, and the number of lesions (26-connected
components) whose majority of voxels lies in the region. Lesion voxels outside every region
are reported as region 0, "unlabelled". Volumes are in mL from the voxel size.

A region map restricted to the subject's WM (atlas registration) or made by a network (which
calls lesions "background": they do not look like WM) leaves lesion voxels outside every region.
With ``fill_from`` (e.g. the 34 WM regions), every such lesion voxel inside the brain takes the
nearest of those regions (in mm), so that no lesion volume is silently lost; ``assigned_ml``
reports how much was placed that way, and what stays unlabelled is the QC figure to watch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from . import artefacts, metrics
from .errors import InputError
from .images import check_same_grid, load_nifti, write_table_atomic

UNLABELLED = "unlabelled"
COLUMNS = [
    "region",
    "name",
    "short",
    "lesion_ml",
    "region_ml",
    "lesion_fraction",
    "load_share",
    "n_lesions",
    "assigned_ml",
]


def read_table(table: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """A region table (``id``, ``name``, other columns kept) sorted by id, without id 0.

    Accepts a DataFrame or a TSV/CSV path; id 0 (background) is dropped because lesion
    voxels outside every region are always reported as region 0, "unlabelled".
    """
    where = str(table) if isinstance(table, (str, os.PathLike)) else "region table"
    if isinstance(table, (str, os.PathLike)):
        table = pd.read_csv(table, sep="\t" if str(table).endswith((".tsv", ".txt")) else ",")
    missing = {"id", "name"} - set(table.columns)
    if missing:
        raise InputError(f"{where}: needs columns id and name, missing {sorted(missing)}")
    table = table.copy()
    table["id"] = pd.to_numeric(table["id"], errors="raise").astype(int)
    if (table["id"] < 0).any():
        raise InputError(f"{where}: region ids must be >= 0, found {table.loc[table['id'] < 0, 'id'].tolist()}")
    if table["id"].duplicated().any():
        raise InputError(f"{where}: duplicated region ids {table.loc[table['id'].duplicated(), 'id'].tolist()}")
    return table[table["id"] != 0].sort_values("id").reset_index(drop=True)


def _binary_lesion(lesion: np.ndarray, ignore_label: int | None, who: str) -> np.ndarray:
    lesion = np.asarray(lesion)
    if lesion.dtype == bool:
        return lesion
    if ignore_label is not None:
        lesion = np.where(lesion == ignore_label, 0, lesion)
    ok = (lesion == 0) | (lesion == 1)
    if not ok.all():
        bad = np.unique(lesion[~ok])[:5].tolist()
        hint = " (challenge label 2 'other pathology': pass ignore_label=2 to drop it)" if 2 in bad else ""
        raise InputError(f"{who}: lesion mask must be binary {{0, 1}}, found values {bad}{hint}")
    return lesion == 1


def _region_ids(regions: np.ndarray, table: pd.DataFrame, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer region array and its voxel count per id, raising on ids the table does not know."""
    regions = np.asarray(regions)
    if not np.issubdtype(regions.dtype, np.integer):
        rounded = np.rint(regions)
        if not np.allclose(regions, rounded, atol=1e-3):
            raise InputError(f"{who}: region map must hold integer labels, found non-integer values")
        regions = rounded
    regions = regions.astype(np.int64, copy=False)
    if regions.min(initial=0) < 0:
        raise InputError(f"{who}: region map holds negative labels {np.unique(regions[regions < 0])[:5].tolist()}")
    counts = np.bincount(regions.ravel(), minlength=(int(table["id"].max()) if len(table) else 0) + 1)
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - set(table["id"]) - {0})
    if unknown:
        raise InputError(
            f"{who}: region ids {unknown[:10]} are not in the region table (ids {table['id'].min()}..{table['id'].max()})"
        )
    return regions, counts


def assign_lesion_voxels(
    lesion: np.ndarray,
    regions: np.ndarray,
    zooms: Sequence[float],
    fill_from: Iterable[int],
    brain: np.ndarray | None = None,
    max_distance_mm: float | None = None,
    who: str = "lesion/regions",
) -> np.ndarray:
    """The region map with every lesion voxel outside a region given the nearest ``fill_from`` region (mm).

    Only lesion voxels inside ``brain`` (when given) and within ``max_distance_mm`` of a region
    (when given) are assigned; the others stay 0. Raises :class:`InputError` when lesion voxels need a
    region and the map holds none of ``fill_from`` (a failed registration or segmentation).
    """
    lesion, regions = np.asarray(lesion, bool), np.asarray(regions)
    todo = lesion & (regions == 0)
    if brain is not None:
        brain = np.asarray(brain, bool)
        if brain.shape != regions.shape:
            raise InputError(f"{who}: brain mask shape {brain.shape} differs from region map shape {regions.shape}")
        todo &= brain
    if not todo.any():
        return regions
    source = np.isin(regions, list(fill_from))
    if not source.any():
        raise InputError(
            f"{who}: the region map holds none of the regions {_span(fill_from)}, so its "
            f"{int(todo.sum())} lesion voxels cannot be placed: check the registration or segmentation"
        )
    # nearest source voxel, computed in the bounding box of the sources and the voxels to place
    idx = np.argwhere(source | todo)
    box = tuple(slice(a, b) for a, b in zip(idx.min(0), idx.max(0) + 1))
    dist, near = ndimage.distance_transform_edt(
        ~source[box], sampling=np.asarray(zooms, float)[:3], return_indices=True
    )
    sub = regions[box]
    place = todo[box] if max_distance_mm is None else todo[box] & (dist <= max_distance_mm)
    out = regions.copy()
    out[box] = np.where(place, sub[tuple(near)], sub)
    return out


def _span(ids: Iterable[int]) -> str:
    ids = sorted(int(i) for i in ids)
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)) else str(ids)


def regional_loads(
    lesion: np.ndarray,
    regions: np.ndarray,
    zooms: Sequence[float],
    table: pd.DataFrame | str | os.PathLike,
    ignore_label: int | None = None,
    who: str = "lesion/regions",
    fill_from: Iterable[int] | None = None,
    brain: np.ndarray | None = None,
    max_distance_mm: float | None = None,
) -> pd.DataFrame:
    """Per-region lesion loads of one subject (columns :data:`COLUMNS`, one row per table region plus region 0).

    ``short`` is the table's short name when it has one (else the name), for compact figures.

    ``lesion`` must hold {0, 1} (with ``ignore_label`` set, voxels of that label count as 0);
    ``regions`` holds region ids known to ``table``; ``zooms`` is the voxel size in mm. With
    ``fill_from``, lesion voxels outside every region go to the nearest of those regions
    (:func:`assign_lesion_voxels`, inside ``brain`` when given); ``assigned_ml`` says how much.
    """
    table = read_table(table)
    lesion = _binary_lesion(lesion, ignore_label, who)
    regions, _ = _region_ids(regions, table, who)
    if lesion.shape != regions.shape:
        raise InputError(f"{who}: lesion mask shape {lesion.shape} differs from region map shape {regions.shape}")
    if lesion.any() and not regions.any():
        raise InputError(
            f"{who}: the region map holds no region at all (every voxel 0), so the whole lesion load "
            f"would be 'unlabelled': check the registration or segmentation that made it"
        )
    original = regions
    if fill_from is not None:
        regions = assign_lesion_voxels(lesion, regions, zooms, fill_from, brain, max_distance_mm, who)
    region_counts = np.bincount(regions.ravel(), minlength=(int(table["id"].max()) if len(table) else 0) + 1)
    voxel_ml = float(np.prod(np.asarray(zooms, float)[:3])) / 1000.0
    n_ids = len(region_counts)
    lesion_regions = regions[lesion]
    lesion_counts = np.bincount(lesion_regions, minlength=n_ids)
    assigned = np.bincount(regions[lesion & (original == 0)], minlength=n_ids)
    assigned[0] = 0
    # each 26-connected lesion goes to the region holding most of its voxels (ties: lowest id)
    components, n_comp = metrics.lesions(lesion)
    per_lesion = np.bincount(
        components[lesion].astype(np.int64) * n_ids + lesion_regions, minlength=(n_comp + 1) * n_ids
    ).reshape(n_comp + 1, n_ids)[1:]
    lesions_per_region = np.bincount(per_lesion.argmax(axis=1), minlength=n_ids) if n_comp else np.zeros(n_ids, int)

    ids = np.concatenate([[0], table["id"].to_numpy()])
    total = lesion_counts.sum()
    region_ml = region_counts[ids] * voxel_ml
    region_ml = np.where(ids == 0, np.nan, region_ml)  # "unlabelled" is everything else: no meaningful volume
    lesion_ml = lesion_counts[ids] * voxel_ml
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(region_ml > 0, lesion_ml / region_ml, np.nan)
    return pd.DataFrame(
        {
            "region": ids,
            "name": [UNLABELLED, *table["name"].astype(str)],
            "short": [UNLABELLED, *table["short" if "short" in table.columns else "name"].astype(str)],
            "lesion_ml": lesion_ml,
            "region_ml": region_ml,
            "lesion_fraction": fraction,
            "load_share": lesion_counts[ids] / total if total else np.zeros(len(ids)),
            "n_lesions": lesions_per_region[ids].astype(int),
            "assigned_ml": assigned[ids] * voxel_ml,
        }
    )


def _image(img_or_path, subject: str | None, what: str) -> tuple[nib.Nifti1Image, str]:
    if isinstance(img_or_path, (str, os.PathLike)):
        return load_nifti(img_or_path, subject=subject, what=what), str(img_or_path)
    return img_or_path, str(img_or_path.get_filename() or what)


def regional_loads_img(
    lesion_img,
    regions_img,
    table: pd.DataFrame | str | os.PathLike,
    subject: str | None = None,
    ignore_label: int | None = None,
    fill_from: Iterable[int] | None = None,
    brain_img=None,
    max_distance_mm: float | None = None,
) -> pd.DataFrame:
    """:func:`regional_loads` for images or paths; all must share one grid (the voxel size comes from it)."""
    les, les_name = _image(lesion_img, subject, "lesion mask")
    reg, reg_name = _image(regions_img, subject, "region map")
    check_same_grid(les, reg, les_name, reg_name, subject=subject)
    brain = None
    if brain_img is not None and str(brain_img) not in ("", "nan"):
        brain_nii, brain_name = _image(brain_img, subject, "brain mask")
        check_same_grid(les, brain_nii, les_name, brain_name, subject=subject)
        brain = np.asanyarray(brain_nii.dataobj) > 0
    who = f"subject {subject}: {les_name} / {reg_name}" if subject else f"{les_name} / {reg_name}"
    return regional_loads(
        np.asanyarray(les.dataobj),
        np.asanyarray(reg.dataobj),
        les.header.get_zooms()[:3],
        table,
        ignore_label=ignore_label,
        who=who,
        fill_from=fill_from,
        brain=brain,
        max_distance_mm=max_distance_mm,
    )


def cohort_loads(
    records: pd.DataFrame | Iterable[Mapping],
    table: pd.DataFrame | str | os.PathLike,
    lesion: str = "lesion",
    regions: str = "regions",
    subject: str = "subject",
    ignore_label: int | None = None,
    progress: bool = True,
    fill_from: Iterable[int] | None = None,
    brain: str | None = None,
    max_distance_mm: float | None = None,
) -> pd.DataFrame:
    """Tidy loads of many subjects: ``records`` rows give the subject id, lesion path and region-map path.

    ``fill_from`` and the ``brain`` column (brain-mask paths) place lesion voxels outside every region
    (see :func:`regional_loads`).
    """
    rows = records.to_dict("records") if isinstance(records, pd.DataFrame) else list(records)
    table = read_table(table)
    fill_from = None if fill_from is None else tuple(fill_from)
    out = []
    for rec in tqdm(rows, desc="regional loads", disable=not progress):
        loads = regional_loads_img(
            rec[lesion],
            rec[regions],
            table,
            subject=str(rec[subject]),
            ignore_label=ignore_label,
            fill_from=fill_from,
            brain_img=rec.get(brain) if brain else None,
            max_distance_mm=max_distance_mm,
        )
        out.append(loads.assign(subject=str(rec[subject])))
    if not out:
        return pd.DataFrame(columns=["subject", *COLUMNS])
    tidy = pd.concat(out, ignore_index=True)
    return tidy[["subject", *COLUMNS]]


def wide_matrix(
    tidy: pd.DataFrame,
    value: str = "lesion_ml",
    normalise: str | None = None,
    volumes: pd.DataFrame | pd.Series | Mapping | None = None,
    unlabelled: bool = True,
    names: str = "short",
) -> pd.DataFrame:
    """Subjects x regions matrix of ``value`` (columns: region ``short`` names or ``names="name"``, in id order).

    ``normalise="icv"`` or ``"wm"`` divides each subject's row by its intracranial or WM
    volume (mL) and reports percent: ``volumes`` is a Series/mapping subject -> mL, or a
    table with columns ``subject`` and ``icv_ml`` / ``wm_ml``.
    """
    if value not in tidy.columns:
        raise InputError(f"value {value!r} is not a column of the loads table ({list(tidy.columns)})")
    data = tidy if unlabelled else tidy[tidy["region"] != 0]
    order = data.drop_duplicates("region").sort_values("region")[names].tolist()
    wide = data.pivot(index="subject", columns=names, values=value)[order]
    wide.columns.name = "region"
    if normalise is None:
        return wide
    if normalise not in ("icv", "wm"):
        raise InputError(f"normalise must be None, 'icv' or 'wm', got {normalise!r}")
    if volumes is None:
        raise InputError(f"normalise={normalise!r} needs the per-subject volumes (mL)")
    if isinstance(volumes, pd.DataFrame):
        col = f"{normalise}_ml"
        if col not in volumes.columns or "subject" not in volumes.columns:
            raise InputError(f"volumes table needs columns subject and {col}, has {list(volumes.columns)}")
        volumes = volumes.set_index(volumes["subject"].astype(str))[col]
    volumes = pd.Series(volumes, dtype=float)
    missing = sorted(set(wide.index) - set(volumes.index))
    if missing:
        raise InputError(f"no {normalise} volume for subjects {missing[:10]}")
    return wide.div(volumes.loc[wide.index], axis=0) * 100.0


# The three ways to pair lesions with regions: (lesion column, region column) of a records table.
PAIRINGS = {
    "reference": ("lesion", "regions"),  # reference lesions x atlas-registered regions
    "lesion_pred": ("lesion_pred", "regions"),  # predicted lesions x atlas-registered regions
    "predicted": ("lesion_pred", "regions_pred"),  # predicted lesions x predicted regions: fully automatic
}


def cohort_pairings(
    records: pd.DataFrame,
    table: pd.DataFrame | str | os.PathLike,
    pairings: Mapping[str, tuple[str, str]] = PAIRINGS,
    ignore_label: int | None = 2,
    progress: bool = True,
    **fill,
) -> pd.DataFrame:
    """:func:`cohort_loads` for each named pairing of lesion and region columns, stacked with a ``pairing`` column.

    ``ignore_label=2`` drops the challenge's "other pathology" label from reference masks; ``fill``
    (``fill_from``, ``brain``, ``max_distance_mm``) goes to :func:`cohort_loads`.
    """
    parts = [
        cohort_loads(
            records, table, lesion=les, regions=reg, ignore_label=ignore_label, progress=progress, **fill
        ).assign(pairing=name)
        for name, (les, reg) in pairings.items()
    ]
    tidy = pd.concat(parts, ignore_index=True)
    return tidy[["pairing", "subject", *COLUMNS]]


def lesion_qc(tidy: pd.DataFrame) -> pd.DataFrame:
    """Per pairing and subject: total lesion mL, mL placed by nearest region, mL and fraction left in no region."""
    keys = [k for k in ("pairing", "subject") if k in tidy.columns]
    grouped = tidy.groupby(keys)
    out = pd.DataFrame(
        {
            "lesion_ml": grouped["lesion_ml"].sum(),
            "assigned_ml": grouped["assigned_ml"].sum(),
            "unassigned_ml": tidy[tidy["region"] == 0].groupby(keys)["lesion_ml"].sum(),
        }
    )
    out["unassigned_ml"] = out["unassigned_ml"].fillna(0.0)
    out["unassigned_fraction"] = (out["unassigned_ml"] / out["lesion_ml"].where(out["lesion_ml"] > 0)).fillna(0.0)
    return out.reset_index()


def write_loads(
    tidy: pd.DataFrame, out: str | os.PathLike, extra: Sequence[pd.DataFrame] = (), lesions: pd.DataFrame | None = None
) -> dict[str, Path]:
    """The localization step's tables in ``out``: ``regional_loads.csv`` (``tidy`` and the ``extra`` tidy tables:
    classes, depth, bullseye), ``regional_loads_wide.csv`` (mL per region, a row per pairing and subject of
    ``tidy``), ``lesion_qc.csv`` (:func:`lesion_qc`) and, when given, ``lesions.csv`` (one row per lesion).
    Each is rewritten only when its bytes change."""
    out = Path(out)
    wide = pd.concat({p: wide_matrix(t) for p, t in tidy.groupby("pairing")}, names=["pairing", "subject"])
    paths = {
        "loads": write_table_atomic(
            pd.concat([tidy, *extra], ignore_index=True),
            out / artefacts.REGIONAL_LOADS.path,
            index=False,
            float_format="%.6g",
        ),
        "wide": write_table_atomic(wide, out / artefacts.REGIONAL_LOADS_WIDE.path, float_format="%.6g"),
        "qc": write_table_atomic(lesion_qc(tidy), out / artefacts.LESION_QC.path, index=False),
    }
    if lesions is not None:
        paths["lesions"] = write_table_atomic(lesions, out / artefacts.LESIONS.path, index=False, float_format="%.6g")
    return paths


def load_agreement(
    tidy: pd.DataFrame, other: str, reference: str = "reference", value: str = "lesion_ml"
) -> pd.DataFrame:
    """Per subject, how far the ``other`` pairing's regional loads are from the ``reference`` pairing's.

    Columns: total_ref and total_other (sum of ``value``), abs_error (sum over regions of
    |other - ref|), rel_error (abs_error / total_ref) and pearson_r across regions.
    """
    wide = tidy[tidy["pairing"].isin([reference, other])].pivot_table(
        index=["subject", "region"], columns="pairing", values=value
    )
    if reference not in wide.columns or other not in wide.columns:
        raise InputError(
            f"pairings {reference!r} and {other!r} must both be in the table, found {sorted(tidy['pairing'].unique())}"
        )
    wide = wide.dropna()
    diff = (wide[other] - wide[reference]).abs()
    out = pd.DataFrame(
        {
            "total_ref": wide[reference].groupby(level="subject").sum(),
            "total_other": wide[other].groupby(level="subject").sum(),
            "abs_error": diff.groupby(level="subject").sum(),
        }
    )
    out["rel_error"] = out["abs_error"] / out["total_ref"].where(out["total_ref"] > 0)
    out["pearson_r"] = [wide.loc[s, reference].corr(wide.loc[s, other]) for s in out.index]
    return out


@dataclass
class SubjectReport:
    """A subject's total load and the regions holding most of it."""

    subject: str
    total_ml: float
    n_lesions: int
    unlabelled_ml: float
    top: pd.DataFrame

    def __str__(self) -> str:
        lines = [
            f"subject {self.subject}: {self.total_ml:.2f} mL in {self.n_lesions} lesions "
            f"({self.unlabelled_ml:.2f} mL outside the regions)"
        ]
        lines += [
            f"  {r.short}: {r.lesion_ml:.2f} mL ({100 * r.load_share:.0f}% of the load, "
            f"{100 * r.lesion_fraction:.2f}% of the region)"
            for r in self.top.itertuples()
        ]
        return "\n".join(lines)


def subject_report(tidy: pd.DataFrame, subject: str, top: int = 5) -> SubjectReport:
    """Total load, number of lesions and the ``top`` regions by lesion volume of one subject."""
    rows = tidy[tidy["subject"].astype(str) == str(subject)]
    if rows.empty:
        raise InputError(f"subject {subject} is not in the loads table")
    labelled = rows[(rows["region"] != 0) & (rows["lesion_ml"] > 0)]
    return SubjectReport(
        subject=str(subject),
        total_ml=float(rows["lesion_ml"].sum()),
        n_lesions=int(rows["n_lesions"].sum()),
        unlabelled_ml=float(rows.loc[rows["region"] == 0, "lesion_ml"].sum()),
        top=labelled.nlargest(top, "lesion_ml")[
            ["region", "short", "name", "lesion_ml", "load_share", "lesion_fraction", "n_lesions"]
        ].reset_index(drop=True),
    )


def load_image(regions_img: nib.spatialimages.SpatialImage, values: Mapping[int, float] | pd.Series) -> nib.Nifti1Image:
    """A float image on the region map's grid where every voxel of region ``id`` holds ``values[id]``."""
    regions = np.rint(np.asanyarray(regions_img.dataobj)).astype(np.int64)
    values = pd.Series(values, dtype=float)
    lut = np.zeros(max(int(regions.max(initial=0)), int(values.index.max()) if len(values) else 0) + 1, np.float32)
    lut[values.index.astype(int)] = values.to_numpy()
    lut[0] = 0.0
    return nib.Nifti1Image(lut[regions], regions_img.affine)
