"""Apply trained networks to a new cohort: region labels, lesions and regional loads, no manual masks needed.

The same steps as notebooks 01 -> 02 -> 03 -> 06 -> 07, written in the same work-directory layout,
so that notebook 08 (clustering), or any notebook, can read the result. Each step skips what is
already done (unchanged subjects are not recomputed), so an interrupted run is simply run again.

Command line::

    wmloc-apply DATA WORKDIR --lesion-checkpoint best.pt [--region-checkpoint best.pt]
                [--region-source atlas|network] [--n-subjects N] [--tta] [--device auto]
                [--scheduler processes|local|slurm] [--n-workers N] [--cluster-config slurm.yaml]

``DATA`` is a challenge-layout folder, a BIDS data set or a CSV manifest (see :mod:`wmloc_utils.subjects`).
The cohort table ``WORKDIR/cohort_loads.csv`` has one row per subject: its total lesion volume, the
volume left in no region (QC) and the lesion volume in each region, with its ``status`` ("ok", or
"failed" and the ``error``: a subject whose images could not be processed does not stop the others).

The per-subject steps run on ``--scheduler``: this machine's processes (default; the networks then run in
this process, their threads on every core), a local Dask cluster or SLURM jobs through ``dask-jobqueue``
(registration and segmentation, one task per subject; :mod:`wmloc_utils.cluster`, whose docstring has an
example ``--cluster-config``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import pandas as pd

from . import artefacts, atlas, cluster, demo_truth, inference, localization, metrics, registration, runtime, subjects
from .errors import InputError
from .images import write_table_atomic

if TYPE_CHECKING:
    from dask.distributed import Client

REGION_SOURCES = {"atlas": "regions", "network": "regions_pred"}  # region source -> region column of the records


def prepare_subjects(
    data: str | os.PathLike, workdir: str | os.PathLike, n_subjects: int | None = None, progress: bool = True
) -> Path:
    """Notebook 01's step: find and validate the subjects, write :data:`artefacts.SUBJECTS`; its path."""
    found = subjects.discover(data)[:n_subjects]
    table = subjects.validate(found, progress=progress)
    participants = subjects.read_participants(data, table["subject"].tolist())
    return subjects.write_manifest(table, participants, artefacts.folder(workdir, artefacts.SUBJECTS))["subjects"]


def prepare_atlas(workdir: str | os.PathLike) -> Path:
    """Notebook 02's output that later steps read: the refined atlas and its table (written once)."""
    lut = artefacts.path(workdir, artefacts.REFINED_LUT)
    if not artefacts.path(workdir, artefacts.REFINED_ATLAS).exists() or not lut.exists():
        atlas.write_refined_atlas(artefacts.folder(workdir, artefacts.REFINED_LUT))
    return lut


def records(workdir: str | os.PathLike) -> pd.DataFrame:
    """One row per subject with what notebooks 01, 03 and 06 wrote: images, masks, regions and predictions."""
    table = pd.read_csv(artefacts.require(workdir, artefacts.SUBJECTS), dtype={"subject": str}, keep_default_na=False)
    regions = pd.read_csv(artefacts.require(workdir, artefacts.REGIONS), dtype={"subject": str})
    preds = pd.read_csv(
        artefacts.require(workdir, artefacts.PREDICTIONS), dtype={"subject": str}, keep_default_na=False
    )
    keep = [c for c in ("subject", "site", "group", "t1", "flair", "lesion", "truth_dir") if c in table]
    out = (
        table[keep]
        .merge(regions.drop(columns=["group"], errors="ignore"), on="subject")
        .merge(preds.drop(columns=["t1", "flair", "lesion"], errors="ignore"), on="subject")
    )
    return out


def pairings(records: pd.DataFrame, region_source: str = "atlas") -> dict[str, tuple[str, str]]:
    """The lesion x region pairings these records support, the fully automatic one named ``automatic``.

    ``automatic`` pairs predicted lesions with the chosen region source (``"atlas"``: notebook 03's
    registered regions, ``"network"``: the region network). With reference masks, ``reference``
    (reference lesions x registered regions) and the other pairings are added for comparison.
    """
    if region_source not in REGION_SOURCES:
        raise InputError(f"region_source must be one of {sorted(REGION_SOURCES)}, got {region_source!r}")
    if REGION_SOURCES[region_source] not in records:
        raise InputError(
            f"region_source={region_source!r} needs the column {REGION_SOURCES[region_source]!r} "
            f"(for 'network', give notebook 06 / wmloc-apply a region checkpoint)"
        )
    out = {"automatic": ("lesion_pred", REGION_SOURCES[region_source])}
    if "lesion" in records and (records["lesion"].astype(str) != "").all():
        out["reference"] = ("lesion", "regions")
        out["lesion_pred"] = ("lesion_pred", "regions")
        if "regions_pred" in records:
            out["predicted"] = ("lesion_pred", "regions_pred")
    return out


def cohort_loads(
    records: pd.DataFrame, table: pd.DataFrame | str | os.PathLike, region_source: str = "atlas", progress: bool = True
) -> pd.DataFrame:
    """Tidy regional loads of every supported pairing; every lesion voxel in the brain gets a WM region."""
    return localization.cohort_pairings(
        records,
        table,
        pairings(records, region_source),
        progress=progress,
        fill_from=atlas.WM_REGIONS,
        brain="brain_mask",
    )


def cohort_table(
    tidy: pd.DataFrame, pairing: str = "automatic", predictions: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per subject: total lesion mL, unassigned mL and fraction (QC), the mL of the network's lesions
    the filters dropped (QC, from ``predictions``' ``dropped_ml`` when given), then mL per region."""
    rows = tidy[tidy["pairing"] == pairing]
    qc = localization.lesion_qc(rows).drop(columns="pairing").set_index("subject")
    if predictions is not None and "dropped_ml" in predictions:
        qc["dropped_ml"] = qc.index.map(predictions.set_index("subject")["dropped_ml"])
    wide = localization.wide_matrix(rows, unlabelled=False)
    return qc.join(wide).reset_index()


def run(
    data: str | os.PathLike,
    workdir: str | os.PathLike,
    lesion_checkpoint: str | os.PathLike,
    region_checkpoint: str | os.PathLike | None = None,
    region_source: str = "atlas",
    n_subjects: int | None = None,
    tta: bool = False,
    device: str = "auto",
    n_jobs: int | None = None,
    progress: bool = True,
    scheduler: str | Client = "processes",
    cluster_config: str | os.PathLike | dict | None = None,
    min_gm_contrast: float = inference.MIN_GM_CONTRAST,
    grow_to_prob: float | None = inference.GROW_TO_PROB,
    drop_grey_matter: bool = True,
) -> dict[str, Path]:
    """The whole apply path on a folder or manifest; returns the paths of the tables it wrote.

    Registration runs on ``scheduler`` with ``n_jobs`` workers (:func:`registration.run_cohort`), and so does
    segmentation on a Dask scheduler (``"local"``, ``"slurm"``, a client; with ``"processes"`` the networks run
    in this process, their threads on every core). A subject that fails in either is skipped by the later
    steps and reported in the cohort table (``status``, ``error``). Predicted lesions whose brighter quarter on
    FLAIR is below ``min_gm_contrast`` x grey matter's are dropped, and voxels darker than grey matter trimmed
    off those kept (:func:`inference.keep_hyperintense_lesions`; 0: all kept), which then grow into clearly
    hyperintense voxels of probability >= ``grow_to_prob`` (:func:`inference.grow_lesions`; None: not grown).
    ``drop_grey_matter``: lesions lying mostly in the atlas's grey matter (cortex, deep nuclei) are dropped
    (:func:`inference.outside_grey_matter`).
    """
    if region_source == "network" and region_checkpoint is None:
        raise InputError("region_source='network' needs a region checkpoint")
    workdir = runtime.resolve_workdir(workdir)
    timings = {}
    start = time.perf_counter()
    subjects_csv = prepare_subjects(data, workdir, n_subjects, progress)
    lut = prepare_atlas(workdir)
    timings["subjects"] = time.perf_counter() - start
    regions = registration.run_cohort(
        subjects_csv,
        workdir,
        n_jobs=n_jobs,
        progress=progress,
        scheduler=scheduler,
        errors="record",
        cluster_config=cluster_config,
    )
    if (regions["status"] == "failed").all():
        raise InputError(
            f"every subject failed in the registration step, nothing to segment: {regions['error'].iloc[0]}"
        )
    timings["regions"] = time.perf_counter() - start - sum(timings.values())
    preds = inference.predict_step(
        workdir,
        lesion_checkpoint,
        region_checkpoint,
        tta=tta,
        device=device,
        progress=progress,
        scheduler=None if scheduler == "processes" else scheduler,
        n_jobs=n_jobs,
        errors="record",
        cluster_config=cluster_config,
        min_gm_contrast=min_gm_contrast,
        grow_to_prob=grow_to_prob,
        drop_grey_matter=drop_grey_matter,
    )
    timings["segmentation"] = time.perf_counter() - start - sum(timings.values())
    failed = preds.loc[preds["status"] == "failed", ["subject", "status", "error"]]
    regions, err = regions.copy(), failed.set_index("subject")["error"]  # each subject's status: now segmentation's too
    hit = regions["subject"].isin(err.index)
    regions.loc[hit, "status"], regions.loc[hit, "error"] = "failed", regions.loc[hit, "subject"].map(err)
    recs = records(workdir)
    recs = recs[~recs["subject"].isin(registration.failed_subjects(failed, "segmentation"))]
    if recs.empty:
        raise InputError(f"every subject failed in the segmentation step: {failed['error'].iloc[0]}")
    tidy = cohort_loads(recs, lut, region_source, progress=progress)
    paths = localization.write_loads(tidy, artefacts.folder(workdir, artefacts.REGIONAL_LOADS))
    paths["cohort"] = write_table_atomic(
        with_status(cohort_table(tidy, predictions=preds), regions),
        workdir / artefacts.COHORT_LOADS,
        index=False,
        float_format="%.6g",
    )
    timings["loads"] = time.perf_counter() - start - sum(timings.values())
    if progress:
        print(f"{len(recs)} subjects; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        registration.failed_subjects(regions, "registration or segmentation")  # printed again, last: not to be missed
    return paths


def with_status(table: pd.DataFrame, regions: pd.DataFrame) -> pd.DataFrame:
    """The cohort table with ``status`` and ``error`` per subject, a row (no loads) for each failed subject."""
    failed = regions.loc[regions.get("status", pd.Series("ok", regions.index)) == "failed", ["subject", "error"]]
    out = pd.concat([table.assign(status="ok", error=""), failed.assign(status="failed")], ignore_index=True)
    order = {s: i for i, s in enumerate(regions["subject"])}
    out = out.sort_values("subject", key=lambda s: s.map(order), kind="stable", ignore_index=True)
    return out[["subject", "status", "error", *[c for c in table if c != "subject"]]]


def evaluate(
    workdir: str | os.PathLike,
    references: dict[str, str | os.PathLike],
    lesion_checkpoint: str | os.PathLike,
    region_source: str = "atlas",
    truth_regions=None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Score an apply run against reference masks kept apart (e.g. :func:`wmloc_utils.demo.withhold_masks`).

    Returns tables: ``lesions`` (challenge metrics per subject, with reference and predicted mL),
    ``agreement`` (per pairing and subject, regional loads vs the reference pairing: Pearson r,
    relative error), ``qc`` (:func:`localization.lesion_qc`) and, with ``truth_regions`` (the demo's
    true regions in template space, :func:`demo_truth.demo_template_regions`), ``regions``: the
    mean region Dice of the atlas registration and of the region network against the truth.
    """
    recs = records(workdir)
    recs["lesion"] = recs["subject"].map({str(k): str(v) for k, v in references.items()}).fillna("")
    if (recs["lesion"] == "").any():
        raise InputError(f"no reference mask for subjects {recs.loc[recs['lesion'] == '', 'subject'].tolist()[:5]}")
    lut = artefacts.path(workdir, artefacts.REFINED_LUT)
    tidy = cohort_loads(recs, lut, region_source, progress=progress)
    qc = localization.lesion_qc(tidy)
    volumes = qc.pivot(index="subject", columns="pairing", values="lesion_ml")
    lesions = inference.score_lesions({lesion_checkpoint: recs}, recs, recs["subject"].tolist(), progress=progress)
    lesions = lesions.merge(
        volumes[["reference", "automatic"]]
        .rename(columns={"reference": "reference_ml", "automatic": "predicted_ml"})
        .reset_index(),
        on="subject",
    )
    agreement = pd.concat(
        {p: localization.load_agreement(tidy, p, "reference") for p in tidy["pairing"].unique() if p != "reference"},
        names=["pairing", "subject"],
    ).reset_index()
    out = {"lesions": lesions, "agreement": agreement, "qc": qc}
    if truth_regions is not None:
        rows = []
        for r in recs.itertuples():
            truth = demo_truth.truth_regions(truth_regions, r.truth_dir)
            for source, col in REGION_SOURCES.items():
                if col in recs:
                    dice = metrics.score_regions(nib.load(getattr(r, col)), truth)["mean"]
                    rows.append({"subject": r.subject, "source": source, "mean_dice": dice})
        out["regions"] = pd.DataFrame(rows)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry point ``wmloc-apply`` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Apply trained wmloc networks to a cohort: regions, lesions, "
        "regional loads (no manual masks needed)."
    )
    parser.add_argument("data", help="challenge-layout folder, BIDS data set or CSV manifest subject,t1,flair[,lesion]")
    parser.add_argument("workdir", help="output work directory (same layout as the book's)")
    parser.add_argument("--lesion-checkpoint", required=True, help="lesion network best.pt (notebook 04)")
    parser.add_argument("--region-checkpoint", help="region network best.pt (notebook 05); optional")
    parser.add_argument(
        "--region-source",
        choices=sorted(REGION_SOURCES),
        default="atlas",
        help="regions of the automatic loads: registered atlas (default) or the region network",
    )
    parser.add_argument("--n-subjects", type=int, help="only the first N subjects")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (slower)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--min-gm-contrast",
        type=float,
        default=inference.MIN_GM_CONTRAST,
        help="drop predicted lesions whose 75th FLAIR percentile is below this many times the 90th percentile of "
        f"grey matter's (bright cortex; {inference.SURFACE_EXTRA} more within {inference.SURFACE_MM:g} mm of the "
        f"brain's surface) and trim voxels darker than grey matter off those kept (default "
        f"{inference.MIN_GM_CONTRAST}, 0 keeps every voxel)",
    )
    parser.add_argument(
        "--grow-to-prob",
        type=lambda v: None if v.lower() in ("off", "none") else float(v),
        default=inference.GROW_TO_PROB,
        help="grow the lesions kept into neighbouring voxels of at least this network probability and "
        f"{inference.GROW_GM_CONTRAST} x grey matter's FLAIR (default {inference.GROW_TO_PROB}; 'off': no growth)",
    )
    parser.add_argument(
        "--keep-grey-matter-lesions",
        action="store_true",
        help="keep the predicted lesions lying mostly in the atlas's grey matter (cortex, deep nuclei; fitted "
        "nonlinearly to each T1), which are dropped by default: bright grey matter on an unfamiliar scanner",
    )
    parser.add_argument(
        "--scheduler",
        choices=cluster.SCHEDULERS,
        default="processes",
        help="where the registration step runs: this machine's processes (default), a local Dask "
        "cluster, or SLURM jobs (dask-jobqueue)",
    )
    parser.add_argument(
        "--n-workers",
        "--n-jobs",
        dest="n_workers",
        type=int,
        help="workers of the registration step, one subject each (default: one per CPU core; required for slurm)",
    )
    parser.add_argument(
        "--cluster-config",
        help="YAML file of SLURMCluster options (queue, account, memory, walltime, ...; see wmloc_utils.cluster)",
    )
    args = parser.parse_args(argv)
    try:
        paths = run(
            args.data,
            args.workdir,
            args.lesion_checkpoint,
            args.region_checkpoint,
            args.region_source,
            args.n_subjects,
            args.tta,
            args.device,
            args.n_workers,
            scheduler=args.scheduler,
            cluster_config=args.cluster_config,
            min_gm_contrast=args.min_gm_contrast,
            grow_to_prob=args.grow_to_prob,
            drop_grey_matter=not args.keep_grey_matter_lesions,
        )
    except (InputError, FileNotFoundError) as err:
        raise SystemExit(f"wmloc-apply: {err}") from None
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
