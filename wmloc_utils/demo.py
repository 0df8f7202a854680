"""The built-in demo cohort: synthetic T1/FLAIR/WMH subjects made from nilearn's MNI152 template.

No WMH data set can be downloaded offline, so wmloc makes one with real structure to find:

- each subject is the MNI152 template under a random affine (rotation up to 10 degrees, scale
  0.9-1.1, translation up to 10 mm) plus a smooth random deformation, sampled on the subject's
  own grid (2 mm isotropic by default, 1 mm, or a challenge-like 1x1x3 mm), stored RAS or LAS;
- T1 and FLAIR are synthesised from the tissue maps with subject-specific intensities, partial
  volume, a smooth bias field and noise; WMH are hypointense on T1 and hyperintense on FLAIR;
- WMH follow spatial priors (periventricular caps and bands, deep punctate and confluent lesions),
  always inside WM, 0.5-50 mL; some subjects carry a lacune-like hole labelled 2 ("other pathology");
- four groups have distinct regional patterns (frontal periventricular, posterior periventricular,
  deep subcortical, low load) and covariates (age, sex) in ``participants.tsv``.

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

from .images import atomic_path, save_nifti, write_table_atomic

GROUPS = ("frontal_pv", "posterior_pv", "deep", "low_load")
SITES = {"siteA": "RAS", "siteB": "LAS", "siteC": "RAS"}
GRIDS = {"2mm": (2.0, 2.0, 2.0), "1mm": (1.0, 1.0, 1.0), "aniso": (1.0, 1.0, 3.0)}
FOV_MM = np.array([188.0, 224.0, 188.0])
FORMAT_VERSION = 1

# Tissue intensities (fraction of the scanner's range) before subject jitter: CSF, GM, WM, lesion.
T1_MEANS = np.array([0.22, 0.55, 0.82, 0.58])
FLAIR_MEANS = np.array([0.12, 0.62, 0.45, 1.00])
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
    skull: bool = False
    lacune_every: int = 5


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
    out_dist: np.ndarray   # mm outside the brain mask (0 inside)


@lru_cache(maxsize=1)
def template() -> Template:
    """Load nilearn's MNI152 maps (shipped in its wheel, no download) and derive CSF and ventricle distance."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    gm = gm_img.get_fdata().astype(np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata().astype(np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
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
    return Template(gm_img.affine.copy(), csf, gm, wm, brain, vent_dist, out_dist)


def _sample(volume: np.ndarray, tmpl_affine: np.ndarray, coords_mm: np.ndarray, order: int = 1,
            cval: float = 0.0) -> np.ndarray:
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
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = rng.uniform(0.9, 1.1, 3)  # subject size relative to the template
    fwd = np.eye(4)
    fwd[:3, :3] = rz @ ry @ rx @ np.diag(scale)
    fwd[:3, 3] = rng.uniform(-10, 10, 3)
    control = rng.normal(0.0, 2.5, size=(3, 5, 6, 5))  # mm, smooth after cubic interpolation
    return {"template_to_subject": fwd.tolist(), "control_mm": control.tolist(),
            "control_box_mm": [[-96.0, -132.0, -78.0], [96.0, 96.0, 112.0]]}


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


def _subject_grid(transform: dict, voxel: tuple[float, float, float], orientation: str) -> tuple[tuple, np.ndarray]:
    """Shape and affine of a subject grid centred on the subject's brain, stored RAS or LAS."""
    fwd = np.asarray(transform["template_to_subject"])
    centre = fwd[:3, :3] @ np.array([0.0, -18.0, 18.0]) + fwd[:3, 3]
    vox = np.asarray(voxel)
    shape = tuple(int(s) for s in np.ceil(FOV_MM / vox).astype(int))
    aff = np.diag([*vox, 1.0])
    if orientation == "LAS":
        aff[0, 0] = -vox[0]
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


def warp_from_template(img: nib.spatialimages.SpatialImage, truth_dir: str | os.PathLike,
                       order: int = 0) -> nib.Nifti1Image:
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
def _lesion_candidates(where: str, coords: np.ndarray, vent: np.ndarray, wm: np.ndarray,
                       out: np.ndarray) -> np.ndarray:
    """Voxels where a group may seed lesions, from template coordinates and ventricle distance."""
    y, z = coords[..., 1], coords[..., 2]
    inside = (wm > 0.75)
    if where == "frontal_pv":
        return inside & (vent < 7) & (y > 5)
    if where == "posterior_pv":
        return inside & (vent < 7) & (y < -28)
    if where == "deep":
        return inside & (vent > 14) & (z > 12) & (z < 55)
    return inside & (vent > 6)


def _make_lesions(rng: np.random.Generator, prior: dict, coords: np.ndarray, vent: np.ndarray,
                  wm_true: np.ndarray, voxel: tuple[float, float, float]) -> np.ndarray:
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
    poly = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z + c[6] * x * x + c[7] * y * y + c[8] * z * z
    return np.exp(poly).astype(np.float32)


def _contrast(pv: np.ndarray, means: np.ndarray, rng: np.random.Generator, bias: np.ndarray,
              noise: float, extra: np.ndarray | None = None) -> np.ndarray:
    """Mix tissue fractions (…, 4: CSF, GM, WM, lesion) into one image with jittered intensities, bias and noise."""
    mu = means * rng.uniform(0.92, 1.08, 4)
    img = (pv * mu).sum(-1)
    if extra is not None:
        img = img + extra
    img = img * bias
    real = img + rng.normal(0, noise, img.shape)
    imag = rng.normal(0, noise, img.shape)
    return np.sqrt(real ** 2 + imag ** 2).astype(np.float32)  # Rician magnitude noise


def make_subject(index: int, spec: CohortSpec) -> dict:
    """Synthesise one subject: images, lesion mask, true tissues and transform, and its covariates."""
    rng = np.random.default_rng([spec.seed, index])
    t = template()
    group = GROUPS[index % len(GROUPS)]
    site = list(SITES)[index % len(SITES)]
    prior = GROUP_PRIORS[group]
    transform = _random_transform(rng)
    voxel = GRIDS[spec.grid]
    shape, affine = _subject_grid(transform, voxel, SITES[site])
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
    lesion = _make_lesions(rng, prior, coords, vent, tissue == 3, voxel)
    wmh = lesion.astype(np.uint8)
    lacune = np.zeros(shape, bool)
    if spec.lacune_every and index % spec.lacune_every == spec.lacune_every - 1:
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
    if spec.skull:
        skull = ((out > 3) & (out < 8)).astype(np.float32)
        scalp = ((out >= 8) & (out < 14)).astype(np.float32)
        t1_extra = 0.05 * skull + 0.9 * scalp
        flair_extra = 0.04 * skull + 0.55 * scalp
    bias = _smooth_field(rng, shape, 0.25)
    t1 = _contrast(pv, T1_MEANS, rng, bias, 0.02, t1_extra)
    flair = _contrast(pv, FLAIR_MEANS, rng, bias * _smooth_field(rng, shape, 0.1), 0.025, flair_extra)
    tissue[lesion] = 3
    return {
        "id": f"{index + 1:03d}", "site": site, "group": group, "affine": affine, "transform": transform,
        "t1": np.clip(t1 * 1000, 0, 32767).astype(np.int16), "flair": np.clip(flair * 1000, 0, 32767).astype(np.int16),
        "wmh": wmh, "tissue": tissue,
        "age": int(round(rng.normal(*prior["age"]))), "sex": str(rng.choice(["F", "M"])),
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
    info = dict(subj["transform"], shape=list(subj["t1"].shape), affine=aff.tolist(),
                note="subject world y -> template world x = inv(template_to_subject) y + d(.)")
    (tmp / "truth" / "transform.json").write_text(json.dumps(info))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def generate(root: str | os.PathLike, n_subjects: int = 24, seed: int = 0, grid: str = "2mm",
             skull: bool = False, progress: bool = True) -> pd.DataFrame:
    """Generate (or reuse, when the same spec is already there) the demo cohort; return participants.

    Files: ``<root>/<site>/<id>/pre/{T1,FLAIR}.nii.gz``, ``<root>/<site>/<id>/wmh.nii.gz``,
    ``<root>/<site>/<id>/truth/{tissue.nii.gz,transform.json}``, ``<root>/participants.tsv``, ``<root>/cohort.json``.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    spec = CohortSpec(n_subjects=n_subjects, seed=seed, grid=grid, skull=skull)
    root = Path(root)
    stamp = root / "cohort.json"
    want = dict(asdict(spec), format=FORMAT_VERSION)
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want:
        return pd.read_csv(root / "participants.tsv", sep="\t", dtype={"participant_id": str})
    stamp.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    rows, seconds = [], []
    for i in tqdm(range(n_subjects), desc="demo subjects", disable=not progress):
        start = time.perf_counter()
        subj = make_subject(i, spec)
        write_subject(subj, root)
        seconds.append(time.perf_counter() - start)
        rows.append({"participant_id": subj["id"], "site": subj["site"], "group": subj["group"],
                     "age": subj["age"], "sex": subj["sex"], "lesion_ml": round(subj["lesion_ml"], 3)})
    participants = pd.DataFrame(rows)
    write_table_atomic(participants, root / "participants.tsv", index=False)
    with atomic_path(stamp) as tmp:  # written last: its presence means the whole cohort is there
        tmp.write_text(json.dumps({"spec": want, "seconds_per_subject": float(np.mean(seconds))}, indent=1))
    return participants


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
    """Command line: ``wmloc-demo OUT [--n-subjects N] [--seed S] [--grid 2mm|1mm|aniso] [--skull]``."""
    parser = argparse.ArgumentParser(description="Generate the wmloc synthetic demo cohort (WMH challenge layout).")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-subjects", type=int, default=CohortSpec.n_subjects)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="2mm")
    parser.add_argument("--skull", action="store_true", help="add a synthetic skull and scalp (not skull-stripped)")
    args = parser.parse_args(argv)
    table = generate(args.out, args.n_subjects, args.seed, args.grid, args.skull)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
