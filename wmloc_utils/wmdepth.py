"""Coarse clinical WM parcellations by depth: periventricular/deep WM and the bullseye.

Computed on a subject's own tissue maps with its real voxel sizes (Euclidean distance
transforms in mm), so they need no registration and work on anisotropic grids. The bullseye
follows Sudre et al. (2018): a normalised depth between the ventricles and the cortex, cut
into equal shells and crossed with lobes (see :func:`wmloc_utils.atlas.lobe_map`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from . import artefacts
from .errors import InputError
from .images import check_labels, like, save_nifti


def _edt(mask: np.ndarray, zooms) -> np.ndarray:
    """Distance in mm from each voxel to the nearest voxel outside ``mask`` (0 outside)."""
    return ndimage.distance_transform_edt(mask, sampling=tuple(float(z) for z in zooms))


def depth_below_surface(brain_mask: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
    """Depth of each voxel of ``brain_mask`` below the brain's surface: the distance in mm to the nearest voxel
    outside it, the volume's edge included (0 outside)."""
    return _edt(np.pad(np.asarray(brain_mask, bool), 1), zooms)[1:-1, 1:-1, 1:-1]


def _check(arr: np.ndarray, name: str, shape: tuple | None = None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise InputError(f"{name} must be a 3D array, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise InputError(f"{name} has shape {arr.shape}, expected {shape} (all maps must share one grid)")
    return arr


def lateral_ventricles(
    csf_mask: np.ndarray,
    brain_mask: np.ndarray,
    zooms,
    min_depth_mm: float = 15.0,
    max_components: int = 2,
    min_fraction: float = 0.1,
) -> np.ndarray:
    """The lateral ventricles, found as the largest CSF components deep inside the brain.

    Heuristic: keep CSF voxels farther than ``min_depth_mm`` from the brain-mask surface (this
    cuts off sulcal and cisternal CSF), label their 26-connected components, and keep at most
    ``max_components`` of the largest ones whose volume is at least ``min_fraction`` of the
    largest (the two lateral ventricles, or one when they touch). The outermost
    ``min_depth_mm`` of a ventricle (e.g. the tip of a temporal horn) is thereby left out.
    Raises :class:`InputError` when no CSF lies that deep.
    """
    csf = _check(csf_mask, "CSF mask").astype(bool)
    brain = _check(brain_mask, "brain mask", csf.shape).astype(bool)
    if not brain.any():
        raise InputError("brain mask is empty")
    depth = depth_below_surface(brain, zooms)
    deep = csf & brain & (depth > min_depth_mm)
    comps, n = ndimage.label(deep, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        raise InputError(
            f"no CSF voxel lies deeper than {min_depth_mm} mm inside the brain: cannot find the "
            f"lateral ventricles (check the CSF and brain masks, or lower min_depth_mm)"
        )
    sizes = np.bincount(comps.ravel())[1:]
    order = np.argsort(sizes)[::-1][:max_components]
    keep = [i + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    return np.isin(comps, keep)


def periventricular_deep(wm_mask: np.ndarray, ventricles: np.ndarray, zooms, distance_mm: float = 10.0) -> np.ndarray:
    """Split WM into periventricular (1: within ``distance_mm`` of the ventricles) and deep (2) WM; 0 elsewhere."""
    wm = _check(wm_mask, "WM mask").astype(bool)
    vent = _check(ventricles, "ventricle mask", wm.shape).astype(bool)
    if not vent.any():
        raise InputError("ventricle mask is empty: cannot measure the distance to the ventricles")
    dist = _edt(~vent, zooms)
    out = np.zeros(wm.shape, np.int16)
    out[wm & (dist <= distance_mm)] = 1
    out[wm & (dist > distance_mm)] = 2
    return out


def periventricular_table(distance_mm: float = 10.0) -> pd.DataFrame:
    """Label table (id, name, r, g, b) of :func:`periventricular_deep`."""
    return pd.DataFrame(
        {
            "id": [0, 1, 2],
            "name": ["outside WM", f"periventricular WM (<= {distance_mm:g} mm)", f"deep WM (> {distance_mm:g} mm)"],
            "r": [0, 230, 60],
            "g": [0, 97, 120],
            "b": [0, 1, 200],
        }
    )


def normalised_depth(
    wm_mask: np.ndarray,
    ventricles: np.ndarray,
    zooms,
    cortex: np.ndarray | None = None,
    ventricle_margin_mm: float = 3.0,
) -> np.ndarray:
    """Normalised WM depth ``d = dist_vent / (dist_vent + dist_cortex)`` in [0, 1] (0 at the ventricles); NaN outside WM.

    ``cortex`` is the outer boundary the depth is measured to (default: every non-WM voxel, so
    cortex and deep grey nuclei); voxels within ``ventricle_margin_mm`` of the ventricles are never
    cortex (the ventricles' partial-volume rim would otherwise make periventricular WM "cortical").
    """
    wm = _check(wm_mask, "WM mask").astype(bool)
    vent = _check(ventricles, "ventricle mask", wm.shape).astype(bool)
    if not vent.any():
        raise InputError("ventricle mask is empty: cannot measure the distance to the ventricles")
    d_vent = _edt(~vent, zooms)
    outer = ~wm if cortex is None else _check(cortex, "cortex mask", wm.shape).astype(bool)
    outer &= d_vent > ventricle_margin_mm
    if not outer.any():
        raise InputError("cortex mask is empty: cannot measure the distance to the cortex")
    d_ctx = _edt(~outer, zooms)
    with np.errstate(invalid="ignore", divide="ignore"):
        depth = d_vent / (d_vent + d_ctx)
    depth[~wm] = np.nan
    return depth


def bullseye(
    wm_mask: np.ndarray,
    ventricles: np.ndarray,
    lobes: np.ndarray,
    zooms,
    n_shells: int = 4,
    cortex: np.ndarray | None = None,
) -> np.ndarray:
    """The bullseye parcellation: ``code = lobe * 10 + shell`` inside WM (0 elsewhere).

    ``shell`` 1..``n_shells`` cuts the normalised depth (:func:`normalised_depth`) into equal
    intervals, 1 next to the ventricles, ``n_shells`` next to the cortex. ``lobe`` is the lobe
    code of each voxel (e.g. :func:`wmloc_utils.atlas.lobe_map`); WM voxels with lobe 0 get 0.
    """
    if not 1 <= n_shells <= 9:
        raise InputError(f"n_shells must be between 1 and 9 (code = lobe*10 + shell), got {n_shells}")
    wm = _check(wm_mask, "WM mask").astype(bool)
    lob = _check(lobes, "lobe map", wm.shape).astype(np.int64)
    depth = normalised_depth(wm, ventricles, zooms, cortex)
    shell = np.clip(np.floor(np.nan_to_num(depth) * n_shells).astype(np.int64) + 1, 1, n_shells)
    out = np.where(wm & (lob > 0), lob * 10 + shell, 0)
    return out.astype(np.int16)


def bullseye_table(n_shells: int = 4) -> pd.DataFrame:
    """Label table (id, lobe, hemisphere, shell, name, r, g, b) of :func:`bullseye` with the atlas lobe codes.

    Each lobe has one hue; shells darken from the ventricles (1) to the cortex (``n_shells``).
    """
    import colorsys

    from .atlas import lobe_table

    rows = [(0, "background", "-", 0, "background", 0, 0, 0)]
    lobes = lobe_table()
    lobes = lobes[lobes["code"] > 0]
    for row in lobes.itertuples():
        hue = ((row.code - 1) // 2) / len(lobes) * 2
        for s in range(1, n_shells + 1):
            val = 1.0 - 0.55 * (s - 1) / max(n_shells - 1, 1)
            sat = 0.45 if row.hemisphere == "R" else 0.85
            r, g, b = (round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val))
            rows.append((row.code * 10 + s, row.lobe, row.hemisphere, s, f"{row.name} shell {s}", r, g, b))
    return pd.DataFrame(rows, columns=["id", "lobe", "hemisphere", "shell", "name", "r", "g", "b"])


def nearest_region(ids: np.ndarray, zooms) -> np.ndarray:
    """For every voxel, the id of the nearest labelled voxel of the region map ``ids`` (in mm; itself where labelled)."""
    ids = np.asarray(ids)
    if not (ids > 0).any():
        raise InputError("region map is empty: no labelled voxel to take the nearest region from")
    nearest = ndimage.distance_transform_edt(
        ids == 0, sampling=tuple(float(z) for z in zooms), return_distances=False, return_indices=True
    )
    return ids[tuple(nearest)]


def cortex_mask(tissue_labels: np.ndarray, ids: np.ndarray, zooms, near_ids: np.ndarray | None = None) -> np.ndarray:
    """The cortical ribbon: non-WM voxels, grey matter (class 2) or atlas-labelled, whose nearest region is gyral.

    Subject region maps are kept inside WM, so a grey-matter voxel takes the lobe of its nearest
    region (:func:`nearest_region`, or ``near_ids`` when already computed); voxels next to deep,
    callosal or infratentorial regions (deep grey nuclei, cerebellum) are not cortex.
    """
    from .atlas import lobe_map

    labels = np.asarray(tissue_labels)
    ids = np.asarray(ids)
    near_ids = nearest_region(ids, zooms) if near_ids is None else near_ids
    cortical = [2 * i + s for i in range(5) for s in (1, 2)]  # frontal, parietal, occipital, temporal, limbic
    return (labels != 3) & ((ids > 0) | (labels == 2)) & np.isin(lobe_map(near_ids), cortical)


def depth_maps(
    tissue: nib.spatialimages.SpatialImage,
    brain_mask: nib.spatialimages.SpatialImage | None = None,
    regions: nib.spatialimages.SpatialImage | None = None,
    distance_mm: float = 10.0,
    n_shells: int = 4,
    min_depth_mm: float = 15.0,
    csf_labels: tuple[int, ...] = (1,),
) -> dict[str, nib.Nifti1Image]:
    """Image-level wrapper: ventricles, periventricular/deep and (given refined ``regions``) bullseye images.

    ``tissue`` holds 0 background, 1 CSF, 2 GM, 3 WM (the Eve / Atropos convention); the brain
    mask defaults to ``tissue > 0``. CSF is the voxels of the brain mask with a class in
    ``csf_labels``: use ``(0,)`` with the Eve atlas, whose tissue map leaves the ventricles
    unclassified (0) inside the brain mask and uses class 1 for dark partial-volume tissue.
    ``regions`` (refined ids 0..36, same grid) give the lobes, with deep regions absorbed by the nearest
    lobe, and the cortex (outer end of the depth): non-WM voxels (atlas-labelled or grey matter) whose
    nearest region is gyral. This works on the atlas and on subject maps kept inside WM alike.
    All distances use the image's voxel sizes.
    """
    from .atlas import lobe_map
    from .images import check_same_grid

    name = tissue.get_filename() or "tissue map"
    labels = check_labels(tissue, [0, 1, 2, 3], name, what="tissue classes")
    zooms = tuple(float(z) for z in tissue.header.get_zooms()[:3])
    if brain_mask is not None:
        check_same_grid(tissue, brain_mask, "tissue map", "brain mask")
        brain = np.asanyarray(brain_mask.dataobj) > 0
    else:
        brain = labels > 0
    # work inside the bounding box of the brain: distances inside it are unchanged
    ids = None
    if regions is not None:
        check_same_grid(tissue, regions, "tissue map", "region map")
        ids = np.asanyarray(regions.dataobj)
    box = bounding_box(brain | (labels == 3) | (ids > 0 if ids is not None else False), margin=2)
    labels, brain = labels[box], brain[box]
    wm = labels == 3
    vent = lateral_ventricles(brain & np.isin(labels, csf_labels), brain, zooms, min_depth_mm=min_depth_mm)
    maps = {
        "ventricles": (vent, np.uint8),
        "periventricular": (periventricular_deep(wm, vent, zooms, distance_mm), np.int16),
    }
    if ids is not None:
        ids = ids[box]
        lobes = lobe_map(ids, absorb_deep=True, zooms=zooms)
        cortex = cortex_mask(labels, ids, zooms)
        maps["bullseye"] = (bullseye(wm, vent, lobes, zooms, n_shells, cortex=cortex), np.int16)
    out = {}
    for key, (arr, dtype) in maps.items():  # back onto the full grid
        full = np.zeros(tissue.shape[:3], dtype)
        full[box] = arr
        out[key] = like(tissue, full, dtype)
    return out


def cohort_depth_maps(
    records: pd.DataFrame,
    workdir: str | os.PathLike,
    lesion_col: str,
    distance_mm: float = 10.0,
    n_shells: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """Notebook 07's depth step: every subject's periventricular/deep and bullseye maps, written to its folder.

    ``records`` needs ``subject``, ``tissue`` and ``regions`` (notebook 03) and ``lesion_col``/``lesion_pred``.
    A subject whose regions leave no cortex to end the depth gets periventricular/deep only (printed).
    Returns one row per subject: subject, lesion, lesion_pred and the map paths (bullseye NaN when missing).
    """
    rows = []
    for r in tqdm(records.itertuples(), total=len(records), desc="depth maps", disable=not progress):
        tissue = nib.load(r.tissue)
        try:
            maps = depth_maps(tissue, regions=nib.load(r.regions), distance_mm=distance_mm, n_shells=n_shells)
        except InputError as err:  # the bullseye needs cortex around the gyral regions
            print(f"subject {r.subject}: periventricular/deep only, no bullseye ({err})")
            maps = depth_maps(tissue, distance_mm=distance_mm)
        paths = {
            k: str(save_nifti(v, artefacts.path(workdir, artefacts.DEPTH_MAPS, subject=r.subject, map=k)))
            for k, v in maps.items()
            if k != "ventricles"
        }
        rows.append({"subject": r.subject, "lesion": getattr(r, lesion_col), "lesion_pred": r.lesion_pred, **paths})
    return pd.DataFrame(rows, columns=["subject", "lesion", "lesion_pred", "periventricular", "bullseye"])


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (whole array if empty): saves time."""
    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
