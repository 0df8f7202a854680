"""Atlas-to-subject registration (ANTsPy) and propagation of the refined region labels into subject WM.

As in the paper, the Eve white matter is registered (affine) to each subject's own white
matter, and the refined labels are carried along and kept inside the subject's WM mask;
WM voxels the atlas leaves unlabelled take the nearest region, so every WM voxel has one.
The Eve header has no origin, so every registration starts from the centre of mass.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ants
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from . import artefacts, cluster, provenance
from .antsio import coarsen, remove_files, seed_ants, to_ants
from .atlas import EVE_FILES, LABEL_IDS, WM_REGIONS, load_eve, refined_atlas
from .errors import InputError
from .images import atomic_path, check_labels, check_same_grid, like, load_nifti, same_grid, save_nifti
from .metrics import dice
from .subjects import register_t1_to_flair
from .tissue import ATROPOS_ITERATIONS, ATROPOS_START, bias_corrected, segment_tissues
from .tissue import brain_mask as make_brain_mask

if TYPE_CHECKING:
    from dask.distributed import Client

METHODS = ("Affine", "AffineFast", "SyN")
ERRORS = ("raise", "record")  # run_cohort: stop at a failed subject, or record it and go on
REGION_TARGETS = ("registered", "authors")  # the region maps regions.csv hands on: ours, or the paper authors'
DONE = "qc.json"
T1_ON_FLAIR = "t1_on_flair.nii.gz"
# the bias-corrected images notebook 06 and the apply path give the networks (FLAIR grid; trained on the raw ones)
BIAS_CORRECTED = {"t1": "t1_corrected.nii.gz", "flair": "flair_corrected.nii.gz"}
T1_REG_SPACING = 2.0  # mm: grid of the rigid T1-to-FLAIR registration (the transform resamples the full T1)
ATLAS_GREY = "atlas_grey_matter.nii.gz"  # Eve's grey matter on the FLAIR grid, by a nonlinear fit (fit_grey_matter)
GREY_SPACING = 2.0  # mm: grid of that fit


# ---------------------------------------------------------------- registration
def register_atlas(
    atlas_wm: nib.spatialimages.SpatialImage,
    subject_wm: nib.spatialimages.SpatialImage,
    outprefix: str | os.PathLike,
    method: str = "Affine",
    reg_spacing: float | None = 3.0,
    metric: str = "GC",
    seed: int = 0,
    sampling: float = 1.0,
    mask_mm: float | None = 12.0,
    subject: str | None = None,
) -> dict:
    """Register atlas WM (moving) to subject WM probability/mask (fixed) with ``ants.registration``.

    Starts from the centre-of-mass alignment (ANTs' default ``[fixed,moving,1]`` initialiser) and
    runs at ``reg_spacing`` mm (the transform is physical, so it applies at full resolution) with the
    affine ``metric`` (``"GC"`` global correlation scored best on WM maps, ``"mattes"`` is ANTs' default)
    on ``sampling`` of the voxels (1.0: all, on ANTs' jittered regular grid), inside a fixed mask of the
    subject WM dilated by ``mask_mm`` (None: whole image). The mask keeps the background and atlas WM
    the subject lacks (cerebellum, cut-off slices) out of the metric: measured on the authors' subject
    maps it turned failures (Dice 0.4) into 0.86. ANTs' sampling is seeded (``seed``), so a re-run with
    the same ITK thread count gives byte-identical transforms (wmloc runs ANTs single-threaded: :data:`wmloc_utils.ITK_THREADS`).
    Writes the transform under ``outprefix`` and returns dict(transforms, metric, seconds, method),
    ``transforms`` mapping subject points to atlas points.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0 < sampling <= 1:
        raise ValueError(f"sampling must be a fraction in (0, 1], got {sampling!r}")
    Path(outprefix).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fixed = coarsen(to_ants(subject_wm), reg_spacing)
    moving = coarsen(to_ants(atlas_wm), reg_spacing)
    kwargs = dict(reg_iterations=(40, 20, 0)) if method == "SyN" else {}
    if mask_mm:
        kwargs["mask"] = _wm_mask(fixed, mask_mm, subject)
    seed_ants(seed)
    reg = ants.registration(
        fixed,
        moving,
        type_of_transform=method,
        outprefix=str(outprefix),
        aff_metric=metric,
        aff_random_sampling_rate=sampling,
        **kwargs,
    )
    metric = float(ants.image_similarity(fixed, reg["warpedmovout"], metric_type="MattesMutualInformation"))
    _remove_inverse(reg)
    return {
        "transforms": list(reg["fwdtransforms"]),
        "metric": metric,
        "seconds": time.perf_counter() - start,
        "method": method,
    }


def _wm_mask(wm: ants.ANTsImage, dilate_mm: float, subject: str | None = None) -> ants.ANTsImage:
    """WM (> 0.5) dilated by ``dilate_mm`` (a ball in mm, on the image's own grid): the metric's region."""
    inside = wm.numpy() > 0.5
    if not inside.any():
        raise InputError(
            f"{'subject ' + subject + ': ' if subject else ''}the WM map given to register_atlas has no "
            "voxel above 0.5, so there is nothing to register the atlas to; check the tissue step"
        )
    dist = ndimage.distance_transform_edt(~inside, sampling=wm.spacing)
    return wm.new_image_like((dist <= dilate_mm).astype(np.float32))


def _remove_inverse(reg: dict) -> None:
    """Delete SyN's inverse warp (unused here) so each subject folder keeps only what it needs."""
    for path in reg.get("invtransforms", []):
        if path not in reg["fwdtransforms"]:
            Path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------- label propagation
def fill_wm_labels(labels: np.ndarray, wm: np.ndarray, zooms, regions=WM_REGIONS) -> np.ndarray:
    """Labels restricted to WM; WM voxels without a label take the nearest ``regions`` label (in mm)."""
    labels = np.where(wm, labels, 0).astype(np.int16)
    hole = wm & (labels == 0)
    if not hole.any():
        return labels
    source = np.isin(labels, regions)
    if not source.any():
        raise InputError("no region label overlaps the WM mask: the registration failed")
    # work inside the bounding box of the WM (padded) to keep the distance transform small
    idx = np.argwhere(wm)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, wm.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = labels[box]
    _, near = ndimage.distance_transform_edt(~source[box], sampling=np.asarray(zooms, float)[:3], return_indices=True)
    nearest = sub[tuple(near)]
    sub = np.where(hole[box], nearest, sub)
    labels[box] = sub
    return labels


def propagate_labels(
    refined_atlas: nib.spatialimages.SpatialImage,
    transforms: list[str],
    subject_grid: nib.spatialimages.SpatialImage,
    wm_mask: nib.spatialimages.SpatialImage | np.ndarray,
    subject: str | None = None,
) -> nib.Nifti1Image:
    """Carry the refined labels (0..36) onto the subject grid (``genericLabel``) and keep them inside WM.

    Labels 35/36 (non-WM structures) stay where the subject WM overlaps them; every other WM
    voxel gets a region 1..34 (nearest one where the atlas leaves it unlabelled).
    """
    wm = np.asanyarray(getattr(wm_mask, "dataobj", wm_mask)) > 0
    if wm.shape != subject_grid.shape[:3]:
        raise InputError(
            f"{'subject ' + subject + ': ' if subject else ''}WM mask shape {wm.shape} "
            f"differs from the subject grid {subject_grid.shape[:3]}"
        )
    if not wm.any():
        raise InputError(f"{'subject ' + subject + ': ' if subject else ''}WM mask is empty, no voxel to label")
    # resample only inside the WM bounding box (+2 voxels): genericLabel costs per output voxel
    idx = np.argwhere(wm)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, wm.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    reference = ants.crop_indices(to_ants(subject_grid), lo.tolist(), hi.tolist())
    warped = ants.apply_transforms(reference, to_ants(refined_atlas), transforms, interpolator="genericLabel")
    labels = np.zeros(wm.shape, np.int16)
    labels[box] = np.rint(warped.numpy()).astype(np.int16)
    labels = fill_wm_labels(labels, wm, subject_grid.header.get_zooms()[:3])
    return like(subject_grid, labels.astype(np.uint8))


def warp_mask(
    mask: nib.spatialimages.SpatialImage, transforms: list[str], subject_grid: nib.spatialimages.SpatialImage
) -> np.ndarray:
    """A binary atlas mask carried onto the subject grid (linear, > 0.5)."""
    out = ants.apply_transforms(to_ants(subject_grid), to_ants(mask), transforms, interpolator="linear")
    return out.numpy() > 0.5


def fit_grey_matter(
    t1: nib.spatialimages.SpatialImage,
    brain: nib.spatialimages.SpatialImage,
    affine: list[str],
    atlas: dict,
    outprefix: str | os.PathLike,
    seed: int = 0,
) -> dict:
    """Eve's grey matter (cortex and deep nuclei) on the subject's grid, by a nonlinear fit of the Eve T1 to the T1.

    The affine WM fit carries the WM regions well but cannot place the cortex or the nuclei, and Atropos may take a
    grey matter that is bright on FLAIR for WM: then neither tells a network's false lesions there from WM lesions
    (:func:`wmloc_utils.inference.outside_grey_matter`). SyN (mutual information, 40 x 20 iterations, at
    :data:`GREY_SPACING` mm) starts from the affine fit (``affine``: its transform files) and registers the Eve T1
    (``atlas["t1"]``) to the subject's bias-corrected ``t1`` inside ``brain``. Returns ``{"grey": image (uint8 0/1,
    ``t1``'s grid), "seconds"}``; the warps, written under ``outprefix``, are deleted.
    """
    start = time.perf_counter()
    inside = np.asanyarray(brain.dataobj) > 0
    fixed = coarsen(to_ants(like(t1, np.asanyarray(t1.dataobj, np.float32) * inside)), GREY_SPACING)
    seed_ants(seed)
    reg = ants.registration(
        fixed,
        coarsen(to_ants(atlas["t1"]), GREY_SPACING),
        type_of_transform="SyNOnly",
        initial_transform=list(affine),
        outprefix=str(outprefix),
        reg_iterations=(40, 20, 0),
        syn_metric="mattes",
    )
    grey = warp_mask(atlas["grey"], reg["fwdtransforms"], t1)
    remove_files(Path(f) for f in {*reg["fwdtransforms"], *reg["invtransforms"]} if f not in affine)
    return {"grey": like(t1, grey.astype(np.uint8)), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- one subject, a cohort
def atlas_inputs(workdir: str | os.PathLike | None = None, data_dir=None) -> dict:
    """Atlas WM and grey matter (Eve tissue classes 3 and 2), Eve T1 and refined labels; labels from ``workdir`` when
    notebook 02 wrote them there."""
    eve = load_eve(data_dir)
    classes = np.asanyarray(eve["tissue"].dataobj)
    tissues = {key: like(eve["tissue"], (classes == c).astype(np.float32)) for key, c in (("wm", 3), ("grey", 2))}
    tissues["t1"] = eve["t1"]
    path = artefacts.path(workdir, artefacts.REFINED_ATLAS) if workdir else None
    if path is None or not path.exists():
        return {**tissues, "labels": refined_atlas(data_dir)}
    labels = load_nifti(path, what="refined atlas")  # a user may edit it: it must still be a refined Eve atlas
    check_same_grid(eve["tissue"], labels, "the Eve atlas", f"refined atlas ({path})")
    check_labels(labels, LABEL_IDS + (0,), path, what="refined atlas")
    if not np.isin(np.asanyarray(labels.dataobj), WM_REGIONS).any():
        raise InputError(
            f"{path}: the refined atlas holds none of the WM regions 1..34: rerun notebook "
            f"{artefacts.REFINED_ATLAS.notebook}.ipynb"
        )
    return {**tissues, "labels": labels}


def process_subject(
    subject: str,
    t1,
    flair,
    outdir: str | os.PathLike,
    atlas: dict,
    lesion=None,
    method: str = "Affine",
    reg_spacing: float | None = 3.0,
    truth_dir=None,
    fingerprint: dict | None = None,
) -> dict:
    """Brain mask, tissues, WM mask, registration and region labels of one subject, written to ``outdir``.

    Files: brain_mask, t1_corrected and flair_corrected (N4 bias-corrected; what the networks are applied to), tissue,
    prob_{csf,gm,wm}, wm_mask, regions (.nii.gz, FLAIR grid), the
    transform(s) ``atlas_to_subject_*``, for a T1 on another grid ``t1_on_flair.nii.gz`` (registered
    rigidly once, used for mask and tissues) and ``qc.json`` (written last: the done marker, holding
    ``fingerprint`` and the fingerprints of the written ``outputs`` for :func:`run_cohort`).
    """
    start = time.perf_counter()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    flair_img = load_nifti(flair, subject=subject, what="FLAIR")
    t1_img, t1_on_flair = _t1_on_flair(subject, load_nifti(t1, subject=subject, what="T1"), flair_img, out)
    les_img = None
    if _given(lesion):
        les_img = load_nifti(lesion, subject=subject, what="lesion mask")
        check_same_grid(flair_img, les_img, "FLAIR", "lesion mask", subject)
    steps = {"start": time.perf_counter()}  # seconds of each step, in qc.json
    mask = make_brain_mask(t1_img, flair_img, subject=subject, outprefix=out / "brainmask_")
    remove_files(out.glob("brainmask_*"))
    save_nifti(mask, out / "brain_mask.nii.gz")
    steps["brain_mask"] = time.perf_counter()
    # bias fields corrected once (N4 in the brain); the tissues use the corrected T1, inference both images
    corrected = {m: bias_corrected(img, mask, m.upper(), subject) for m, img in (("t1", t1_img), ("flair", flair_img))}
    for m, img in corrected.items():
        save_nifti(img, out / BIAS_CORRECTED[m])
    steps["bias_correction"] = time.perf_counter()
    seg = segment_tissues(
        corrected["t1"], flair_img, mask, lesion=les_img, n4=False, subject=subject, outprefix=f"{out}{os.sep}"
    )
    steps["tissues"] = time.perf_counter()
    wm = np.asanyarray(seg["wm_mask"].dataobj) > 0
    if not wm.any():
        raise InputError(f"subject {subject}: the tissue segmentation found no white matter (WM mask is empty)")
    save_nifti(seg["wm_mask"], out / "wm_mask.nii.gz")
    qc = {
        "subject": subject,
        "brain_mask": str(out / "brain_mask.nii.gz"),
        "tissue": str(out / "tissue.nii.gz"),
        "prob_wm": str(out / "prob_wm.nii.gz"),
        "wm_mask": str(out / "wm_mask.nii.gz"),
        "t1_on_flair": t1_on_flair,
        **{f"{m}_corrected": str(out / name) for m, name in BIAS_CORRECTED.items()},
        **label_subject(subject, seg["wm"], wm, flair_img, out, atlas, method, reg_spacing),
    }
    grey = fit_grey_matter(corrected["t1"], mask, qc["transform"].split(";"), atlas, out / "grey_fit_")
    qc["atlas_grey_matter"] = str(save_nifti(grey["grey"], out / ATLAS_GREY))
    qc["grey_fit_seconds"] = grey["seconds"]
    if _given(truth_dir) and Path(truth_dir, "tissue.nii.gz").exists():
        true_wm = np.asanyarray(load_nifti(Path(truth_dir) / "tissue.nii.gz", subject, "true tissue").dataobj) == 3
        qc["true_wm_dice"] = dice(wm, true_wm)
    qc["seconds"] = time.perf_counter() - start
    marks = list(steps.values())
    qc.update({f"{name}_seconds": b - a for name, a, b in zip(list(steps)[1:], marks, marks[1:])})
    written = [
        qc["brain_mask"],
        qc["tissue"],
        qc["prob_wm"],
        qc["wm_mask"],
        qc["regions"],
        qc["atlas_grey_matter"],
        t1_on_flair,
        *qc["transform"].split(";"),
    ]
    written += [qc[f"{m}_corrected"] for m in BIAS_CORRECTED]
    qc["fingerprint"] = fingerprint
    qc["outputs"] = {Path(p).name: provenance.file_fingerprint(p) for p in written if p}
    with atomic_path(out / DONE) as tmp:
        tmp.write_text(json.dumps(qc, indent=1))
    return qc


def _given(value) -> bool:
    """A path cell of the subjects table that is filled (not None, empty or NaN)."""
    return value is not None and str(value) not in ("", "nan")


def _t1_on_flair(subject: str, t1_img: nib.Nifti1Image, flair_img: nib.Nifti1Image, out: Path) -> tuple:
    """The T1 on the FLAIR grid and the path it was written to ("" when the T1 already is on that grid).

    A T1 on its own grid is registered rigidly (ANTs, Mattes MI) to the FLAIR once, here, and written
    to ``t1_on_flair.nii.gz`` so that training and inference use the same aligned image.
    """
    path = out / T1_ON_FLAIR
    if same_grid(t1_img, flair_img):
        path.unlink(missing_ok=True)  # left by an earlier run on another T1
        return t1_img, ""
    moved = register_t1_to_flair(t1_img, flair_img, out, subject, reg_spacing=T1_REG_SPACING)
    t1_img = like(flair_img, np.asanyarray(moved.dataobj), np.float32)
    save_nifti(t1_img, path)
    return t1_img, str(path)


def label_subject(
    subject: str,
    wm_prob,
    wm: np.ndarray,
    grid,
    outdir: str | os.PathLike,
    atlas: dict,
    method: str = "Affine",
    reg_spacing: float | None = 3.0,
) -> dict:
    """Register the atlas to one subject's WM and write ``regions.nii.gz`` + transform in ``outdir``; QC dict."""
    out = Path(outdir)
    reg = register_atlas(
        atlas["wm"],
        wm_prob,
        outprefix=out / "atlas_to_subject_",
        method=method,
        subject=subject,
        reg_spacing=reg_spacing,
    )
    t0 = time.perf_counter()
    regions = propagate_labels(atlas["labels"], reg["transforms"], grid, wm, subject=subject)
    save_nifti(regions, out / "regions.nii.gz")
    voxel_ml = float(np.prod(grid.header.get_zooms()[:3])) / 1000
    return {
        "method": method,
        "regions": str(out / "regions.nii.gz"),
        "transform": ";".join(reg["transforms"]),
        "metric": reg["metric"],
        "wm_dice": dice(warp_mask(atlas["wm"], reg["transforms"], grid), wm),
        "wm_ml": float(wm.sum() * voxel_ml),
        "n_regions": int(len(np.unique(np.asanyarray(regions.dataobj))) - 1),
        "registration_seconds": reg["seconds"],
        "propagation_seconds": time.perf_counter() - t0,
    }


def relabel(
    subject_dir: str | os.PathLike,
    flair,
    atlas: dict,
    method: str,
    outdir: str | os.PathLike,
    reg_spacing: float | None = 3.0,
) -> dict:
    """Re-register a processed subject (its ``prob_wm`` and ``wm_mask``) with another ``method`` into ``outdir``."""
    src = Path(subject_dir)
    wm = np.asanyarray(load_nifti(src / "wm_mask.nii.gz", what="WM mask").dataobj) > 0
    Path(outdir).mkdir(parents=True, exist_ok=True)
    return label_subject(
        src.name,
        load_nifti(src / "prob_wm.nii.gz", what="WM probability"),
        wm,
        load_nifti(flair, what="FLAIR"),
        outdir,
        atlas,
        method,
        reg_spacing,
    )


def _worker(args: tuple, atlas: dict | None = None) -> dict:
    """One subject of :func:`run_cohort` in a worker (one ITK thread per process: :data:`wmloc_utils.ITK_THREADS`)."""
    row, outdir, workdir, method, reg_spacing, fp = args
    return process_subject(
        row["subject"],
        row["t1"],
        row["flair"],
        outdir,
        atlas if atlas is not None else atlas_inputs(workdir),
        lesion=row.get("lesion"),
        method=method,
        reg_spacing=reg_spacing,
        truth_dir=row.get("truth_dir"),
        fingerprint=fp,
    )


def _run_jobs(jobs: list[tuple], workdir, n_jobs: int | None, scheduler, cluster_config):
    """``(job, qc or exception)`` of every :func:`_worker` job as it finishes: here (one process pool worker) or on
    ``scheduler`` (:func:`wmloc_utils.cluster.run_each`)."""
    if not jobs:
        return
    if scheduler == "slurm":
        n = min(n_jobs, len(jobs)) if n_jobs else None  # the cluster asks for it
    else:
        n = cluster.worker_count(n_jobs, len(jobs))
    if scheduler in (None, "processes") and n <= 1:
        atlas = atlas_inputs(workdir)  # loaded once for every subject
        for i, result in cluster.run_here(functools.partial(_worker, atlas=atlas), jobs):
            yield jobs[i], result
        return
    for i, result in cluster.run_each(_worker, jobs, n, scheduler, [job[0]["subject"] for job in jobs], cluster_config):
        yield jobs[i], result


def _report_failures(failed: dict[str, dict], n_subjects: int) -> None:
    """Print the failed subjects of a cohort run, with what to do: fix their input and run again."""
    if not failed:
        return
    bar = "!" * 72
    lines = [
        bar,
        f"{len(failed)} of {n_subjects} subjects FAILED (status 'failed' in regions.csv; the others finished):",
    ]
    lines += [f"  {qc['error']}" for qc in failed.values()]
    lines += ["Fix their input and run again: finished subjects are reused, failed ones retried.", bar]
    print("\n".join(lines), flush=True)


def atlas_sources(workdir: str | os.PathLike | None = None, data_dir=None) -> dict[str, Path]:
    """The atlas files every subject's regions depend on (as :func:`atlas_inputs` picks them), for fingerprints."""
    from .fetch import data_dir as eve_dir

    folder = eve_dir(data_dir)
    refined = artefacts.path(workdir, artefacts.REFINED_ATLAS) if workdir else None
    return {
        "Eve tissue": folder / EVE_FILES["tissue"],
        "Eve T1": folder / EVE_FILES["t1"],
        "refined atlas": refined if refined is not None and refined.exists() else folder / EVE_FILES["type2"],
    }


def subject_fingerprint(
    row: dict, method: str, reg_spacing: float | None, upstream: dict, full_hash: bool = False
) -> dict:
    """What one subject's regions are made of: its files, the step parameters and the atlas files (``upstream``:
    :func:`provenance.upstream_fingerprints` of :func:`atlas_sources`)."""
    inputs = {"T1": row["t1"], "FLAIR": row["flair"]}
    if _given(row.get("lesion")):
        inputs["lesion"] = row["lesion"]
    if _given(row.get("truth_dir")):
        inputs["true tissue"] = Path(row["truth_dir"]) / "tissue.nii.gz"
    # "outputs" 2: bias-corrected T1 and FLAIR are written; (3: a nawm.nii.gz of a filter tried and dropped);
    # 4: prob_wm in qc too; 5: the atlas's grey matter by a nonlinear fit. Older results are redone, as are those of
    # another Atropos start.
    params = {
        "method": method,
        "reg_spacing": reg_spacing,
        "outputs": 5,
        "atropos": [ATROPOS_START, ATROPOS_ITERATIONS],
    }
    return provenance.fingerprint(inputs, params, upstream, full_hash)


def stale(subject_dir: Path, fp: dict) -> tuple[list[str], dict | None]:
    """Why a subject's result is stale ([] when current) and that result (None when there is none, {} unreadable)."""
    done = subject_dir / DONE
    if not done.exists():
        return ["not processed yet"], None
    try:
        qc = json.loads(done.read_text())
    except (OSError, ValueError) as err:
        return [f"{done} is unreadable ({type(err).__name__})"], {}
    return provenance.changes(qc.get("fingerprint"), fp) + provenance.outputs_changed(qc.get("outputs", {})), qc


def _qc_row(qc: dict) -> dict:
    """One regions.csv row: the QC dict without its provenance records."""
    return {k: v for k, v in qc.items() if k not in ("fingerprint", "outputs")}


def run_cohort(
    subjects_csv: str | os.PathLike,
    workdir: str | os.PathLike,
    method: str = "Affine",
    n_jobs: int | None = None,
    overwrite: bool = False,
    n_subjects: int | None = None,
    reg_spacing: float | None = 3.0,
    progress: bool = True,
    full_hash: bool = False,
    region_targets: str = "registered",
    scheduler: str | Client = "processes",
    errors: str = "raise",
    cluster_config: str | os.PathLike | dict | None = None,
) -> pd.DataFrame:
    """Regions for every subject of ``subjects.csv`` into ``workdir`` (:data:`artefacts.SUBJECT_REGIONS`); re-runnable.

    A finished subject is reused while its fingerprint (input files, ``method``/``reg_spacing``, version,
    atlas files; :mod:`wmloc_utils.provenance`) and its outputs are unchanged, else recomputed with the
    reason printed; ``overwrite`` redoes all, ``full_hash`` compares file contents (SHA-256) rather than
    mtimes (the atlas files are always compared by content). Subjects run in ``n_jobs`` worker processes
    (None: one per CPU core; ANTs runs single-threaded so that every result is repeatable, and the same on
    any machine). Returns :data:`artefacts.REGIONS` (one QC row each), rewritten only when its content
    changes: an unchanged rerun writes nothing. ``region_targets="authors"`` (WMH challenge subjects only)
    hands on the paper authors' maps as ``regions`` instead of ours (:func:`attach_authors_regions`).

    ``scheduler`` (:mod:`wmloc_utils.cluster`): ``"processes"`` (this machine's process pool; one subject
    runs here when ``n_jobs`` is 1), ``"local"`` (a Dask cluster of ``n_jobs`` single-threaded workers),
    ``"slurm"`` (``n_jobs`` SLURM worker jobs, settings from ``cluster_config``) or a ``dask.distributed.Client``;
    every scheduler gives the same bytes. ``errors="raise"`` stops at the first failed subject;
    ``"record"`` lets the others finish, gives the failed ones a row with ``status`` "failed" and the
    ``error`` (every row has ``status`` and ``error``) and prints them; a rerun retries them (a failed
    subject has no finished result) and reuses the others.
    """
    if region_targets not in REGION_TARGETS:
        raise InputError(f"region_targets={region_targets!r}: expected one of {REGION_TARGETS}")
    if errors not in ERRORS:
        raise InputError(f"errors={errors!r}: expected one of {ERRORS}")
    table = pd.read_csv(subjects_csv, dtype={"subject": str}, keep_default_na=False)
    if n_subjects:
        table = table.head(int(n_subjects))
    upstream = provenance.upstream_fingerprints(atlas_sources(workdir))
    rows, todo = {}, []
    for row in table.to_dict("records"):
        fp = subject_fingerprint(row, method, reg_spacing, upstream, full_hash)
        why, qc = (
            (["overwrite=True"], None)
            if overwrite
            else stale(artefacts.path(workdir, artefacts.SUBJECT_REGIONS, subject=row["subject"]), fp)
        )
        if not why:
            rows[row["subject"]] = qc
            continue
        if qc is not None:
            print(f"subject {row['subject']}: {'; '.join(why)}, recomputing")
        todo.append((row, fp))
    bar = tqdm(total=len(todo), desc=f"regions ({method})", disable=not progress or not todo)
    jobs = [
        (
            row,
            artefacts.path(workdir, artefacts.SUBJECT_REGIONS, subject=row["subject"]),
            str(workdir),
            method,
            reg_spacing,
            fp,
        )
        for row, fp in todo
    ]
    failed = {}
    for (row, *_), result in _run_jobs(jobs, workdir, n_jobs, scheduler, cluster_config):
        bar.update()
        if not isinstance(result, Exception):
            rows[row["subject"]] = result
        elif errors == "raise":
            raise result
        else:
            failed[row["subject"]] = rows[row["subject"]] = cluster.failure(row["subject"], result)
    bar.close()
    qc = pd.DataFrame([_qc_row(rows[s]) for s in table["subject"]])
    if errors == "record":
        qc = qc.assign(
            status=qc.get("status", pd.Series(index=qc.index, dtype=object)).fillna("ok"),
            error=qc.get("error", pd.Series(index=qc.index, dtype=object)).fillna(""),
        )
        _report_failures(failed, len(table))
    if region_targets == "authors":
        qc = attach_authors_regions(qc[qc["status"] == "ok"] if "status" in qc else qc, table, targets="authors")
    provenance.write_table_if_changed(qc, artefacts.path(workdir, artefacts.REGIONS), index=False)
    return qc


def attach_authors_regions(
    qc: pd.DataFrame, subjects: pd.DataFrame, targets: str = "authors", path: str | os.PathLike | None = None
) -> pd.DataFrame:
    """The regions table with the paper authors' map of every subject and its Dice against ours.

    ``qc`` is :func:`run_cohort`'s table (``subject``, ``regions``), ``subjects`` the subjects table
    (``subject``, ``site``: ids are matched as :func:`wmloc_utils.authors_labels.attach` does; every
    subject must be a WMH challenge subject). Adds ``registered_regions`` (our map), ``authors_regions``
    (fetched and verified, from ``path`` or ``$WMLOC_AUTHORS_LABELS``), ``authors_dice`` (mean Dice over
    regions 1..34, ours vs theirs), ``authors_wm_dice`` (labelled-voxel overlap: their WM vs ours) and
    ``region_targets``; ``regions``, the maps later notebooks use, becomes the authors' for
    ``targets="authors"`` and stays ours for ``"registered"``.
    """
    from . import authors_labels

    if targets not in REGION_TARGETS:
        raise InputError(f"targets={targets!r}: expected one of {REGION_TARGETS}")
    ours = qc["regions"] if "registered_regions" not in qc else qc["registered_regions"]
    keys = subjects[[c for c in ("subject", "site") if c in subjects]].drop_duplicates("subject")
    found = authors_labels.attach(qc[["subject"]].merge(keys, on="subject", how="left"), path)
    out = qc.assign(registered_regions=ours.to_numpy(), authors_regions=found[authors_labels.COLUMN].to_numpy())
    scores = authors_labels.compare(out, regions="registered_regions")
    per_subject = scores.pivot(index="subject", columns="region", values="dice")
    out["authors_dice"] = out["subject"].map(per_subject["mean"])
    out["authors_wm_dice"] = out["subject"].map(per_subject["wm"])
    out["region_targets"] = targets
    out["regions"] = out["authors_regions"] if targets == "authors" else out["registered_regions"]
    return out


def failed_subjects(qc: pd.DataFrame, step: str = "the regions step") -> list[str]:
    """The subjects of a :func:`run_cohort` table that failed (``status`` "failed"), each printed as skipped."""
    if "status" not in qc:
        return []
    failed = qc[qc["status"] == "failed"]
    for row in failed.itertuples():
        print(f"skipping subject {row.subject}: it failed in {step} ({row.error})")
    return failed["subject"].astype(str).tolist()


def subjects_on_flair_grid(workdir: str | os.PathLike, subjects: pd.DataFrame | None = None) -> pd.DataFrame:
    """The subjects table with ``t1`` replaced by notebook 03's ``t1_on_flair`` where it registered one.

    With notebook 03's results, ``brain_mask`` and ``wm_mask`` columns give each subject's brain and WM
    masks (FLAIR grid), ``tissue`` and ``prob_wm`` its tissue classes and WM probability (the lesion filter
    of :func:`wmloc_utils.inference.segment`; the inputs of networks trained with ``inputs="tissue"``), and
    ``t1_corrected``/``flair_corrected`` its bias-corrected images (:func:`corrected_inputs`) and
    ``atlas_grey_matter`` the atlas's grey matter on its grid (:func:`fit_grey_matter`).

    Training (notebooks 04/05) and inference (06) need every channel on the FLAIR grid; the original
    path is kept as ``t1_native``. ``subjects`` defaults to notebook 01's :data:`artefacts.SUBJECTS` (read as
    the notebooks read it). A T1 flagged off-grid by notebook 01 without a registered copy is an error.
    Subjects whose regions failed (``status`` "failed", :func:`run_cohort` with ``errors="record"``) are
    left out, each named in a printed line.
    """
    if subjects is None:
        subjects = pd.read_csv(artefacts.require(workdir, artefacts.SUBJECTS), dtype={"subject": str})
    table = subjects.copy()
    table["t1_native"] = table["t1"]
    regions_csv = artefacts.path(workdir, artefacts.REGIONS)
    if regions_csv.exists():
        regions = pd.read_csv(regions_csv, dtype={"subject": str}, keep_default_na=False)
        table = table[~table["subject"].isin(failed_subjects(regions, "notebook 03 (regions)"))]
        if "t1_on_flair" in regions:
            moved = regions.set_index("subject")["t1_on_flair"]
            moved = table["subject"].map(moved[moved != ""])
            table["t1"] = moved.where(moved.notna(), table["t1"])
        # networks see only the brain (heads with skull: the challenge's pre/ images); region labels stay in WM;
        # they are applied to the bias-corrected images (corrected_inputs)
        # and predicted lesions mostly in the atlas's grey matter are dropped
        maps = ("brain_mask", "wm_mask", "tissue", "prob_wm", "atlas_grey_matter")
        for col in (*maps, *(f"{m}_corrected" for m in BIAS_CORRECTED)):
            if col in regions:
                table[col] = table["subject"].map(regions.set_index("subject")[col]).fillna("")
    if "t1_on_flair_grid" in table:
        off = table["t1_on_flair_grid"].astype(str).str.lower().eq("false") & table["t1"].eq(table["t1_native"])
        if off.any():
            raise InputError(
                f"subject(s) {', '.join(table.loc[off, 'subject'])}: the T1 is not on the FLAIR grid and "
                f"notebook 03 has not registered it ({regions_csv} has no t1_on_flair for them): run "
                f"notebook {artefacts.REGIONS.notebook}.ipynb on these subjects first, with the same work directory"
            )
    return table


def corrected_inputs(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``t1``/``flair`` replaced by notebook 03's bias-corrected copies where it made them.

    The networks are trained on the images as scanned (their mild bias fields are part of what they learn
    to ignore) and applied to the corrected ones: a strong field on an unfamiliar scanner makes one end of
    the brain bright enough on FLAIR to pass for lesions. Measured on 12 subjects of an unseen demo cohort
    (``benchmarks/bench_apply.py``): lesion Dice 0.73 and F1 0.73 this way, 0.67 and 0.57 without the
    correction, 0.63 and 0.57 with networks trained on corrected images too.
    """
    out = table.copy()
    for m in BIAS_CORRECTED:
        col = f"{m}_corrected"
        if col in out:
            out[m] = out[col].where(out[col].astype(str) != "", out[m])
    return out
