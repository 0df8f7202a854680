"""One clinical location class per lesion: periventricular, juxtacortical, infratentorial or deep WM.

The classes are those of the MAGNIMS 2016 / McDonald 2017 criteria as LST-AI (Wiltgen et al. 2024)
annotates them: a lesion (26-connected component) is periventricular when it touches the lateral
ventricles, juxtacortical when it touches the cortex (no WM in between), infratentorial when it
touches or lies in the brainstem or cerebellum, and deep (subcortical) WM otherwise. "Touches"
is LST-AI's one-voxel 3x3x3 dilation of the lesion; a ``distance_mm`` instead uses distances in mm
(voxel sizes), the same on any grid. The ventricles include their wall: the non-WM voxels within
``wall_mm`` of the CSF (the partial-volume lining that T1 tissue maps class as CSF or GM), so a lesion
with no WM between it and the ventricle is periventricular, as one with no WM between it and the
cortex is juxtacortical. As LST-AI does, lesion voxels never count as ventricle or
cortex (a lesion segmented as grey matter is not cortex). Each lesion gets one class, the first
of ``priority`` it satisfies; see :data:`PRIORITY`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from . import artefacts
from .atlas import NON_WM
from .errors import InputError
from .images import check_labels, check_same_grid, like, load_nifti
from .metrics import lesions
from .wmdepth import bounding_box, cortex_mask, lateral_ventricles, nearest_region

PERIVENTRICULAR, JUXTACORTICAL, INFRATENTORIAL, DEEP = 1, 2, 3, 4
#: Order in which the classes are tested; a lesion takes the first that applies, else deep WM.
#: Infratentorial first: it is an anatomical compartment (a brainstem lesion beside the fourth
#: ventricle or the aqueduct stays infratentorial), then the McDonald 2017 order periventricular >
#: juxtacortical. LST-AI's code tests periventricular before infratentorial; with lateral
#: ventricles only the two rarely meet. Pass ``priority=(1, 3, 2)`` to reproduce LST-AI exactly.
PRIORITY = (INFRATENTORIAL, PERIVENTRICULAR, JUXTACORTICAL)
#: JHU Eve Type-II ids of the brainstem and cerebellum: cerebellum, corticospinal tract, inferior/superior/
#: middle cerebellar peduncles, medial lemniscus, pontine crossing tract, red nucleus, substantia nigra,
#: midbrain, pons, medulla (left, then right). The rest of refined labels 35/36 is supratentorial
#: (amygdala, hippocampus, caudate, putamen, thalamus, globus pallidus).
INFRATENTORIAL_TYPE2 = (
    28,
    29,
    30,
    31,
    32,
    49,
    50,
    56,
    57,
    63,
    64,
    65,
    93,
    94,
    95,
    96,
    97,
    114,
    115,
    121,
    122,
    128,
    129,
    130,
)
#: Refined regions whose lowest voxels mark the tentorial level: posterior thalamic radiation / posterior
#: corona radiata / retrolenticular internal capsule / tapetum, left and right (they end just above the
#: tentorial notch; on Eve a cut at their 1st height percentile keeps 98% of the infratentorial WM of
#: labels 35/36 with 99% precision).
TENTORIAL_LANDMARKS = (13, 30)
COLUMNS = ["subject", "lesion", "class_id", "class", "n_voxels", "volume_ml", "x_mm", "y_mm", "z_mm", "region"]


def location_class_table() -> pd.DataFrame:
    """Label table (id, name, short, r, g, b) of the lesion class image, usable as a region table."""
    return pd.DataFrame(
        {
            "id": [0, PERIVENTRICULAR, JUXTACORTICAL, INFRATENTORIAL, DEEP],
            "name": ["no lesion", "periventricular", "juxtacortical", "infratentorial", "deep white matter"],
            "short": ["none", "PV", "JC", "IT", "DWM"],
            "r": [0, 230, 60, 150, 250],
            "g": [0, 97, 170, 90, 200],
            "b": [0, 1, 60, 220, 40],
        }
    )


def atlas_infratentorial(type2: np.ndarray | nib.spatialimages.SpatialImage) -> np.ndarray | nib.Nifti1Image:
    """Brainstem + cerebellum mask of a JHU Eve Type-II map (array or uint8 image, as given).

    Carried onto a subject with its atlas transform (:func:`wmloc_utils.registration.warp_mask`),
    it is the ``infratentorial`` mask :func:`classify_subject` prefers over its fallback.
    """
    is_img = isinstance(type2, nib.spatialimages.SpatialImage)
    data = np.rint(np.asanyarray(type2.dataobj) if is_img else np.asarray(type2)).astype(np.int64)
    mask = np.isin(data, INFRATENTORIAL_TYPE2)
    return like(type2, mask, np.uint8) if is_img else mask


def _height(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World superior coordinate (mm, RAS+ z) of every voxel centre."""
    i, j, k = np.ogrid[tuple(slice(0, n) for n in shape[:3])]
    a = np.asarray(affine, float)
    return a[2, 0] * i + a[2, 1] * j + a[2, 2] * k + a[2, 3]


def infratentorial_from_regions(
    ids: np.ndarray,
    brain: np.ndarray,
    affine: np.ndarray,
    zooms,
    near_ids: np.ndarray | None = None,
    landmarks: Sequence[int] = TENTORIAL_LANDMARKS,
    percentile: float = 1.0,
) -> np.ndarray:
    """Fallback infratentorial mask from a refined region map (labels 0..36, possibly kept inside WM).

    A brain voxel is infratentorial when its nearest labelled voxel (mm) is 35/36 (non-WM and
    infratentorial structures) and it lies below the tentorial level: the ``percentile`` of the
    world height of the ``landmarks`` regions (:data:`TENTORIAL_LANDMARKS`). The height cut
    removes the supratentorial part of 35/36 (thalamus, basal ganglia, hippocampus, amygdala).
    Axial in world space, so it assumes a roughly upright head. Raises :class:`InputError`
    without landmark voxels.
    """
    ids = np.asarray(ids)
    mark = np.isin(ids, landmarks)
    if not mark.any():
        raise InputError(
            f"region map has no voxel of regions {list(landmarks)}: cannot place the tentorial level "
            f"(pass an infratentorial mask instead)"
        )
    height = np.broadcast_to(_height(ids.shape, affine), ids.shape)
    level = np.percentile(height[mark], percentile)
    near_ids = nearest_region(ids, zooms) if near_ids is None else near_ids
    return np.asarray(brain, bool) & np.isin(near_ids, NON_WM) & (height < level)


def _reach(mask: np.ndarray, zooms, distance_mm: float | None) -> np.ndarray:
    """Voxels touching ``mask`` (26-neighbours, LST-AI's 3x3x3 dilation) or within ``distance_mm`` of it."""
    if distance_mm is None:
        return ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))
    if not mask.any():
        return np.zeros(mask.shape, bool)
    return ndimage.distance_transform_edt(~mask, sampling=tuple(float(z) for z in zooms)) <= distance_mm


def classify_lesions(
    lesion: np.ndarray,
    ventricles: np.ndarray,
    cortex: np.ndarray,
    infratentorial: np.ndarray,
    zooms,
    distance_mm: float | None = None,
    priority: Sequence[int] = PRIORITY,
) -> tuple[np.ndarray, np.ndarray]:
    """Components of ``lesion`` (26-connected) and the class of each: (label array, classes[0..n-1]).

    A lesion is periventricular / juxtacortical / infratentorial when it touches (or, given
    ``distance_mm``, comes within that many mm of) the ventricles / cortex / infratentorial mask;
    lesion voxels are removed from the ventricles and cortex first. The first class of
    ``priority`` that applies wins; otherwise the lesion is deep WM (:data:`DEEP`).
    """
    lesion = np.asarray(lesion, bool)
    masks = {PERIVENTRICULAR: ventricles, JUXTACORTICAL: cortex, INFRATENTORIAL: infratentorial}
    for key, name in (
        (PERIVENTRICULAR, "ventricle mask"),
        (JUXTACORTICAL, "cortex mask"),
        (INFRATENTORIAL, "infratentorial mask"),
    ):
        if np.shape(masks[key]) != lesion.shape:
            raise InputError(
                f"{name} has shape {np.shape(masks[key])}, lesion mask {lesion.shape}: all maps must share one grid"
            )
    if sorted(priority) != sorted(set(priority)) or not set(priority) <= set(masks):
        raise InputError(f"priority must list distinct classes among {sorted(masks)}, got {list(priority)}")
    if distance_mm is not None and not distance_mm >= 0:
        raise InputError(f"distance_mm must be >= 0 mm or None (touching), got {distance_mm}")
    components, n = lesions(lesion)
    classes = np.full(n, DEEP, np.int16)
    if n == 0:
        return components, classes
    # only the lesions' surroundings matter: work in their bounding box grown by the reach
    margin = 2 if distance_mm is None else int(math.ceil(distance_mm / min(float(z) for z in zooms))) + 2
    box = bounding_box(lesion, margin)
    comp, les = components[box], lesion[box]
    decided = np.zeros(n + 1, bool)
    for cls in priority:
        structure = np.asarray(masks[cls], bool)[box]
        if cls != INFRATENTORIAL:  # as in LST-AI, lesion voxels count as WM, never as ventricle or cortex
            structure = structure & ~les
        hit = np.bincount(comp[les & _reach(structure, zooms, distance_mm)], minlength=n + 1) > 0
        new = hit & ~decided
        classes[new[1:]] = cls
        decided |= hit
    return components, classes


def class_image(components: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Label array of the lesion classes (0 none, 1..4, see :func:`location_class_table`) from :func:`classify_lesions`."""
    lut = np.concatenate([[0], np.asarray(classes, np.int16)]).astype(np.uint8)
    return lut[components]


def lesion_table(
    components: np.ndarray,
    classes: np.ndarray,
    regions: np.ndarray,
    affine: np.ndarray,
    zooms,
    subject: str | None = None,
) -> pd.DataFrame:
    """One row per lesion (:data:`COLUMNS`): id, class, size, world centroid (mm) and majority region (ties: lowest id)."""
    n = len(classes)
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("subject", "class") else float) for c in COLUMNS})
    names = location_class_table().set_index("id")["name"]
    voxel_ml = float(np.prod(np.asarray(zooms, float)[:3])) / 1000.0
    inside = components > 0
    counts = np.bincount(components[inside], minlength=n + 1)[1:]
    voxels = np.argwhere(inside)
    labels = components[inside]
    centres = np.stack([np.bincount(labels, weights=voxels[:, a], minlength=n + 1)[1:] for a in range(3)], 1)
    world = nib.affines.apply_affine(affine, centres / counts[:, None])
    ids = np.rint(np.asarray(regions)[inside]).astype(np.int64)
    n_ids = int(ids.max(initial=0)) + 1
    votes = np.bincount(components[inside].astype(np.int64) * n_ids + ids, minlength=(n + 1) * n_ids)
    region = votes.reshape(n + 1, n_ids)[1:].argmax(axis=1)
    return pd.DataFrame(
        {
            "subject": [subject] * n,
            "lesion": np.arange(1, n + 1),
            "class_id": classes.astype(int),
            "class": names.loc[classes].to_numpy(),
            "n_voxels": counts,
            "volume_ml": counts * voxel_ml,
            "x_mm": world[:, 0],
            "y_mm": world[:, 1],
            "z_mm": world[:, 2],
            "region": region,
        }
    )


def ventricle_wall(ventricles: np.ndarray, tissue_labels: np.ndarray, zooms, wall_mm: float = 3.0) -> np.ndarray:
    """The ventricles with their wall: non-WM (class != 3) voxels within ``wall_mm`` of them (0: the ventricles only)."""
    vent = np.asarray(ventricles, bool)
    if wall_mm <= 0 or not vent.any():
        return vent
    box = bounding_box(vent, int(math.ceil(wall_mm / min(float(z) for z in zooms))) + 1)  # the wall is near
    dist = ndimage.distance_transform_edt(~vent[box], sampling=tuple(float(z) for z in zooms))
    out = vent.copy()
    out[box] |= (np.asarray(tissue_labels)[box] != 3) & (dist <= wall_mm)
    return out


def _image(img_or_path, subject: str | None, what: str) -> tuple[nib.spatialimages.SpatialImage, str]:
    if isinstance(img_or_path, (str, os.PathLike)):
        return load_nifti(img_or_path, subject=subject, what=what), str(img_or_path)
    return img_or_path, str(img_or_path.get_filename() or what)


def classify_subject(
    lesion,
    tissue,
    regions,
    brain_mask=None,
    infratentorial=None,
    ventricles=None,
    subject: str | None = None,
    distance_mm: float | None = None,
    wall_mm: float = 3.0,
    csf_labels: tuple[int, ...] = (1,),
    min_depth_mm: float = 15.0,
    ignore_label: int | None = None,
    priority: Sequence[int] = PRIORITY,
) -> dict:
    """Lesion classes of one subject from images or paths on one grid: ``{"table": DataFrame, "classes": image}``.

    ``tissue`` holds 0 background, 1 CSF, 2 GM, 3 WM (notebook 03's ``tissue.nii.gz``), ``regions``
    the refined ids 0..36, ``brain_mask`` defaults to ``tissue > 0``. The lateral ventricles are
    ``ventricles`` (e.g. the ``"ventricles"`` image of :func:`wmdepth.depth_maps`, saves time) or
    come from :func:`wmdepth.lateral_ventricles` (CSF = ``csf_labels``), grown by their wall
    (:func:`ventricle_wall`, ``wall_mm``); the cortex from :func:`wmdepth.cortex_mask`, the
    infratentorial compartment from ``infratentorial`` (a mask, e.g. the warped
    :func:`atlas_infratentorial`) or else :func:`infratentorial_from_regions`. ``ignore_label``
    (e.g. 2, "other pathology" of challenge masks) is dropped from the lesion mask.
    An empty lesion mask gives an empty table and an all-zero class image.
    """
    les_img, les_name = _image(lesion, subject, "lesion mask")
    who = f"subject {subject}: " if subject else ""
    imgs = {"tissue map": _image(tissue, subject, "tissue map"), "region map": _image(regions, subject, "region map")}
    if brain_mask is not None:
        imgs["brain mask"] = _image(brain_mask, subject, "brain mask")
    if infratentorial is not None:
        imgs["infratentorial mask"] = _image(infratentorial, subject, "infratentorial mask")
    if ventricles is not None:
        imgs["ventricle mask"] = _image(ventricles, subject, "ventricle mask")
    for what, (img, name) in imgs.items():
        check_same_grid(les_img, img, les_name, what if name == what else f"{what} {name}", subject=subject)
    allowed = (0, 1) if ignore_label is None else (0, 1, ignore_label)
    les = check_labels(les_img, allowed, les_name, subject, what="lesion mask") == 1
    labels = check_labels(imgs["tissue map"][0], (0, 1, 2, 3), imgs["tissue map"][1], subject, what="tissue map")
    ids = check_labels(imgs["region map"][0], range(37), imgs["region map"][1], subject, what="refined region map")
    brain = (np.asanyarray(imgs["brain mask"][0].dataobj) > 0) if brain_mask is not None else labels > 0
    zooms = tuple(float(z) for z in les_img.header.get_zooms()[:3])
    components, classes = np.zeros(les.shape, np.int32), np.zeros(0, np.int16)
    if les.any():
        # the structures only depend on the brain: compute them inside its bounding box
        box = bounding_box(brain | les | (ids > 0), margin=2)
        b_les, b_brain, b_labels, b_ids = les[box], brain[box], labels[box], ids[box]
        try:
            if ventricles is not None:
                vent = np.asanyarray(imgs["ventricle mask"][0].dataobj)[box] > 0
            else:
                vent = lateral_ventricles(
                    b_brain & np.isin(b_labels, csf_labels) & ~b_les, b_brain, zooms, min_depth_mm
                )
            vent = ventricle_wall(vent, b_labels, zooms, wall_mm) & b_brain
            near = nearest_region(b_ids, zooms)
            cortex = cortex_mask(b_labels, b_ids, zooms, near) & b_brain & ~vent
            if infratentorial is not None:
                infra = np.asanyarray(imgs["infratentorial mask"][0].dataobj)[box] > 0
            else:
                shift = np.eye(4)
                shift[:3, 3] = [s.start or 0 for s in box]
                infra = infratentorial_from_regions(b_ids, b_brain, les_img.affine @ shift, zooms, near)
        except InputError as err:
            raise InputError(f"{who}{les_name}: cannot classify the lesions: {err}") from err
        b_comp, classes = classify_lesions(b_les, vent, cortex, infra, zooms, distance_mm, priority)
        components = np.zeros(les.shape, b_comp.dtype)
        components[box] = b_comp
    table = lesion_table(components, classes, ids, les_img.affine, zooms, subject)
    return {"table": table, "classes": like(les_img, class_image(components, classes), np.uint8)}


def classify_cohort(
    records: pd.DataFrame, lesion: str, out_dir: str | os.PathLike, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Location classes of every subject's lesions, from notebook 03's outputs (tissue, regions, brain mask, transform).

    The brainstem and cerebellum come from the Eve atlas through each subject's own atlas transform.
    Writes each subject's map in ``out_dir`` (:data:`artefacts.LESION_CLASS_MAPS`); returns the per-lesion table of all subjects
    and a records table (subject, lesion, classes) for :func:`wmloc_utils.localization.cohort_loads`.
    """
    from tqdm.auto import tqdm

    from . import atlas, registration
    from .images import save_nifti

    infra_atlas = atlas_infratentorial(atlas.load_eve()["type2"])
    tables, rows = [], []
    for r in tqdm(list(records.itertuples()), desc="lesion classes", disable=not progress):
        tissue = load_nifti(r.tissue, r.subject, "tissue map")
        infra = like(tissue, registration.warp_mask(infra_atlas, str(r.transform).split(";"), tissue), np.uint8)
        result = classify_subject(
            getattr(r, lesion), tissue, r.regions, r.brain_mask, infratentorial=infra, subject=r.subject, ignore_label=2
        )
        path = save_nifti(
            result["classes"], os.path.join(out_dir, artefacts.LESION_CLASS_MAPS.path.format(subject=r.subject))
        )
        tables.append(result["table"])
        rows.append({"subject": r.subject, "lesion": getattr(r, lesion), "classes": str(path)})
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(), pd.DataFrame(rows)
