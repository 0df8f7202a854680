"""Segmentation metrics of the MICCAI 2017 WMH segmentation challenge (Kuijf et al. 2019).

They follow the challenge's official ``evaluation.py``: the reference is label 1 of the
challenge mask, predicted voxels inside label 2 ("other pathology") are discarded before
scoring, boundaries for the Hausdorff distance come from an in-plane (3x3x1) erosion, and
lesions are 26-connected components. Array functions take voxel sizes (mm) so that
anisotropic grids such as 1x1x3 mm give distances and volumes in physical units.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from .atlas import LABEL_IDS, WM_REGIONS
from .errors import InputError
from .images import check_labels, check_same_grid, load_nifti

WMH, OTHER_PATHOLOGY = 1, 2
_CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)
_INPLANE_3x3x1 = np.ones((3, 3, 1), dtype=bool)


def prepare(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary reference (label 1) and prediction with voxels in label 2 of the reference removed."""
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise InputError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    if reference.ndim != 3:
        raise InputError(f"masks must be 3D, got shape {reference.shape}")
    ref = reference == WMH
    pred = (prediction > 0.5) & (reference != OTHER_PATHOLOGY)
    return ref, pred


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks (NaN when both are empty, as 0/0)."""
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    total = int(ref.sum()) + int(pred.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(ref, pred).sum()) / total


def boundary(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of a mask: the mask minus its in-plane erosion (3x3x1, slices along the last axis).

    Like ITK's ``BinaryErode`` used by the challenge, voxels beyond the image edge count as
    foreground, so a mask touching the edge is not eroded from there.
    """
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_INPLANE_3x3x1, border_value=1)


def hd95(ref: np.ndarray, pred: np.ndarray, zooms: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance (mm) between mask boundaries; NaN if either mask is empty."""
    zooms = np.asarray(zooms, float)[:3]
    a = np.argwhere(boundary(ref)) * zooms
    b = np.argwhere(boundary(pred)) * zooms
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    d_ab = cKDTree(a).query(b, k=1)[0]
    d_ba = cKDTree(b).query(a, k=1)[0]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def avd(ref: np.ndarray, pred: np.ndarray) -> float:
    """Absolute volume difference in percent of the reference volume (NaN for an empty reference)."""
    v_ref, v_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    return float("nan") if v_ref == 0 else abs(v_ref - v_pred) / v_ref * 100.0


def lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask: (label array, number of lesions)."""
    return ndimage.label(np.asarray(mask, bool), structure=_CONNECTIVITY_26)


def lesion_detection(ref: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Lesion recall and lesion F1 as the official ``evaluation.py`` counts them (version of August 2017 on).

    Lesions are 26-connected components. Recall = reference lesions that any predicted voxel
    overlaps / reference lesions (1 without reference lesions). Precision = *predicted* components
    that overlap a reference lesion / all predicted components (1 without predictions). So one
    predicted component bridging two reference lesions gives recall 1 and precision 1, and two
    predicted components on one reference lesion give precision 1 as well.
    """
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    ref_cc, n_ref = lesions(ref)
    pred_cc, n_pred = lesions(pred)
    n_detected = len(np.unique(ref_cc[pred & (ref_cc > 0)]))
    n_true_pred = len(np.unique(pred_cc[ref & (pred_cc > 0)]))
    recall = 1.0 if n_ref == 0 else n_detected / n_ref
    precision = 1.0 if n_pred == 0 else n_true_pred / n_pred
    f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return float(recall), float(f1)


def wmh_metrics(reference: np.ndarray, prediction: np.ndarray, zooms: Sequence[float]) -> dict:
    """The five challenge metrics (dice, hd95 mm, avd %, lesion recall, lesion f1) of one subject.

    ``reference`` is the challenge mask (0, 1 WMH, 2 other pathology) or a binary mask,
    ``prediction`` a binary mask on the same grid, ``zooms`` the voxel size (mm) of the reference.
    """
    zooms = np.asarray(zooms, float)[:3]
    if zooms.shape != (3,) or not np.all(np.isfinite(zooms)) or (zooms <= 0).any():
        raise InputError(
            f"voxel sizes must be three positive numbers (mm), got {zooms.tolist()}: distances and volumes "
            f"would be wrong (check the image header's pixdim)"
        )
    ref, pred = prepare(reference, prediction)
    recall, f1 = lesion_detection(ref, pred)
    return {"dice": dice(ref, pred), "hd95": hd95(ref, pred, zooms), "avd": avd(ref, pred), "recall": recall, "f1": f1}


def _as_image(img_or_path, subject: str | None, what: str) -> tuple[nib.Nifti1Image, str]:
    if isinstance(img_or_path, (str, os.PathLike)):
        return load_nifti(img_or_path, subject=subject, what=what), str(img_or_path)
    name = getattr(img_or_path, "get_filename", lambda: None)() or what
    return img_or_path, str(name)


def wmh_metrics_img(reference, prediction, subject: str | None = None) -> dict:
    """:func:`wmh_metrics` for images or paths: same grid required, reference labels {0,1,2}, prediction {0,1}."""
    ref_img, ref_name = _as_image(reference, subject, "reference mask")
    pred_img, pred_name = _as_image(prediction, subject, "predicted mask")
    check_same_grid(ref_img, pred_img, ref_name, pred_name, subject=subject)
    ref = check_labels(ref_img, (0, WMH, OTHER_PATHOLOGY), ref_name, subject, what="reference mask")
    pred = check_labels(pred_img, (0, 1), pred_name, subject, what="predicted mask")
    return wmh_metrics(ref, pred, ref_img.header.get_zooms()[:3])


def region_dice(reference: np.ndarray, prediction: np.ndarray, labels: Iterable[int]) -> pd.Series:
    """Dice per region label (NaN where a region is absent from both maps) and their ``mean``."""
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise InputError(f"reference shape {reference.shape} differs from prediction shape {prediction.shape}")
    labels = [int(lab) for lab in labels]
    for name, arr in (("reference", reference), ("prediction", prediction)):
        if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0):
            raise InputError(
                f"region {name} map must hold labels >= 0, found {np.unique(arr[~(arr >= 0)])[:5].tolist()}"
            )
    # one joint histogram instead of a pass over the volume per label
    n = int(max(reference.max(initial=0), prediction.max(initial=0), max(labels, default=0))) + 1
    r, p = (np.rint(a).astype(np.int64).ravel() for a in (reference, prediction))
    size_r = np.bincount(r, minlength=n)
    size_p = np.bincount(p, minlength=n)
    inter = np.bincount(r[r == p], minlength=n)
    scores = {}
    for lab in labels:
        total = size_r[lab] + size_p[lab]
        scores[lab] = float("nan") if total == 0 else 2.0 * inter[lab] / total
    out = pd.Series(scores, name="dice", dtype=float)
    out.index.name = "region"
    out.loc["mean"] = out.mean()
    return out


def score_regions(regions: nib.spatialimages.SpatialImage, truth: nib.spatialimages.SpatialImage) -> pd.Series:
    """Two refined region maps compared: Dice per label 1..36, ``mean`` over the WM regions 1..34, ``wm``
    the Dice of their labelled voxels (the WM each map covers)."""
    pred, ref = np.asanyarray(regions.dataobj), np.asanyarray(truth.dataobj)
    scores = region_dice(ref, pred, LABEL_IDS)
    scores.loc["mean"] = scores.loc[list(WM_REGIONS)].mean()
    scores.loc["wm"] = dice(pred > 0, ref > 0)
    return scores
