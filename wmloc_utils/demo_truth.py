"""The demo cohort's true regions, and the region step scored against them (demo cohorts only).

The demo generator (:mod:`wmloc_utils.demo`) knows each subject's true transform from its template
brain and its true tissues. Carried through them, the refined atlas labels give each subject's true
regions, against which the atlas registration (affine, and SyN on a few subjects) and the region
network are scored with :func:`wmloc_utils.metrics.score_regions`.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import artefacts, cluster, provenance, registration
from .antsio import coarsen, remove_files, seed_ants, to_ants
from .atlas import load_eve, refined_atlas
from .demo import template, warp_from_template
from .errors import InputError
from .images import atomic_path, like, load_nifti, save_nifti, write_table_atomic
from .metrics import score_regions


def truth_regions_in_template(cache_dir: str | os.PathLike, data_dir=None, spacing: float = 2.0) -> nib.Nifti1Image:
    """The refined Eve labels in nilearn's MNI152 1 mm space (SyN from Eve T1 to the MNI152 T1), cached.

    The result ``template_regions.nii.gz`` in ``cache_dir`` is reused when present.
    """
    from nilearn import datasets

    cache = Path(cache_dir)
    path = cache / "template_regions.nii.gz"
    if path.exists():
        return load_nifti(path, what="cached template regions")
    cache.mkdir(parents=True, exist_ok=True)
    mni = datasets.load_mni152_template(resolution=1)
    eve_t1 = load_eve(data_dir)["t1"]
    fixed_full = to_ants(mni)
    fixed = coarsen(fixed_full, spacing)
    moving = coarsen(to_ants(eve_t1), spacing)
    seed_ants(0)
    reg = ants.registration(
        fixed, moving, type_of_transform="SyN", outprefix=str(cache / "eve_to_mni152_"), reg_iterations=(60, 30, 10)
    )
    warped = ants.apply_transforms(
        fixed_full, to_ants(refined_atlas(data_dir)), reg["fwdtransforms"], interpolator="genericLabel"
    )
    out = like(mni, np.rint(warped.numpy()).astype(np.uint8))
    remove_files(set(reg["fwdtransforms"]) | set(reg["invtransforms"]))
    save_nifti(out, path)
    return out


def demo_template_regions(brain: str, cache_dir: str | os.PathLike, data_dir=None) -> nib.Nifti1Image:
    """The true refined regions in a demo brain's template world (``demo.generate(brain=...)``).

    For ``"eve"`` they are Eve's own refined labels (on the demo's shifted Eve world); for
    ``"mni152"`` the labels placed in MNI152 by :func:`truth_regions_in_template` (SyN, cached).
    """
    if brain == "eve":
        return nib.Nifti1Image(np.asanyarray(refined_atlas(data_dir).dataobj), template("eve").affine)
    return truth_regions_in_template(cache_dir, data_dir)


def truth_regions(template_regions: nib.spatialimages.SpatialImage, truth_dir: str | os.PathLike) -> nib.Nifti1Image:
    """True region labels of a demo subject: template labels through the true transform, inside true WM."""
    warped = warp_from_template(template_regions, truth_dir, order=0)
    true_wm = np.asanyarray(load_nifti(Path(truth_dir) / "tissue.nii.gz", what="true tissue").dataobj) == 3
    labels = registration.fill_wm_labels(np.asanyarray(warped.dataobj), true_wm, warped.header.get_zooms()[:3])
    return like(warped, labels.astype(np.uint8))


def syn_regions(subject_dir: Path, flair, syn_dir: Path, atlas: dict, upstream: dict) -> Path:
    """SyN regions of one processed subject (:func:`wmloc_utils.registration.relabel`), reused while its
    fingerprint (its WM maps and FLAIR, the atlas files, the version) is unchanged, else recomputed, saying why."""
    fp = provenance.fingerprint(
        {"WM probability": subject_dir / "prob_wm.nii.gz", "WM mask": subject_dir / "wm_mask.nii.gz", "FLAIR": flair},
        {"method": "SyN", "reg_spacing": 2.0},
        upstream,
    )
    why, old = registration.stale(syn_dir, fp)
    if why:
        if old is not None:
            print(f"subject {subject_dir.name} (SyN): {'; '.join(why)}, recomputing")
        qc = registration.relabel(subject_dir, flair, atlas, "SyN", syn_dir, reg_spacing=2.0)
        written = [qc["regions"], *qc["transform"].split(";")]
        qc.update(fingerprint=fp, outputs={Path(p).name: provenance.file_fingerprint(p) for p in written if p})
        with atomic_path(syn_dir / registration.DONE) as tmp:
            tmp.write_text(json.dumps(qc, indent=1))
    return syn_dir / "regions.nii.gz"


def _syn_worker(args: tuple) -> Path:
    """Process-pool entry of :func:`score_cohort`: SyN regions of one subject, or (``None``) the template truth."""
    subject_dir, flair, syn_dir, workdir, upstream = args
    if subject_dir is None:
        truth_regions_in_template(syn_dir)
        return syn_dir
    return syn_regions(subject_dir, flair, syn_dir, registration.atlas_inputs(workdir), upstream)


def score_cohort(
    subjects_csv: str | os.PathLike,
    workdir: str | os.PathLike,
    syn_subjects: int = 2,
    progress: bool = True,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Per-region Dice of a demo cohort's regions against the true ones: affine and (first ``syn_subjects``) SyN.

    Needs :func:`wmloc_utils.registration.run_cohort` first. SyN re-labels each subject's WM into
    :data:`artefacts.SYN_REGIONS` (reused while its fingerprint is unchanged); these and the truth's placement
    in the template (once, cached) run side by side in ``n_jobs`` processes (None: one per CPU core). Writes and returns
    :data:`artefacts.REGION_DICE` (subject, method, region, dice).
    """
    table = pd.read_csv(subjects_csv, dtype={"subject": str}, keep_default_na=False)
    qc = pd.read_csv(artefacts.require(workdir, artefacts.REGIONS), dtype={"subject": str}).set_index("subject")
    table = table[table["subject"].isin(qc.index) & (table.get("truth_dir", "") != "")]
    if table.empty:
        raise InputError(f"{subjects_csv}: no subject with a truth_dir (demo truth) among those processed")
    upstream = provenance.upstream_fingerprints(registration.atlas_sources(workdir))
    template_dir = artefacts.path(workdir, artefacts.TEMPLATE_TRUTH)
    jobs = [(None, None, template_dir, None, None)]
    jobs += [
        (
            artefacts.path(workdir, artefacts.SUBJECT_REGIONS, subject=row["subject"]),
            row["flair"],
            artefacts.path(workdir, artefacts.SYN_REGIONS, subject=row["subject"]),
            str(workdir),
            upstream,
        )
        for row in table.head(max(0, syn_subjects)).to_dict("records")
    ]
    n_jobs = cluster.worker_count(n_jobs, len(jobs))
    if n_jobs > 1:
        with ProcessPoolExecutor(max_workers=n_jobs) as pool:
            syn = list(pool.map(_syn_worker, jobs))[1:]
    else:
        syn = [_syn_worker(job) for job in jobs][1:]
    in_template = truth_regions_in_template(template_dir)
    rows = []
    for i, row in enumerate(tqdm(table.to_dict("records"), desc="scoring regions", disable=not progress)):
        truth = truth_regions(in_template, row["truth_dir"])
        results = {qc.loc[row["subject"], "method"]: qc.loc[row["subject"], "regions"]}
        if i < len(syn):
            results["SyN"] = syn[i]
        for method, path in results.items():
            scores = score_regions(load_nifti(path, row["subject"], "regions"), truth)
            rows += [
                {"subject": row["subject"], "method": method, "region": str(k), "dice": v} for k, v in scores.items()
            ]
    out = pd.DataFrame(rows)
    write_table_atomic(out, artefacts.path(workdir, artefacts.REGION_DICE), index=False)
    return out
