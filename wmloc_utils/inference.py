"""Applying a trained segmenter to a subject: sliding-window inference, optional flip TTA, FLAIR-grid output.

The preprocessing of training (RAS, training spacing, per-modality normalisation) is rebuilt from the
checkpoint's config; the network's output is interpolated back at the FLAIR voxels through the two grids'
affines, so outputs land on the exact FLAIR grid (shape and affine) whatever its orientation or voxel size.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage
from tqdm.auto import tqdm

from . import artefacts, runtime
from .checkpoints import check_inputs, load_checkpoint, preprocessing
from .errors import InputError
from .images import check_same_grid, grid_of, like, load_nifti, save_nifti
from .metrics import lesions
from .wmdepth import depth_below_surface

if TYPE_CHECKING:
    from dask.distributed import Client

OUTPUT_NAMES = {
    "lesion": {"mask": "lesion_pred.nii.gz", "prob": "lesion_prob.nii.gz"},
    "regions": {"labels": "regions_pred.nii.gz"},
}


@dataclass
class Segmenter:
    """A loaded checkpoint: network (eval mode), its config, device and file."""

    model: torch.nn.Module
    config: dict
    device: torch.device
    path: Path


def load_segmenter(checkpoint: str | os.PathLike, device: str = "auto") -> Segmenter:
    """Load a checkpoint once (e.g. to predict many subjects)."""
    dev = runtime.resolve_device(device)
    model, config = load_checkpoint(checkpoint, dev)
    return Segmenter(model, config, dev, Path(checkpoint))


def _tta_flips(config: dict, tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations (of spatial dims of a B,C,X,Y,Z tensor) averaged at test time; only axes seen in training.

    Region networks flip left-right only, and their outputs are mirrored back (left and right labels swapped).
    """
    axes = [a + 2 for a in config["flip_axes"]] if tta else []
    return [()] + [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def is_brain_masked(config: dict) -> bool:
    """Whether a checkpoint's network was trained on brain-masked images (and so needs a mask at inference)."""
    return bool(config.get("brain_masked", config.get("training", {}).get("brain_masked", False)))


def remove_small_lesions(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components of a binary mask with fewer than ``min_voxels`` voxels."""
    labels, n = lesions(mask)
    if n == 0 or min_voxels <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


MIN_GM_CONTRAST = 1.15  # default of notebook 06 and wmloc-apply (keep_hyperintense_lesions)
LESION_PERCENTILE = 75  # the FLAIR percentile of a lesion compared with grey matter (its brighter quarter)
SURFACE_MM, SURFACE_EXTRA = 6.0, 0.05  # lesions this close to the brain's surface need min_gm_contrast + this
MIN_VOXEL_GM_CONTRAST = 1.0  # lesion voxels darker than grey matter are trimmed off the lesions kept


def grey_matter_flair(flair: np.ndarray, grey_matter: np.ndarray, lesion_mask: np.ndarray) -> float:
    """Grey matter's brightness on FLAIR: the 90th percentile of ``flair`` in ``grey_matter`` outside the lesions.

    The reference of the hyperintensity filter and of lesion growth (:func:`keep_hyperintense_lesions`,
    :func:`grow_lesions`).
    """
    mask, flair, grey_matter = np.asarray(lesion_mask, bool), np.asarray(flair), np.asarray(grey_matter, bool)
    if not flair.shape == grey_matter.shape == mask.shape:
        raise InputError(
            f"lesion mask {mask.shape}, FLAIR {flair.shape} and grey matter {grey_matter.shape}: not the same grid"
        )
    reference = grey_matter & ~mask
    if not reference.any():
        raise InputError("the tissue map has no grey matter (class 2) outside the lesions: no FLAIR reference")
    return float(np.percentile(flair[reference], 90))


def keep_hyperintense_lesions(
    mask: np.ndarray,
    flair: np.ndarray,
    grey_matter: np.ndarray,
    min_gm_contrast: float = MIN_GM_CONTRAST,
    depth_mm: np.ndarray | None = None,
) -> np.ndarray:
    """Keep the predicted lesions (26-connected) that are hyperintense to grey matter on FLAIR, and of them the
    voxels at least as bright as grey matter.

    White-matter hyperintensities are brighter on FLAIR than grey matter (the reference tissue of LST's
    lesion growth algorithm, Schmidt et al. 2012); bright cortex on a FLAIR with strong grey/white
    contrast, the commonest false lesion on an unfamiliar scanner, is not. Grey matter's brightness is
    :func:`grey_matter_flair`. A lesion stays when the brighter quarter of its voxels (its 75th FLAIR
    percentile, which a halo of normal white matter that the network took in with it does not pull down) is at
    least ``min_gm_contrast`` x grey matter's; within :data:`SURFACE_MM` of the brain's surface (``depth_mm``,
    :func:`wmloc_utils.wmdepth.depth_below_surface` of the brain mask; None: not used), where the cortex lies, at least
    ``min_gm_contrast`` + :data:`SURFACE_EXTRA`. Of the lesions kept, voxels darker than grey matter
    (:data:`MIN_VOXEL_GM_CONTRAST`) are not lesion and are trimmed. ``min_gm_contrast`` 0 keeps every voxel.
    Chosen on six unseen demo draws (``benchmarks/bench_apply.py``, seeds 1000-6000) against the median filter at
    1.1 that it replaces: lesion Dice 0.790 -> 0.834, 0.721 -> 0.762, 0.661 -> 0.765, 0.717 -> 0.762,
    0.653 -> 0.735, 0.624 -> 0.746, false lesions in lesion-free subjects (max mL) 0.05 -> 0.05, 1.08 -> 0.03,
    0.37 -> 0.71, 0.15 -> 0.02, 0.21 -> 0.18, 4.42 -> 3.87 (bright grey matter that the tissue segmentation
    took for white matter). On two draws made afterwards (seeds 7000, 8000): Dice 0.788 -> 0.851, 0.700 -> 0.755,
    false lesions 3.75 -> 3.36, 0.40 -> 0.00 mL; on the book's demo test subjects Dice 0.833 -> 0.921.
    """
    mask = np.asarray(mask, bool)
    if min_gm_contrast <= 0:
        return mask
    flair = np.asarray(flair, np.float32)
    reference = grey_matter_flair(flair, grey_matter, mask)
    labels, n = lesions(mask)
    if n == 0:
        return mask
    if depth_mm is not None and np.shape(depth_mm) != mask.shape:
        raise InputError(f"lesion mask {mask.shape} and depth map {np.shape(depth_mm)}: not the same grid")
    ids = np.arange(1, n + 1)
    bright = ndimage.labeled_comprehension(
        flair, labels, ids, lambda v: np.percentile(v, LESION_PERCENTILE), np.float64, 0.0
    )
    threshold = np.full(n, min_gm_contrast)
    if depth_mm is not None:
        near_surface = np.asarray(ndimage.median(depth_mm, labels, ids)) < SURFACE_MM
        threshold[near_surface] += SURFACE_EXTRA
    keep = np.concatenate([[False], bright >= threshold * reference])
    return keep[labels] & (flair >= MIN_VOXEL_GM_CONTRAST * reference)


#: A predicted lesion with at least this fraction of its voxels in the atlas's grey matter is not a WM lesion.
GREY_FRACTION = 0.5


def outside_grey_matter(mask: np.ndarray, grey: np.ndarray, max_fraction: float = GREY_FRACTION) -> np.ndarray:
    """Drop the predicted lesions (26-connected) that lie mostly (``max_fraction`` of their voxels) in ``grey``.

    White-matter hyperintensities lie in white matter. Cortex, caudate and putamen bright on a FLAIR with strong
    grey/white contrast are a network's false lesions on an unfamiliar scanner, and its tissue map may take them
    for WM (BIANCA's ``make_bianca_mask`` excludes cortex and deep grey nuclei for the same reason). ``grey``: the
    atlas's grey matter on the subject's grid by a nonlinear fit (notebook 03's ``atlas_grey_matter``,
    :func:`wmloc_utils.registration.fit_grey_matter`); a lesion goes only when most of it lies inside, so that
    juxtacortical and periventricular lesions along the caudate stay. On eight unseen demo draws
    (``benchmarks/bench_apply.py``, seeds 1000-8000) it cut the worst lesion-free subject's false lesions to at most
    0.10 mL (up to 3.87 mL without) and raised mean lesion Dice from 0.776 to 0.801; on the book's demo test subjects
    Dice went from 0.921 to 0.916. The fraction was fixed beforehand, for an earlier rule on the deep nuclei alone
    carried by the affine fit (which took true lesions by the internal capsule).
    """
    mask = np.asarray(mask, bool)
    grey = np.asarray(grey, bool)
    if grey.shape != mask.shape:
        raise InputError(f"lesion mask {mask.shape} and atlas grey matter {grey.shape}: not the same grid")
    labels, n = lesions(mask)
    if n == 0 or not grey.any():
        return mask
    inside = np.asarray(ndimage.mean(grey, labels, np.arange(1, n + 1)))
    return np.concatenate([[False], inside < max_fraction])[labels]


GROW_TO_PROB = 0.3  # default of notebook 06 and wmloc-apply (grow_lesions)
GROW_GM_CONTRAST = 1.3  # how much brighter than grey matter a voxel must be for a lesion to grow into it


def grow_lesions(
    mask: np.ndarray,
    prob: np.ndarray,
    flair: np.ndarray,
    grey_matter: np.ndarray,
    min_prob: float = GROW_TO_PROB,
    min_gm_contrast: float = GROW_GM_CONTRAST,
) -> np.ndarray:
    """Grow each predicted lesion into the connected voxels (26-neighbours) that the network gives at least
    ``min_prob`` and that are clearly hyperintense (FLAIR >= ``min_gm_contrast`` x :func:`grey_matter_flair`).

    On an unfamiliar scanner a network finds a lesion but doubts its rim (probabilities 0.1 to 0.5 on a
    faint halo); LST's lesion growth algorithm (Schmidt et al. 2012) grows conservative seeds along
    hyperintense voxels the same way. No lesion is added: only those in ``mask`` grow. Measured on two
    unseen demo cohorts and the demo test subjects (``benchmarks/bench_apply.py``, after the filter), 0.3 and
    1.3 raised lesion Dice 0.771 -> 0.790, 0.699 -> 0.721 and 0.827 -> 0.833, left the false lesions as they
    were and the volumes nearly so (AVD +0.2 to 4 points); a gate of 1.1 gained as much Dice but grew false
    lesions too (mean AVD 27 -> 58 %). On a third draw, never used to choose them: 0.641 -> 0.661.
    """
    mask, prob = np.asarray(mask, bool), np.asarray(prob)
    if prob.shape != mask.shape:
        raise InputError(f"lesion mask {mask.shape} and probability {prob.shape}: not the same grid")
    if not mask.any():
        return mask
    flair = np.asarray(flair, np.float32)
    bright = flair >= min_gm_contrast * grey_matter_flair(flair, grey_matter, mask)
    labels, _ = lesions(mask | ((prob >= min_prob) & bright))
    seeded = np.zeros(labels.max() + 1, bool)
    seeded[labels[mask]] = True
    seeded[0] = False
    return seeded[labels]


def grey_matter_options(min_gm_contrast: float = 0.0, grow_to_prob: float | None = None) -> dict[str, float]:
    """The lesion options of :func:`segment` that are on and compare FLAIR with grey matter (they need a tissue map)."""
    on = {"min_gm_contrast": min_gm_contrast} if min_gm_contrast > 0 else {}
    return on if grow_to_prob is None else {**on, "grow_to_prob": grow_to_prob}


def segment(
    segmenter: Segmenter | str | os.PathLike,
    t1_path: str | os.PathLike | None = None,
    flair_path: str | os.PathLike | None = None,
    tta: bool = False,
    inputs: str | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    roi_size: int | None = None,
    voxels_per_chunk: int = 250_000,
    brain_mask: str | os.PathLike | nib.spatialimages.SpatialImage | None = None,
    min_lesion_ml: float = 0.0,
    wm_mask: str | os.PathLike | nib.spatialimages.SpatialImage | None = None,
    tissue_map: str | os.PathLike | nib.spatialimages.SpatialImage | None = None,
    min_gm_contrast: float = 0.0,
    channels: Mapping[str, Any] | None = None,
    grow_to_prob: float | None = None,
    grey_matter: str | os.PathLike | nib.spatialimages.SpatialImage | None = None,
) -> dict[str, nib.Nifti1Image]:
    """Segment one subject; return images on the FLAIR grid ({"mask", "prob"} or {"labels"}).

    ``roi_size`` (default: the training patch) sets the sliding window; a larger window means fewer
    windows, i.e. faster on a CPU. ``inputs`` (default: the checkpoint's) must match the mode the network
    was trained on; every modality it needs must be given, on the same grid: T1 and FLAIR as arguments,
    others (``inputs="tissue"``: notebook 03's ``tissue`` and ``prob_wm``) in ``channels``, a mapping of
    name to path from which only the network's modalities are read (a row of
    :func:`wmloc_utils.registration.subjects_on_flair_grid` will do). The network's probabilities are
    interpolated at ``voxels_per_chunk`` FLAIR voxels at a time (memory: that many float32 values per class),
    and only where an answer can be non-zero: inside ``brain_mask`` (lesions) or ``wm_mask`` (regions).
    ``brain_mask`` (path or image on the FLAIR grid, e.g. notebook 03's brain_mask.nii.gz) multiplies the
    images before normalisation, and nothing is predicted outside it; networks trained brain-masked
    require it. ``min_lesion_ml`` removes predicted lesions (26-connected) smaller than that volume;
    ``min_gm_contrast`` > 0 those not that much brighter on FLAIR than grey matter, and the voxels darker than
    grey matter (:func:`keep_hyperintense_lesions`, with the depth below ``brain_mask``'s surface; ``tissue_map``
    on the FLAIR grid, e.g. notebook 03's tissue.nii.gz, gives the grey matter); ``grow_to_prob`` then grows the
    lesions kept into the neighbouring clearly hyperintense voxels the network gives at least that
    (:func:`grow_lesions`; None: no growth; needs ``tissue_map`` too). ``grey_matter`` (on the FLAIR grid: notebook
    03's atlas_grey_matter.nii.gz) then drops the lesions lying mostly in the atlas's grey matter
    (:func:`outside_grey_matter`; None: none dropped).
    The "prob" image stays the network's own; only the mask is filtered and grown.
    ``wm_mask`` (regions only; e.g. notebook 03's wm_mask.nii.gz) keeps the regions inside the subject's WM,
    as the registered atlas's are: every WM voxel takes its most probable label 1..36, every other voxel 0.
    The network then divides the same voxels as the atlas, and a WM extent it misjudges on an unfamiliar
    scanner (the tissue segmentation adapts to each subject) costs nothing.
    """
    seg = segmenter if isinstance(segmenter, Segmenter) else load_segmenter(segmenter)
    cfg = seg.config
    check_inputs(cfg, inputs or cfg["inputs"], seg.path)
    named = {**(channels or {}), **{m: p for m, p in (("t1", t1_path), ("flair", flair_path)) if p is not None}}
    given = {
        m: p if isinstance(p, (str, os.PathLike)) and str(p) else None
        for m, p in named.items()
        if m in ("t1", "flair") or m in cfg["modalities"]
    }
    missing = [m.upper() for m in cfg["modalities"] if not given.get(m)]
    if missing:
        raise InputError(f"{seg.path}: the network was trained on {cfg['inputs']!r} and needs {' and '.join(missing)}")
    ref_name = "flair" if given.get("flair") else "t1" if given.get("t1") else cfg["modalities"][0]
    ref = load_nifti(given[ref_name], what=ref_name.upper())
    for m in cfg["modalities"]:
        if m != ref_name:
            check_same_grid(ref, load_nifti(given[m], what=m.upper()), ref_name.upper(), m.upper())
    if wm_mask is not None and cfg["task"] != "regions":
        raise InputError(f"{seg.path}: wm_mask= is for region networks; this is a {cfg['task']} network")
    if grey_matter is not None and cfg["task"] != "lesion":
        raise InputError(f"{seg.path}: grey_matter= is for lesion networks; this is a {cfg['task']} network")
    use_gm = grey_matter_options(min_gm_contrast, grow_to_prob)
    if use_gm and cfg["task"] != "lesion":
        options = ", ".join(f"{k}=" for k in use_gm)
        raise InputError(f"{seg.path}: {options} is for lesion networks; this is a {cfg['task']} network")
    if use_gm and (tissue_map is None or not given.get("flair")):
        option = ", ".join(f"{k}={v}" for k, v in use_gm.items())
        raise InputError(
            f"{seg.path}: {option} compares the FLAIR of lesions with grey matter's and needs the FLAIR and "
            f"tissue_map= (tissue classes on the FLAIR grid, 2 = grey matter, e.g. notebook 03's tissue.nii.gz); "
            f"min_gm_contrast=0 and grow_to_prob=None switch the filter and growth off"
        )
    if brain_mask is None and is_brain_masked(cfg):
        raise InputError(
            f"{seg.path}: this network was trained on brain-masked images and needs brain_mask= "
            f"(a brain mask on the {ref_name.upper()} grid, e.g. notebook 03's brain_mask.nii.gz)"
        )
    brain = None if brain_mask is None else _mask_on_grid(brain_mask, ref, ref_name, "brain mask")
    wm = None if wm_mask is None else _mask_on_grid(wm_mask, ref, ref_name, "WM mask")
    gm = np.asanyarray(_image_on_grid(tissue_map, ref, ref_name, "tissue map").dataobj) == 2 if use_gm else None
    grey = None
    if grey_matter is not None:  # may be empty: then no lesion lies in it
        grey = np.asanyarray(_image_on_grid(grey_matter, ref, ref_name, "atlas grey matter").dataobj) > 0

    pre = preprocessing(cfg["spacing"], with_label=False, brain=brain is not None)
    record = {"image": [str(given[m]) for m in cfg["modalities"]]}
    with tempfile.TemporaryDirectory(prefix="wmloc-brain-") as tmp:
        if brain is not None:  # the preprocessing reads the mask from a file, on the reference grid
            record["brain"] = str(save_nifti(like(ref, brain.astype(np.uint8)), Path(tmp) / "brain.nii.gz"))
        data = pre(record)
    image = data["image"]
    x = image.as_tensor()[None].to(seg.device)
    flips = _tta_flips(cfg, tta)
    mirror = torch.as_tensor(cfg["label_mirror"]) if cfg.get("label_mirror") else None
    roi = cfg["patch_size"] if roi_size is None or cfg["architecture"] == "unetr" else [int(roi_size)] * 3
    probs = None
    with torch.no_grad(), torch.autocast(seg.device.type, enabled=seg.device.type == "cuda"):
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(xi, roi, sw_batch_size, seg.model, overlap=overlap, mode="gaussian")
            p = torch.softmax(logits.float(), 1)
            p = torch.flip(p, dims) if dims else p
            if 2 in dims and mirror is not None:  # flipped left-right: a "left" output means right
                p = p[:, mirror]
            probs = p if probs is None else probs + p
    probs = probs[0].cpu() / len(flips)

    shape = ref.shape[:3]
    if cfg["task"] == "lesion":
        where = np.ones(shape, bool) if brain is None else brain
        prob = np.zeros(shape, np.float32)
        prob[where] = np.clip(on_grid(probs[1:2], image.affine, ref.affine, where, voxels_per_chunk)[0], 0, 1)
        mask = prob >= 0.5
        flair = np.asanyarray(ref.dataobj) if use_gm else None  # ref: the FLAIR
        if min_gm_contrast > 0:
            # the depth map costs a distance transform of the brain: only when there is a lesion to judge
            depth = None if brain is None or not mask.any() else depth_below_surface(brain, grid_of(ref)["voxel_mm"])
            mask = keep_hyperintense_lesions(mask, flair, gm, min_gm_contrast, depth)
        if grow_to_prob is not None:
            mask = grow_lesions(mask, prob, flair, gm, grow_to_prob)
        if grey is not None:
            mask = outside_grey_matter(mask, grey)
        if min_lesion_ml > 0:
            voxel_ml = abs(np.linalg.det(ref.affine[:3, :3])) / 1000
            mask = remove_small_lesions(mask, int(np.ceil(min_lesion_ml / voxel_ml - 1e-9)))
        return {"mask": like(ref, mask.astype(np.uint8)), "prob": like(ref, prob)}
    # Regions: interpolate the class probabilities (not the labels) at the FLAIR voxels and take the most
    # probable class there, so that boundaries are placed at native resolution rather than in blocks of the
    # training spacing. Inside a WM mask background is no choice: the most probable of the labels 1..36 wins.
    first = 0 if wm is None else 1
    where = np.ones(shape, bool)
    for keep in (brain, wm):
        if keep is not None:
            where &= keep
    labels = np.zeros(shape, np.int16)
    labels[where] = on_grid(probs[first:], image.affine, ref.affine, where, voxels_per_chunk, argmax=True) + first
    return {"labels": like(ref, labels)}


def _image_on_grid(
    image: str | os.PathLike | nib.spatialimages.SpatialImage,
    ref: nib.spatialimages.SpatialImage,
    ref_name: str,
    what: str,
) -> nib.spatialimages.SpatialImage:
    """An image (path or image) checked to lie on the reference grid."""
    img = image if isinstance(image, nib.spatialimages.SpatialImage) else load_nifti(image, what=what)
    check_same_grid(ref, img, ref_name.upper(), what)
    return img


def _mask_on_grid(
    mask: str | os.PathLike | nib.spatialimages.SpatialImage,
    ref: nib.spatialimages.SpatialImage,
    ref_name: str,
    what: str,
) -> np.ndarray:
    """A binary mask (path or image) checked to lie on the reference grid and to be non-empty."""
    img = _image_on_grid(mask, ref, ref_name, what)
    out = np.asanyarray(img.dataobj) > 0
    if not out.any():
        raise InputError(f"{getattr(img, 'get_filename', lambda: None)() or what}: {what} is empty")
    return out


#: Classes interpolated in one pass of :func:`on_grid`. A few at a time, with a running argmax for labels, bound
#: the memory: all 37 classes of a 1 mm region network over a whole 1 mm grid at once held 5.7 GB and took 36 s.
CLASSES_PER_PASS = 8


def on_grid(
    channels: torch.Tensor,
    net_affine: torch.Tensor | np.ndarray,
    grid_affine: np.ndarray,
    where: np.ndarray,
    voxels_per_chunk: int = 250_000,
    argmax: bool = False,
) -> np.ndarray:
    """``channels`` (C, network grid), interpolated (trilinear) at the voxels ``where`` of another grid: (C, n),
    or with ``argmax`` the index of the largest channel at each voxel: (n,).

    ``net_affine`` and ``grid_affine`` map each grid's voxels to the same world (the preprocessed image's
    MetaTensor affine and the FLAIR's), so this undoes reorientation and resampling in one step, as MONAI's
    ``Invertd`` would (the same values to 1e-5, border padding), but only at the voxels asked for: a region
    network's 36 classes inside the WM of a 196x236x63 challenge FLAIR took 0.12 s instead of 3-6 s on 2 cores.
    ``voxels_per_chunk`` voxels and :data:`CLASSES_PER_PASS` classes are interpolated at a time (memory).
    """
    vox = np.argwhere(where)
    to_net = np.linalg.inv(np.asarray(net_affine, dtype=np.float64)) @ np.asarray(grid_affine, dtype=np.float64)
    size = np.asarray(channels.shape[1:], dtype=np.float64)
    scale = np.where(size > 1, 2.0 / np.maximum(size - 1, 1), 0.0)  # voxel index -> [-1, 1] (align_corners)
    n_classes = channels.shape[0]
    out = np.empty(len(vox), np.int64) if argmax else np.empty((n_classes, len(vox)), np.float32)
    step = max(1, int(voxels_per_chunk))
    for start in range(0, len(vox), step):
        ijk = vox[start : start + step]
        pos = ijk @ to_net[:3, :3].T + to_net[:3, 3]
        norm = np.where(size > 1, pos * scale - 1.0, 0.0)[:, ::-1]  # grid_sample reads (z, y, x) order
        grid = torch.as_tensor(norm.copy(), dtype=torch.float32).view(1, -1, 1, 1, 3)
        best = label = None
        for first in range(0, n_classes, CLASSES_PER_PASS):
            part = channels[first : first + CLASSES_PER_PASS].float()[None]
            values = F.grid_sample(part, grid, mode="bilinear", padding_mode="border", align_corners=True)[
                0, :, :, 0, 0
            ]
            if not argmax:
                out[first : first + len(values), start : start + len(ijk)] = values.numpy()
                continue
            value, index = values.max(0)
            if best is None:
                best, label = value, index
            else:
                better = value > best  # ties keep the lower class, as one argmax over all classes would
                best, label = torch.where(better, value, best), torch.where(better, index + first, label)
        if argmax:
            out[start : start + len(ijk)] = label.numpy()
    return out


def predict(
    checkpoint: Segmenter | str | os.PathLike,
    t1_path: str | os.PathLike | None = None,
    flair_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    out_paths: dict[str, str | os.PathLike] | None = None,
    tta: bool = False,
    inputs: str | None = None,
    **kwargs,
) -> dict[str, Path]:
    """Segment one subject and write NIfTI files on the FLAIR grid; return {"mask"/"prob" or "labels": path}.

    Files go to ``out_paths`` (keys as returned) or to ``out_dir`` with the standard names
    (lesion_pred.nii.gz uint8, lesion_prob.nii.gz float32; regions_pred.nii.gz int16 0..36).
    """
    images = segment(checkpoint, t1_path, flair_path, tta=tta, inputs=inputs, **kwargs)
    task = "lesion" if "mask" in images else "regions"
    if out_paths is None:
        if out_dir is None:
            raise ValueError("give out_dir or out_paths")
        out_paths = {k: Path(out_dir) / name for k, name in OUTPUT_NAMES[task].items()}
    missing = set(images) - set(out_paths)
    if missing:
        raise ValueError(f"out_paths lacks {sorted(missing)} for the {task} task")
    return {k: save_nifti(img, out_paths[k]) for k, img in images.items()}


def split_of(config: dict, subject: str) -> str:
    """ "train" or "val" when the checkpoint's network saw ``subject`` in training, else "test" (never seen)."""
    if subject in config.get("train_subjects", ()):
        return "train"
    return "val" if subject in config.get("val_subjects", ()) else "test"


def predict_cohort(
    table: pd.DataFrame,
    out_root: str | os.PathLike,
    lesion_checkpoint: str | os.PathLike | None = None,
    region_checkpoint: str | os.PathLike | None = None,
    split: pd.DataFrame | None = None,
    tta: bool = False,
    device: str = "auto",
    progress: bool = True,
    brain_col: str | None = None,
    wm_col: str | None = None,
    tissue_col: str | None = None,
    grey_col: str | None = None,
    scheduler: str | Client | None = None,
    n_jobs: int | None = None,
    errors: str = "raise",
    cluster_config: str | os.PathLike | dict | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Predict every subject of ``table`` into ``out_root/<subject>/`` with each given checkpoint.

    A subject whose outputs exist and whose inputs, checkpoints and settings are unchanged (same
    ``<task>_prediction.json``) is not predicted again. ``brain_col`` names a column of brain masks,
    ``wm_col`` one of WM masks (FLAIR grid; the region network's labels stay inside it) and ``tissue_col``
    one of tissue maps (the grey matter of the lesion network's ``min_gm_contrast`` filter), passed to
    :func:`segment`, as are ``kwargs``; ``grey_col`` one of the atlas's grey matter (notebook 03's), in which no
    predicted lesion may lie mostly (:func:`outside_grey_matter`). Returns one row per
    subject: subject, split, lesion_pred, lesion_prob, regions_pred. The split comes from ``split`` when given,
    else from the lesion checkpoint: "train"/"val" for subjects it was trained on, "test" for all others.

    ``scheduler`` None: every subject in this process, each network loaded once (on one machine the
    network's own threads use every core). ``"local"``, ``"slurm"`` or a Dask client: one task per subject
    on ``n_jobs`` workers (:func:`wmloc_utils.cluster.run_each`), each worker loading each network once.
    ``errors="record"``: a subject that fails gets ``status`` "failed" and its ``error`` (the others go on).
    """
    from . import cluster

    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    checkpoints = {k: str(c) for k, c in (("lesion", lesion_checkpoint), ("regions", region_checkpoint)) if c}
    if not checkpoints:
        raise ValueError("give lesion_checkpoint and/or region_checkpoint")
    here = scheduler is None
    loaded = [_loaded(c, device if here else "cpu") for c in checkpoints.values()]  # each checked before any subject
    first = loaded[0]  # its config names the split
    which = dict(zip(split["subject"].astype(str), split["split"])) if split is not None else {}
    reads = {
        task: [m for m in seg.config["modalities"] if m not in ("t1", "flair")]
        for task, seg in zip(checkpoints, loaded)
    }
    for task, names in reads.items():  # inputs="tissue": notebook 03's maps, from the table's columns
        absent = [m for m in names if m not in table]
        if absent:
            raise InputError(
                f"{checkpoints[task]}: the {task} network reads {', '.join(absent)}, a column the subjects table "
                f"lacks (notebook 03's maps: registration.subjects_on_flair_grid gives them)"
            )
    jobs = []
    for row in table.itertuples(index=False):
        subject = str(row.subject)
        jobs.append(
            {
                "subject": subject,
                "split": which.get(subject, split_of(first.config, subject)),
                "out_dir": str(Path(out_root) / subject),
                "checkpoints": checkpoints,
                "device": device,
                "tta": tta,
                "kwargs": kwargs,
                "channels": {task: {m: getattr(row, m) or None for m in names} for task, names in reads.items()},
                **{
                    k: (getattr(row, col, None) or None) if col else None
                    for k, col in (
                        ("t1", "t1"),
                        ("flair", "flair"),
                        ("brain", brain_col),
                        ("wm", wm_col),
                        ("tissue_map", tissue_col),
                        ("grey", grey_col),
                    )
                },
            }
        )
    if here:
        outcomes = cluster.run_here(predict_subject, jobs)
    else:
        outcomes = cluster.run_each(
            predict_subject, jobs, n_jobs, scheduler, names=[j["subject"] for j in jobs], config=cluster_config
        )
    rows: list[dict] = [{} for _ in jobs]
    for i, result in tqdm(outcomes, total=len(jobs), desc="predicting subjects", disable=not progress):
        if isinstance(result, Exception):
            if errors == "raise":
                raise result
            result = {**cluster.failure(jobs[i]["subject"], result), "split": jobs[i]["split"]}
        rows[i] = result
    out = pd.DataFrame(rows)
    if errors == "record":
        out["status"] = out.get("status", pd.Series("ok", out.index)).fillna("ok")
        out["error"] = out.get("error", pd.Series("", out.index)).fillna("")
    return out


def _loaded(checkpoint: str, device: str) -> Segmenter:
    """A checkpoint loaded once per process (the cohort's subjects, a Dask worker's tasks), again when the file changes."""
    if not os.path.isfile(checkpoint):
        return load_segmenter(checkpoint, device)  # its clear error
    st = os.stat(checkpoint)
    return _load_once(checkpoint, device, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _load_once(checkpoint: str, device: str, mtime_ns: int, size: int) -> Segmenter:
    return load_segmenter(checkpoint, device)


LESION_ONLY = ("min_lesion_ml", "min_gm_contrast", "grow_to_prob")  # segment() options that only lesion networks take


def predict_subject(job: dict) -> dict:
    """One subject of :func:`predict_cohort` (``job``: its images, checkpoints and settings); its row.

    A module-level function, so that a Dask worker can import it; it skips a subject whose outputs are
    up to date (same inputs, checkpoints and settings as its ``<task>_prediction.json``).
    """
    import json

    from . import provenance

    out_dir, kwargs = Path(job["out_dir"]), job["kwargs"]
    names = {"mask": "lesion_pred", "prob": "lesion_prob", "labels": "regions_pred"}
    row = {"subject": job["subject"], "split": job["split"]}
    for task, checkpoint in job["checkpoints"].items():
        wm = job["wm"] if task == "regions" else None
        uses_gm = grey_matter_options(kwargs.get("min_gm_contrast", 0.0), kwargs.get("grow_to_prob"))
        tissue_map = job["tissue_map"] if task == "lesion" and uses_gm else None
        grey = job.get("grey") if task == "lesion" else None
        task_kwargs = kwargs if task == "lesion" else {k: v for k, v in kwargs.items() if k not in LESION_ONLY}
        paths = {k: out_dir / name for k, name in OUTPUT_NAMES[task].items()}
        inputs = {
            k: p
            for k, p in (
                ("t1", job["t1"]),
                ("flair", job["flair"]),
                ("brain", job["brain"]),
                ("wm", wm),
                ("tissue_map", tissue_map),
                ("atlas grey matter", grey),
                *job["channels"][task].items(),
                ("checkpoint", checkpoint),
            )
            if p
        }
        settings = {k: v for k, v in task_kwargs.items() if isinstance(v, (int, float, str, bool))}
        if "grow_to_prob" in settings:  # growth's hyperintensity gate, a constant of this module
            settings["grow_gm_contrast"] = GROW_GM_CONTRAST
        if settings.get("min_gm_contrast", 0) > 0:  # the filter's constants: a change recomputes the masks
            settings["lesion_filter"] = [LESION_PERCENTILE, SURFACE_MM, SURFACE_EXTRA, MIN_VOXEL_GM_CONTRAST]
        if grey:
            settings["grey_fraction"] = GREY_FRACTION
        stamp = provenance.fingerprint(inputs, {"tta": job["tta"], **settings})
        done = out_dir / f"{task}_prediction.json"
        fresh = done.exists() and json.loads(done.read_text()) == stamp and all(p.exists() for p in paths.values())
        if not fresh:
            predict(
                _loaded(checkpoint, job["device"]),
                job["t1"],
                job["flair"],
                out_paths=paths,
                tta=job["tta"],
                brain_mask=job["brain"],
                wm_mask=wm,
                tissue_map=tissue_map,
                channels=job["channels"][task],
                grey_matter=grey or None,
                **task_kwargs,
            )
            provenance.write_text_if_changed(done, json.dumps(stamp, indent=1))
        row.update({names[k]: str(p) for k, p in paths.items()})
        if task == "lesion":
            row["pred_ml"], row["dropped_ml"] = lesion_volumes(paths["mask"], paths["prob"])
    return row


def lesion_volumes(mask: str | os.PathLike, prob: str | os.PathLike) -> tuple[float, float]:
    """mL of the final lesion mask, and of the network's lesions (probability >= 0.5) not in it.

    The second is what the hyperintensity filter and the minimum lesion size dropped (growth only adds
    voxels): a QC number (:func:`report_dropped`).
    """
    mask_img = load_nifti(mask, what="lesion mask")
    kept = np.asanyarray(mask_img.dataobj) > 0
    found = np.asanyarray(load_nifti(prob, what="lesion probability").dataobj) >= 0.5
    voxel_ml = grid_of(mask_img)["voxel_ml"]
    return float(kept.sum() * voxel_ml), float((found & ~kept).sum() * voxel_ml)


#: a subject is named when the filters dropped at least this many mL and this share of the network's lesions
DROPPED_WARN_ML, DROPPED_WARN_SHARE = 1.0, 0.5


def report_dropped(predictions: pd.DataFrame) -> list[str]:
    """Print and return the subjects whose lesions the filters mostly dropped (``dropped_ml`` of
    :func:`lesion_volumes`): worth a look at their FLAIR.

    Usually bright cortex or deep grey nuclei that the network took for lesions, rightly dropped. On a FLAIR whose
    lesions are barely brighter than grey matter, real lesions: an unseen demo subject lost 8.4 of the network's
    9.2 mL (36 mL true, 1.03 x grey matter) this way. Lower ``min_gm_contrast`` for such a cohort.
    """
    if "dropped_ml" not in predictions:
        return []
    rows = predictions.dropna(subset=["dropped_ml", "pred_ml"])
    share = rows["dropped_ml"] / (rows["dropped_ml"] + rows["pred_ml"]).where(lambda v: v > 0)
    flagged = rows[(rows["dropped_ml"] >= DROPPED_WARN_ML) & (share >= DROPPED_WARN_SHARE)]
    for r in flagged.itertuples():
        print(
            f"subject {r.subject}: the lesion filters dropped {r.dropped_ml:.1f} mL, {share[r.Index]:.0%} of what "
            f"the network found (bright cortex or deep grey nuclei, a halo of normal white matter, or lesions barely "
            f"brighter than grey matter): look at its FLAIR"
        )
    return flagged["subject"].tolist()


def predict_step(
    workdir: str | os.PathLike,
    lesion_checkpoint: str | os.PathLike | None = None,
    region_checkpoint: str | os.PathLike | None = None,
    tta: bool = False,
    device: str = "auto",
    min_lesion_ml: float = 0.0,
    min_gm_contrast: float = MIN_GM_CONTRAST,
    grow_to_prob: float | None = GROW_TO_PROB,
    drop_grey_matter: bool = True,
    progress: bool = True,
    scheduler: str | Client | None = None,
    n_jobs: int | None = None,
    errors: str = "raise",
    cluster_config: str | os.PathLike | dict | None = None,
) -> pd.DataFrame:
    """Notebook 06's step: predict the subjects of notebook 01's table into notebook 06's folder of ``workdir``.

    The bias-corrected T1 (on the FLAIR grid) and FLAIR, the brain mask and the WM mask of notebook 03 are
    used when it made them (:func:`wmloc_utils.registration.corrected_inputs`):
    the networks see only the brain and predict nothing outside it, the region network's labels
    stay inside the subject's WM, as the registered atlas's do, and predicted lesions not brighter on FLAIR
    than ``min_gm_contrast`` x grey matter are dropped and their voxels darker than grey matter trimmed
    (:func:`keep_hyperintense_lesions`; 0: all kept), those kept grown into neighbouring clearly hyperintense
    voxels of probability >= ``grow_to_prob`` (:func:`grow_lesions`; None: not grown). With ``drop_grey_matter``,
    lesions lying mostly in the atlas's grey matter (notebook 03's nonlinear fit) are dropped
    (:func:`outside_grey_matter`).

    Writes :data:`artefacts.PREDICTIONS` (only when its content changes; ``pred_ml`` and ``dropped_ml`` per subject,
    :func:`lesion_volumes`) and returns it; names the subjects whose lesions the filters mostly dropped
    (:func:`report_dropped`).
    ``scheduler``, ``n_jobs``, ``errors``, ``cluster_config``: where the subjects run (:func:`predict_cohort`).
    """
    from . import provenance

    workdir = Path(workdir)
    table, columns = _step_inputs(workdir, drop_grey_matter)
    out = artefacts.folder(workdir, artefacts.PREDICTIONS)
    predictions = predict_cohort(
        table,
        out,
        lesion_checkpoint,
        region_checkpoint,
        tta=tta,
        device=device,
        progress=progress,
        **columns,
        scheduler=scheduler,
        n_jobs=n_jobs,
        errors=errors,
        cluster_config=cluster_config,
        min_lesion_ml=min_lesion_ml,
        min_gm_contrast=min_gm_contrast,
        grow_to_prob=grow_to_prob,
    )
    provenance.write_table_if_changed(predictions, artefacts.path(workdir, artefacts.PREDICTIONS), index=False)
    report_dropped(predictions)
    return predictions


def _step_inputs(workdir: Path, drop_grey_matter: bool = True) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """Notebook 06's subjects with notebook 03's images and maps (:func:`predict_step`), and their column names
    (the atlas's grey matter only with ``drop_grey_matter``; the subjects notebook 03 made none for are named)."""
    from .registration import corrected_inputs, subjects_on_flair_grid

    table = corrected_inputs(subjects_on_flair_grid(workdir)).fillna({"t1": "", "flair": ""})
    wanted = (("brain", "brain_mask"), ("wm", "wm_mask"), ("tissue", "tissue"), ("grey", "atlas_grey_matter"))
    columns = {f"{key}_col": col if col in table else None for key, col in wanted}
    if not drop_grey_matter:
        columns["grey_col"] = None
    elif columns["brain_col"]:  # notebook 03 ran: every subject should have its atlas grey matter
        grey = table.get("atlas_grey_matter", pd.Series("", index=table.index)).astype(str)
        lacking = table.loc[grey.eq(""), "subject"].tolist()
        if lacking:
            print(
                f"subject(s) {', '.join(lacking)}: notebook 03's results predate the atlas grey matter, so the grey "
                "matter rule cannot drop their lesions; rerun notebook 03 (it redoes only what is missing)"
            )
    return table, columns


def compare_step(
    workdir: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    subjects: Sequence[str],
    tta: bool = False,
    device: str = "auto",
    min_gm_contrast: float = MIN_GM_CONTRAST,
    grow_to_prob: float | None = GROW_TO_PROB,
    drop_grey_matter: bool = True,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """More lesion networks (notebook 06's ``compare_checkpoints``) on ``subjects``, with the inputs, masks and
    lesion filters of :func:`predict_step`, so that every row of the comparison is measured alike.

    Checkpoint ``i`` (from 1) predicts into :data:`artefacts.COMPARED_PREDICTIONS` ``model{i}``; returns
    ``{checkpoint: predictions table}`` for :func:`score_lesions`.
    """
    workdir = Path(workdir)
    table, columns = _step_inputs(workdir, drop_grey_matter)
    table = table[table["subject"].isin(list(subjects))]
    return {
        str(ckpt): predict_cohort(
            table,
            artefacts.path(workdir, artefacts.COMPARED_PREDICTIONS, number=i),
            ckpt,
            tta=tta,
            device=device,
            progress=progress,
            **columns,
            min_gm_contrast=min_gm_contrast,
            grow_to_prob=grow_to_prob,
        )
        for i, ckpt in enumerate(checkpoints, 1)
    }


def score_lesions(models: dict, subjects: pd.DataFrame, test: list[str], progress: bool = True) -> pd.DataFrame:
    """The challenge's five metrics per test subject for each ``{checkpoint: predictions table}``.

    Rows: architecture, inputs, subject, dice, hd95, avd, recall, f1 (reference masks from ``subjects``).
    """
    from .metrics import wmh_metrics_img

    rows = []
    for ckpt, preds in models.items():
        config = load_segmenter(ckpt, "cpu").config
        chosen = (
            preds[preds["subject"].isin(test)]
            .drop(columns="lesion", errors="ignore")
            .merge(subjects[["subject", "lesion"]], on="subject")
        )
        for r in tqdm(list(chosen.itertuples()), desc=config["architecture"], disable=not progress):
            rows.append(
                {
                    "architecture": config["architecture"],
                    "inputs": config["inputs"],
                    "subject": r.subject,
                    **wmh_metrics_img(r.lesion, r.lesion_pred, subject=r.subject),
                }
            )
    return pd.DataFrame(rows)


def checkpoints(
    workdir: str | os.PathLike, lesion: str | os.PathLike | None = None, region: str | os.PathLike | bool | None = None
) -> tuple[Path, Path | None]:
    """The lesion and region networks a notebook applies: the checkpoints given, else notebooks 04's and 05's.

    ``region`` None takes notebook 05's only when it exists; ``False``: no region network.
    """
    lesion = artefacts.require(workdir, artefacts.LESION_MODEL, given=lesion)
    if region is False:
        return lesion, None
    if region:
        return lesion, artefacts.require(workdir, artefacts.REGION_MODEL, given=region)
    default = artefacts.path(workdir, artefacts.REGION_MODEL)
    return lesion, default if default.exists() else None
