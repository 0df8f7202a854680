"""The built-in demo cohort: synthetic T1/FLAIR/WMH subjects made from nilearn's MNI152 template.

No WMH data set can be downloaded offline, so wmloc makes one with real structure to find:

- each subject is the MNI152 template (or, ``brain="eve"``, another brain: the JHU Eve subject) under
  a random affine (rotation up to 10 degrees, scale 0.9-1.1, translation up to 10 mm) plus a smooth
  random deformation, sampled on the subject's own grid (2 mm isotropic by default, 1 mm, 1x1x3 mm,
  or ``grid="challenge"``: the MICCAI sites' voxel sizes, stored LPS and oblique), stored RAS or LAS;
- T1 and FLAIR are synthesised from the tissue maps with subject-specific intensities, partial
  volume, a smooth bias field and noise; WMH are hypointense on T1 and hyperintense on FLAIR;
- WMH follow spatial priors (periventricular caps and bands, deep punctate and confluent lesions),
  always inside WM, 0.5-50 mL; some subjects carry a lacune-like hole labelled 2 ("other pathology");
- four groups have distinct regional patterns (frontal periventricular, posterior periventricular,
  deep subcortical, low load) and covariates (age, sex) in ``participants.tsv``;
- options for testing generalisation: a skull and scalp on all or some sites (``skull="mixed"``),
  stronger scanner contrast jitter (``contrast``) and lesion-free subjects (``lesion_free_every``).

The cohort is written in the MICCAI 2017 WMH challenge layout, with the truth kept beside each
subject in ``truth/``: the true tissue classes and the true template-to-subject transform, which
:func:`warp_from_template` uses to carry any template-space image (e.g. atlas regions) into a subject.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from .cluster import run_each, run_here, worker_count
from .images import atomic_path, save_nifti, write_table_atomic

GROUPS = ("frontal_pv", "posterior_pv", "deep", "low_load")
SITES = {"siteA": "RAS", "siteB": "LAS", "siteC": "RAS"}
GRIDS = {"2mm": (2.0, 2.0, 2.0), "1mm": (1.0, 1.0, 1.0), "aniso": (1.0, 1.0, 3.0)}
# grid="challenge": per-site voxel sizes (mm) of the MICCAI 2017 WMH FLAIR grids (as in the headers of the
# challenge's pre/ images and the paper authors' subject maps: 240x240x48, 232x256x48, 132x256x83; every
# site has 3 mm slices), stored LPS on an oblique grid.
CHALLENGE_SITES = {"Utrecht": (0.96, 0.95, 3.0), "Singapore": (1.0, 1.0, 3.0), "GE3T": (1.2, 0.98, 3.0)}
GRID_CHOICES = (*GRIDS, "challenge")
BRAINS = ("mni152", "eve")
MAX_OBLIQUE_DEG = 8.0  # challenge grids: rotation of the voxel axes relative to the scanner's world axes
FOV_MM = np.array([188.0, 224.0, 188.0])
FORMAT_VERSION = 2  # 2: contrast jitter keeps the physical tissue order (cohorts of version 1 are remade)

# Tissue intensities (fraction of the scanner's range) before subject jitter: CSF, GM, WM, lesion.
T1_MEANS = np.array([0.22, 0.55, 0.82, 0.58])
FLAIR_MEANS = np.array([0.12, 0.62, 0.45, 1.00])
# Least GM/WM contrast a jittered scanner keeps (T1w WM/GM, FLAIR GM/WM; nominal 1.49 and 1.38; 3T and 1.5T
# scanners give about 1.2-1.6 on T1w and 1.1-1.4 on FLAIR).
MIN_GM_WM_RATIO = 1.15
# Group priors: load range (mL), where seeds may go, and lesion radius range (mm).
GROUP_PRIORS = {
    "frontal_pv": dict(load=(8.0, 45.0), where="frontal_pv", radius=(3.0, 6.5), age=(68, 6)),
    "posterior_pv": dict(load=(8.0, 45.0), where="posterior_pv", radius=(3.0, 6.5), age=(73, 6)),
    "deep": dict(load=(3.0, 18.0), where="deep", radius=(1.5, 4.0), age=(70, 6)),
    "low_load": dict(load=(0.5, 2.5), where="any", radius=(1.2, 2.5), age=(56, 7)),
}


@dataclass(frozen=True)
class CohortSpec:
    """What defines a demo cohort; the same spec and seed always give the same files."""

    n_subjects: int = 24
    seed: int = 0
    grid: str = "2mm"
    skull: bool | str = False  # True, False or "mixed" (on the first and third site, not the second)
    lacune_every: int = 5
    brain: str = "mni152"  # "mni152" (nilearn's template) or "eve" (the JHU Eve subject; needs WMLOC_DATA)
    contrast: float = 0.0  # extra scanner jitter: tissue intensities, gamma, bias and noise (0: none)
    lesion_free_every: int = 0  # every k-th subject has no lesions at all (0: none)


# ---------------------------------------------------------------- template space
@dataclass(frozen=True)
class Template:
    """The MNI152 1 mm template maps used to synthesise subjects (world coordinates in mm)."""

    affine: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    vent_dist: np.ndarray  # mm from the lateral ventricles
    out_dist: np.ndarray  # mm outside the brain mask (0 inside)


@lru_cache(maxsize=2)
def template(brain: str = "mni152") -> Template:
    """Template maps of a brain: nilearn's MNI152 (shipped in its wheel) or the JHU Eve subject (``brain="eve"``).

    Eve's header has no origin, so its world is shifted to put its brain's centre of mass on MNI152's:
    the lesion priors (template coordinates in mm) then mean the same places in both brains.
    """
    from nilearn import datasets

    if brain not in BRAINS:
        raise ValueError(f"brain must be one of {list(BRAINS)}, got {brain!r}")
    mni_mask = datasets.load_mni152_brain_mask(resolution=1)
    if brain == "mni152":
        gm = datasets.load_mni152_gm_template(resolution=1).get_fdata().astype(np.float32)
        wm = datasets.load_mni152_wm_template(resolution=1).get_fdata().astype(np.float32)
        return _derive_template(mni_mask.affine, gm, wm, mni_mask.get_fdata() > 0.5)
    from .atlas import load_eve

    eve = load_eve()
    classes = np.asanyarray(eve["tissue"].dataobj)
    mask = (np.asanyarray(eve["mask"].dataobj) > 0) | (classes > 0)
    # Fractions from Eve's own T1 (a fuzzy linear model between the tissue means), which keeps its partial
    # volume: Eve's class 1 is a CSF/GM mix (T1 between CSF and GM); its pure CSF is class 0 inside the mask.
    t1 = eve["t1"].get_fdata(dtype=np.float32)
    m_csf, m_gm, m_wm = (np.median(t1[sel & mask]) for sel in (classes == 0, classes == 2, classes == 3))
    gm_up = np.clip((t1 - m_csf) / (m_gm - m_csf), 0, 1)
    wm = np.where(mask, np.clip((t1 - m_gm) / (m_wm - m_gm), 0, 1), 0).astype(np.float32)
    gm = np.where(mask & (wm == 0), gm_up, np.where(mask, 1 - wm, 0)).astype(np.float32)
    affine = eve["tissue"].affine.copy()

    def centre(m, aff):
        return aff[:3, :3] @ np.array(ndimage.center_of_mass(m)) + aff[:3, 3]

    affine[:3, 3] += centre(mni_mask.get_fdata() > 0.5, mni_mask.affine) - centre(mask, affine)
    return _derive_template(affine, gm, wm, mask)


def _derive_template(affine: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> Template:
    """CSF (brain minus GM and WM), lateral-ventricle and outside-brain distances: the same for every brain."""
    total = gm + wm
    scale = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0, 1), 0).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain)
    vent = (csf > 0.6) & (depth > 18)
    lab, n = ndimage.label(vent)
    sizes = ndimage.sum(vent, lab, range(1, n + 1))
    keep = np.isin(lab, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    vent_dist = ndimage.distance_transform_edt(~keep).astype(np.float32)
    out_dist = ndimage.distance_transform_edt(~brain).astype(np.float32)
    return Template(affine, csf, gm, wm, brain, vent_dist, out_dist)


def _sample(
    volume: np.ndarray, tmpl_affine: np.ndarray, coords_mm: np.ndarray, order: int = 1, cval: float = 0.0
) -> np.ndarray:
    """Sample a template-space volume at world coordinates (..., 3) in mm."""
    inv = np.linalg.inv(tmpl_affine)
    vox = coords_mm @ inv[:3, :3].T + inv[:3, 3]
    flat = vox.reshape(-1, 3).T
    out = ndimage.map_coordinates(volume, flat, order=order, mode="constant", cval=cval, prefilter=False)
    return out.reshape(coords_mm.shape[:-1])


# ---------------------------------------------------------------- the true transform
def _random_transform(rng: np.random.Generator) -> dict:
    """A random subject->template pull-back: affine M then a smooth displacement on a coarse grid."""
    ang = np.deg2rad(rng.uniform(-10, 10, 3))
    scale = rng.uniform(0.9, 1.1, 3)  # subject size relative to the template
    fwd = np.eye(4)
    fwd[:3, :3] = _rotation(ang) @ np.diag(scale)
    fwd[:3, 3] = rng.uniform(-10, 10, 3)
    control = rng.normal(0.0, 2.5, size=(3, 5, 6, 5))  # mm, smooth after cubic interpolation
    return {
        "template_to_subject": fwd.tolist(),
        "control_mm": control.tolist(),
        "control_box_mm": [[-96.0, -132.0, -78.0], [96.0, 96.0, 112.0]],
    }


def _pullback(transform: dict, world_mm: np.ndarray) -> np.ndarray:
    """Map subject world points (..., 3) to template world points: x = M^-1 y + d(M^-1 y)."""
    inv = np.linalg.inv(np.asarray(transform["template_to_subject"]))
    x = world_mm @ inv[:3, :3].T + inv[:3, 3]
    control = np.asarray(transform["control_mm"])
    lo, hi = (np.asarray(v) for v in transform["control_box_mm"])
    grid = (x - lo) / (hi - lo) * (np.array(control.shape[1:]) - 1)
    flat = grid.reshape(-1, 3).T
    disp = np.stack([ndimage.map_coordinates(c, flat, order=3, mode="nearest") for c in control], axis=-1)
    return x + disp.reshape(x.shape)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (x, y, z) in radians."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _subject_grid(
    transform: dict, voxel: tuple[float, float, float], orientation: str, oblique_deg: np.ndarray | None = None
) -> tuple[tuple, np.ndarray]:
    """Shape and affine of a subject grid centred on the subject's brain, stored RAS, LAS or LPS.

    ``oblique_deg`` (x, y, z angles) rotates the voxel axes, as an oblique acquisition's header does.
    """
    fwd = np.asarray(transform["template_to_subject"])
    centre = fwd[:3, :3] @ np.array([0.0, -18.0, 18.0]) + fwd[:3, 3]
    vox = np.asarray(voxel)
    shape = tuple(int(s) for s in np.ceil(FOV_MM / vox).astype(int))
    signs = {"RAS": (1, 1, 1), "LAS": (-1, 1, 1), "LPS": (-1, -1, 1)}[orientation]
    aff = np.diag([*(vox * signs), 1.0])
    if oblique_deg is not None:
        aff[:3, :3] = _rotation(np.deg2rad(oblique_deg)) @ aff[:3, :3]
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, aff


def _world_coords(shape: tuple, affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def template_coords(truth_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Template world coordinates (mm) of every voxel of a demo subject's FLAIR grid, and that grid's affine."""
    info = json.loads((Path(truth_dir) / "transform.json").read_text())
    shape, affine = tuple(info["shape"]), np.asarray(info["affine"])
    return _pullback(info, _world_coords(shape, affine)), affine


def warp_from_template(
    img: nib.spatialimages.SpatialImage, truth_dir: str | os.PathLike, order: int = 0
) -> nib.Nifti1Image:
    """Carry an image in MNI152 world space (any grid) into a demo subject through its true transform.

    ``order=0`` (nearest neighbour) is right for label maps; ``order=1`` for continuous maps.
    """
    coords, affine = template_coords(truth_dir)
    data = np.asanyarray(img.dataobj)
    out = _sample(data.astype(np.float32), img.affine, coords, order=order)
    if order == 0:
        out = np.rint(out).astype(data.dtype if np.issubdtype(data.dtype, np.integer) else np.int16)
    return _image(out, affine)


# ---------------------------------------------------------------- lesions and images
def _lesion_candidates(where: str, coords: np.ndarray, vent: np.ndarray, wm: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Voxels where a group may seed lesions, from template coordinates and ventricle distance."""
    y, z = coords[..., 1], coords[..., 2]
    inside = wm > 0.75
    if where == "frontal_pv":
        return inside & (vent < 7) & (y > 5)
    if where == "posterior_pv":
        return inside & (vent < 7) & (y < -28)
    if where == "deep":
        return inside & (vent > 14) & (z > 12) & (z < 55)
    return inside & (vent > 6)


def _make_lesions(
    rng: np.random.Generator,
    prior: dict,
    coords: np.ndarray,
    vent: np.ndarray,
    wm_true: np.ndarray,
    voxel: tuple[float, float, float],
) -> np.ndarray:
    """Grow Gaussian blobs (in template mm) at prior-weighted seeds until the target WM load is reached.

    Each blob only touches a window of voxels around its seed, so the cost does not grow with the grid.
    """
    target = rng.uniform(*prior["load"])
    voxel_ml = float(np.prod(voxel)) / 1000
    cand = np.flatnonzero(_lesion_candidates(prior["where"], coords, vent, wm_true.astype(np.float32), None) & wm_true)
    field = np.zeros(wm_true.shape, np.float32)
    lesion = np.zeros(wm_true.shape, bool)
    count = 0
    for _ in range(400):
        if cand.size == 0 or count * voxel_ml >= target:
            break
        seed = np.unravel_index(rng.choice(cand), wm_true.shape)
        centre = coords[seed]
        r = rng.uniform(*prior["radius"])
        axes = r * rng.uniform(0.7, 1.5, 3)  # elongated caps and bands
        half = np.ceil(3.5 * axes.max() / np.asarray(voxel)).astype(int)  # 3 sd, with room for scale and warp
        win = tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(seed, half))
        d2 = (((coords[win] - centre) / axes) ** 2).sum(-1)
        field[win] += np.exp(-0.5 * d2).astype(np.float32)
        grown = (field[win] > 0.5) & wm_true[win]
        count += int(grown.sum()) - int(lesion[win].sum())
        lesion[win] = grown
    return lesion


def _smooth_field(rng: np.random.Generator, shape: tuple, strength: float) -> np.ndarray:
    """A smooth multiplicative bias field around 1 (a low-order random polynomial)."""
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    c = rng.normal(0, strength / 2, 9)
    poly = (
        c[0] * x
        + c[1] * y
        + c[2] * z
        + c[3] * x * y
        + c[4] * y * z
        + c[5] * x * z
        + c[6] * x * x
        + c[7] * y * y
        + c[8] * z * z
    )
    return np.exp(poly).astype(np.float32)


def _contrast(
    pv: np.ndarray,
    means: np.ndarray,
    rng: np.random.Generator,
    bias: np.ndarray,
    noise: float,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """Mix tissue fractions (…, 4: CSF, GM, WM, lesion) into one image with jittered intensities, bias and noise."""
    mu = means * rng.uniform(0.92, 1.08, 4)
    img = (pv * mu).sum(-1)
    if extra is not None:
        img = img + extra
    img = img * bias
    real = img + rng.normal(0, noise, img.shape)
    imag = rng.normal(0, noise, img.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)  # Rician magnitude noise


def _site_grid(index: int, spec: CohortSpec, extra: np.random.Generator) -> tuple[str, tuple, str, np.ndarray | None]:
    """Site name, voxel size, stored orientation and header obliquity (degrees) of subject ``index``."""
    if spec.grid == "challenge":
        site = list(CHALLENGE_SITES)[index % len(CHALLENGE_SITES)]
        return site, CHALLENGE_SITES[site], "LPS", extra.uniform(-MAX_OBLIQUE_DEG, MAX_OBLIQUE_DEG, 3)
    site = list(SITES)[index % len(SITES)]
    return site, GRIDS[spec.grid], SITES[site], None


def _has_skull(index: int, spec: CohortSpec) -> bool:
    """Whether subject ``index`` keeps a skull and scalp (``skull="mixed"``: all but the second site)."""
    if spec.skull == "mixed":
        return index % 3 != 1
    return bool(spec.skull)


def plausible_contrast(t1_means: np.ndarray, flair_means: np.ndarray) -> bool:
    """Whether tissue means (CSF, GM, WM, lesion) keep the order physics gives every T1w and FLAIR scanner.

    T1w: CSF < GM < WM with WM/GM >= :data:`MIN_GM_WM_RATIO`, lesions darker than WM; FLAIR: CSF < WM < GM
    with GM/WM >= :data:`MIN_GM_WM_RATIO`, lesions brighter than GM. Independent jitter per tissue
    can otherwise make GM and WM equal, an image no scanner produces and no tissue segmentation can read.
    """
    c, g, w, les = t1_means
    fc, fg, fw, fles = flair_means
    return bool(
        c < g < w and w >= MIN_GM_WM_RATIO * g and les < w and fc < fw < fg and fg >= MIN_GM_WM_RATIO * fw and fles > fg
    )


def _scanner(extra: np.random.Generator, strength: float) -> dict:
    """Scanner-specific changes drawn for ``contrast=strength``: tissue intensity factors, gamma, bias, noise, scale.

    Tissue factors are redrawn until the tissue order is physically plausible (:func:`plausible_contrast`).
    """
    if strength <= 0:
        return {"t1": 1.0, "flair": 1.0, "gamma": (1.0, 1.0), "bias": 1.0, "noise": 1.0, "scale": 1.0}
    while True:
        t1, flair = extra.uniform(1 - strength, 1 + strength, 4), extra.uniform(1 - strength, 1 + strength, 4)
        if plausible_contrast(T1_MEANS * t1, FLAIR_MEANS * flair):
            break
    return {
        "t1": t1,
        "flair": flair,
        "gamma": tuple(np.exp(extra.uniform(-strength, strength, 2))),
        "bias": 1 + strength * extra.uniform(0, 3),
        "noise": 1 + strength * extra.uniform(0, 4),
        "scale": float(np.exp(extra.uniform(-1, 1))),
    }


def make_subject(index: int, spec: CohortSpec) -> dict:
    """Synthesise one subject: images, lesion mask, true tissues and transform, and its covariates."""
    rng = np.random.default_rng([spec.seed, index])
    extra = np.random.default_rng([spec.seed, index, 1])  # options' draws: the default cohort's stream is unchanged
    t = template(spec.brain)
    lesion_free = bool(spec.lesion_free_every) and index % spec.lesion_free_every == spec.lesion_free_every - 1
    group = GROUPS[index % len(GROUPS)]
    prior = GROUP_PRIORS[group]
    transform = _random_transform(rng)
    site, voxel, orientation, oblique = _site_grid(index, spec, extra)
    shape, affine = _subject_grid(transform, voxel, orientation, oblique)
    coords = _pullback(transform, _world_coords(shape, affine))
    # partial volume: blur the template maps to the subject's voxel size before sampling
    sigma = tuple(max(v / 2.355 - 0.3, 0.0) for v in voxel)
    maps = [ndimage.gaussian_filter(m, sigma) if max(sigma) > 0 else m for m in (t.csf, t.gm, t.wm)]
    csf, gm, wm = (_sample(m, t.affine, coords) for m in maps)
    vent = _sample(t.vent_dist, t.affine, coords, cval=100.0)
    out = _sample(t.out_dist, t.affine, coords, cval=100.0)
    tissue = np.argmax(np.stack([np.full(shape, 0.2, np.float32), csf, gm, wm], -1), -1).astype(np.uint8)
    tissue[(csf + gm + wm) < 0.35] = 0
    voxel_ml = float(np.prod(voxel)) / 1000
    if lesion_free:
        lesion = np.zeros(shape, bool)
    else:
        lesion = _make_lesions(rng, prior, coords, vent, tissue == 3, voxel)
    wmh = lesion.astype(np.uint8)
    lacune = np.zeros(shape, bool)
    if spec.lacune_every and index % spec.lacune_every == spec.lacune_every - 1 and not lesion_free:
        cand = np.flatnonzero(((tissue == 3) & ~lesion & (vent > 6) & (vent < 20)).ravel())
        centre = coords.reshape(-1, 3)[rng.choice(cand)]
        lacune = (np.linalg.norm(coords - centre, axis=-1) < rng.uniform(2.5, 4.5)) & (tissue == 3) & ~lesion
        wmh[lacune] = 2
        tissue[lacune] = 1
    # tissue fractions with lesions replacing WM and lacunes replacing WM by CSF
    les_pv = ndimage.gaussian_filter(lesion.astype(np.float32), 0.6) * (wm > 0.2)
    les_pv = np.maximum(les_pv, lesion * 0.9)
    wm_eff = wm * (1 - les_pv)
    csf_eff = np.where(lacune, csf + wm, csf)
    wm_eff = np.where(lacune, 0, wm_eff)
    pv = np.stack([csf_eff, gm, wm_eff, wm * les_pv], -1)
    t1_extra = flair_extra = None
    if _has_skull(index, spec):
        skull = ((out > 3) & (out < 8)).astype(np.float32)
        scalp = ((out >= 8) & (out < 14)).astype(np.float32)
        t1_extra = 0.05 * skull + 0.9 * scalp
        flair_extra = 0.04 * skull + 0.55 * scalp
    sc = _scanner(extra, spec.contrast)
    bias = _smooth_field(rng, shape, 0.25 * sc["bias"])
    t1 = _contrast(pv, T1_MEANS * sc["t1"], rng, bias, 0.02 * sc["noise"], t1_extra)
    flair = _contrast(
        pv,
        FLAIR_MEANS * sc["flair"],
        rng,
        bias * _smooth_field(rng, shape, 0.1 * sc["bias"]),
        0.025 * sc["noise"],
        flair_extra,
    )
    if spec.contrast > 0:  # a scanner-specific non-linear intensity response
        t1, flair = (np.power(np.maximum(img, 0), g) for img, g in zip((t1, flair), sc["gamma"]))
    tissue[lesion] = 3
    scale = 1000 * sc["scale"]
    return {
        "id": f"{index + 1:03d}",
        "site": site,
        "group": "none" if lesion_free else group,
        "affine": affine,
        "transform": dict(transform, template=spec.brain) if spec.brain != "mni152" else transform,
        "t1": np.clip(t1 * scale, 0, 32767).astype(np.int16),
        "flair": np.clip(flair * scale, 0, 32767).astype(np.int16),
        "wmh": wmh,
        "tissue": tissue,
        "age": int(round(rng.normal(*prior["age"]))),
        "sex": str(rng.choice(["F", "M"])),
        "lesion_ml": float(lesion.sum() * voxel_ml),
    }


def _image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_subject(subj: dict, root: Path) -> Path:
    """Write one subject in the challenge layout (plus ``truth/``), atomically via a temporary folder."""
    final = root / subj["site"] / subj["id"]
    tmp = root / subj["site"] / f".{subj['id']}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    aff = subj["affine"]
    save_nifti(_image(subj["t1"], aff), tmp / "pre" / "T1.nii.gz")
    save_nifti(_image(subj["flair"], aff), tmp / "pre" / "FLAIR.nii.gz")
    save_nifti(_image(subj["wmh"], aff), tmp / "wmh.nii.gz")
    save_nifti(_image(subj["tissue"], aff), tmp / "truth" / "tissue.nii.gz")
    info = dict(
        subj["transform"],
        shape=list(subj["t1"].shape),
        affine=aff.tolist(),
        note="subject world y -> template world x = inv(template_to_subject) y + d(.)",
    )
    (tmp / "truth" / "transform.json").write_text(json.dumps(info))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def generate(
    root: str | os.PathLike,
    n_subjects: int = 24,
    seed: int = 0,
    grid: str = "2mm",
    skull: bool | str = False,
    progress: bool = True,
    brain: str = "mni152",
    contrast: float = 0.0,
    lesion_free_every: int = 0,
    lacune_every: int = 5,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Generate (or reuse, when the same spec is already there) the demo cohort; return participants.

    ``grid``: "2mm", "1mm", "aniso" (1x1x3 mm) or "challenge" (per-site MICCAI-like voxels, LPS, oblique);
    ``skull``: True, False or "mixed"; ``brain``: "mni152" or "eve"; see :class:`CohortSpec` for the rest.
    Subjects are made in ``n_jobs`` processes (None: one per CPU core); each has its own random stream,
    so the files are the same for any number (24 subjects at 2 mm: 26 s instead of 57 s on 2 cores).

    Files: ``<root>/<site>/<id>/pre/{T1,FLAIR}.nii.gz``, ``<root>/<site>/<id>/wmh.nii.gz``,
    ``<root>/<site>/<id>/truth/{tissue.nii.gz,transform.json}``, ``<root>/participants.tsv``, ``<root>/cohort.json``.
    """
    if grid not in GRID_CHOICES:
        raise ValueError(f"grid must be one of {sorted(GRID_CHOICES)}, got {grid!r}")
    if brain not in BRAINS:
        raise ValueError(f"brain must be one of {list(BRAINS)}, got {brain!r}")
    if skull not in (True, False, "mixed"):
        raise ValueError(f"skull must be True, False or 'mixed', got {skull!r}")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    if contrast < 0 or lesion_free_every < 0:
        raise ValueError(f"contrast ({contrast}) and lesion_free_every ({lesion_free_every}) must not be negative")
    spec = CohortSpec(
        n_subjects=n_subjects,
        seed=seed,
        grid=grid,
        skull=skull,
        lacune_every=lacune_every,
        brain=brain,
        contrast=float(contrast),
        lesion_free_every=int(lesion_free_every),
    )
    root = Path(root)
    stamp = root / "cohort.json"
    want = dict(asdict(spec), format=FORMAT_VERSION)
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want:
        return pd.read_csv(root / "participants.tsv", sep="\t", dtype={"participant_id": str})
    stamp.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*/*/truth/transform.json"):  # subjects of an earlier demo spec (fewer subjects next time)
        shutil.rmtree(old.parent.parent)
    jobs = [(i, spec, root) for i in range(n_subjects)]
    n_jobs = worker_count(n_jobs, n_subjects)
    made = run_each(_make_and_write, jobs, n_jobs) if n_jobs > 1 else run_here(_make_and_write, jobs)
    rows = [None] * n_subjects
    for i, result in tqdm(made, total=n_subjects, desc="demo subjects", disable=not progress):
        if isinstance(result, BaseException):
            raise result
        rows[i] = result
    seconds = [row.pop("seconds") for row in rows]
    participants = pd.DataFrame(rows)
    write_table_atomic(participants, root / "participants.tsv", index=False)
    with atomic_path(stamp) as tmp:  # written last: its presence means the whole cohort is there
        tmp.write_text(json.dumps({"spec": want, "seconds_per_subject": float(np.mean(seconds))}, indent=1))
    return participants


def _make_and_write(job: tuple[int, CohortSpec, Path]) -> dict:
    """Make subject ``index`` of ``spec``, write it under ``root``; its participants row (and its seconds)."""
    index, spec, root = job
    start = time.perf_counter()
    subj = make_subject(index, spec)
    write_subject(subj, root)
    return {
        "participant_id": subj["id"],
        "site": subj["site"],
        "group": subj["group"],
        "age": subj["age"],
        "sex": subj["sex"],
        "lesion_ml": round(subj["lesion_ml"], 3),
        "seconds": time.perf_counter() - start,
    }


def withhold_masks(root: str | os.PathLike, dest: str | os.PathLike) -> dict[str, Path]:
    """Move every subject's lesion mask out of a challenge-layout cohort into ``dest/<id>.nii.gz``.

    What is left is a cohort as a new user has it, without manual masks; the withheld masks serve to
    score the apply path afterwards. Returns {subject id: withheld mask}; idempotent.
    """
    root, dest = Path(root), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for mask in sorted(root.glob("*/*/wmh.nii.gz")):
        os.replace(mask, dest / f"{mask.parent.name}.nii.gz")
    return {p.name.removesuffix(".nii.gz"): p for p in sorted(dest.glob("*.nii.gz"))}


def main(argv: list[str] | None = None) -> None:
    """Command line: ``wmloc-demo OUT [--n-subjects N] [--seed S] [--grid G] [--skull | --mixed-skull] [--brain B] ...``."""
    parser = argparse.ArgumentParser(description="Generate the wmloc synthetic demo cohort (WMH challenge layout).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-subjects", type=int, default=CohortSpec.n_subjects)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", choices=sorted(GRID_CHOICES), default="2mm")
    parser.add_argument("--skull", action="store_true", help="add a synthetic skull and scalp (not skull-stripped)")
    parser.add_argument("--mixed-skull", action="store_true", help="skull and scalp on the first and third site only")
    parser.add_argument("--brain", choices=BRAINS, default="mni152", help="template brain (eve needs WMLOC_DATA)")
    parser.add_argument("--contrast", type=float, default=0.0, help="extra scanner contrast jitter (e.g. 0.3)")
    parser.add_argument("--lesion-free-every", type=int, default=0, help="every k-th subject has no lesions")
    args = parser.parse_args(argv)
    table = generate(
        args.out,
        args.n_subjects,
        args.seed,
        args.grid,
        "mixed" if args.mixed_skull else args.skull,
        brain=args.brain,
        contrast=args.contrast,
        lesion_free_every=args.lesion_free_every,
    )
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
