"""Speed-up of the per-subject registration step on a local Dask cluster (1 vs 2 workers), and a 1,000-subject projection.

The registration step of ``wmloc-apply`` (brain mask, tissues, atlas registration, labels, the grey matter fit:
``run_cohort``) runs on N demo subjects on the challenge grids (per-site voxels, LPS, oblique) with a local Dask
cluster of 1 worker, then of 2 workers (one thread each; the cluster is started before the clock starts). Prints the
wall seconds per subject, the speed-up ratio, the CPU share the workers got (CPU seconds of the worker
processes / wall seconds x workers: below 1 when something else runs on the cores), the speed-up per core
obtained (the ratio corrected by these shares: what dedicated cores, e.g. SLURM's, give) and the load average.

From the measured per-subject seconds of each step (brain mask and tissues, registration, label
propagation: ``qc.json``; regional loads: measured here on the demo lesion masks; segmentation: a
parameter, default the CPU inference of a 1 mm FLAIR on the book's "Benchmarks" page (``bench_segmentation.py``,
lesions 1.6 s + regions 2.0 s, no TTA); or, with ``--lesion-checkpoint`` (and ``--region-checkpoint``), measured
here: the segmentation step on the same local cluster, 1 then 2 workers, one task per subject, each worker loading
each network once) it projects a 1,000-subject cohort on 2..256 single-core workers: wall time = rounds of
``workers`` subjects x seconds per subject / efficiency, with the efficiency measured at 2 workers (per core
obtained, and as measured on this machine), and the core-hours billed (workers x wall) at ``--price`` per core-hour.

    python benchmarks/bench_cluster.py [--subjects 4] [--price 0.05] [--segmentation-seconds 3.6]
                                       [--lesion-checkpoint best.pt] [--region-checkpoint best.pt]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from wmloc_utils import apply, artefacts, atlas, cluster, demo, inference, localization
from wmloc_utils import registration as reg

WORKERS = (2, 16, 64, 256)


def _cpu(client) -> float:
    """CPU seconds used so far by all the client's worker processes."""
    return sum(client.run(time.process_time).values())


def timed_run(csv: Path, workdir: Path, n_workers: int) -> dict:
    """run_cohort on a fresh local cluster of ``n_workers``: wall seconds, worker CPU seconds, the QC table."""
    start = time.perf_counter()
    with cluster.client(n_workers, "local") as client:
        startup = time.perf_counter() - start
        cpu0, t0 = _cpu(client), time.perf_counter()
        qc = reg.run_cohort(csv, workdir, n_jobs=n_workers, scheduler=client, errors="record", progress=False)
        wall = time.perf_counter() - t0
        cpu = _cpu(client) - cpu0
        client.cluster.close()
    if (qc["status"] != "ok").any():
        raise SystemExit(f"a subject failed: {qc.loc[qc['status'] != 'ok', 'error'].tolist()}")
    return {"workers": n_workers, "startup": startup, "wall": wall, "cpu": cpu, "qc": qc}


def timed_segmentation(workdir: Path, n_workers: int, lesion: str, regions: str | None) -> dict:
    """The segmentation step (both networks, brain and WM masks of the registration step) on a fresh local cluster."""

    out = workdir.parent / f"{workdir.name}-seg{n_workers}"
    table = reg.corrected_inputs(reg.subjects_on_flair_grid(workdir))  # as notebook 06 applies the networks
    with cluster.client(n_workers, "local") as client:
        cpu0, t0 = _cpu(client), time.perf_counter()
        preds = inference.predict_cohort(
            table,
            out,
            lesion,
            regions,
            progress=False,
            scheduler=client,
            n_jobs=n_workers,
            errors="record",
            brain_col="brain_mask",
            wm_col="wm_mask",
            tissue_col="tissue",
            min_gm_contrast=inference.MIN_GM_CONTRAST,
        )
        wall, cpu = time.perf_counter() - t0, _cpu(client) - cpu0
        client.cluster.close()
    if (preds["status"] != "ok").any():
        raise SystemExit(f"a subject failed: {preds.loc[preds['status'] != 'ok', 'error'].tolist()}")
    return {"workers": n_workers, "wall": wall, "cpu": cpu, "preds": preds}


def step_seconds(workdir: Path, qc: pd.DataFrame, lut: Path, lesions: dict) -> pd.DataFrame:
    """Seconds per subject of each step: mask and tissues, registration, propagation, grey matter fit (qc.json), loads
    (timed here)."""
    rows = []
    for row in qc.itertuples():
        done = json.loads(
            (artefacts.path(workdir, artefacts.SUBJECT_REGIONS, subject=row.subject) / reg.DONE).read_text()
        )
        t0 = time.perf_counter()
        localization.regional_loads_img(
            lesions[row.subject],
            row.regions,
            lut,
            subject=row.subject,
            fill_from=atlas.WM_REGIONS,
            brain_img=row.brain_mask,
        )
        rows.append(
            {
                "subject": row.subject,
                "mask_and_tissues": done["seconds"]
                - done["registration_seconds"]
                - done["propagation_seconds"]
                - done["grey_fit_seconds"],
                "registration": done["registration_seconds"],
                "propagation": done["propagation_seconds"],
                "grey_fit": done["grey_fit_seconds"],
                "loads": time.perf_counter() - t0,
            }
        )
    return pd.DataFrame(rows).set_index("subject")


def projection(per_subject: float, efficiency: float, price: float, n: int = 1000) -> pd.DataFrame:
    """Wall hours and billed core-hours of ``n`` subjects on each of :data:`WORKERS` single-core workers."""
    rows = []
    for w in WORKERS:
        wall = math.ceil(n / w) * per_subject / efficiency  # whole rounds of subjects
        rows.append({"workers": w, "wall_h": wall / 3600, "core_h": w * wall / 3600, "cost": w * wall / 3600 * price})
    return pd.DataFrame(rows).set_index("workers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--price", type=float, default=0.05, help="price of one core-hour (default 0.05, e.g. USD)")
    parser.add_argument(
        "--segmentation-seconds",
        type=float,
        default=3.6,
        help="lesion + region inference seconds per subject (default: book/benchmarks.md, CPU, 1 mm, no TTA)",
    )
    parser.add_argument("--lesion-checkpoint", help="measure the segmentation step with this lesion network")
    parser.add_argument("--region-checkpoint", help="... and this region network")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wmloc-bench-cluster-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        demo.generate(tmp / "data", n_subjects=args.subjects, grid="challenge", progress=False)
        csv = apply.prepare_subjects(tmp / "data", tmp / "work1", progress=False)
        lut = apply.prepare_atlas(tmp / "work1")
        print(
            f"{args.subjects} demo subjects (challenge grids) made in {time.perf_counter() - t0:.0f} s; "
            f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}"
        )
        runs = [timed_run(csv, tmp / "work1", 1), timed_run(csv, tmp / "work2", 2)]
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        maps = [
            {
                s: artefacts.path(tmp / w, artefacts.SUBJECT_REGIONS, subject=s) / "regions.nii.gz"
                for s in runs[0]["qc"]["subject"]
            }
            for w in ("work1", "work2")
        ]
        same = all(maps[0][s].read_bytes() == maps[1][s].read_bytes() for s in maps[0])
        print("\nregistration step (mask, tissues, registration, labels) on a local Dask cluster:")
        for r in runs:
            print(
                f"  {r['workers']} worker(s): {r['wall']:.1f} s wall, {r['wall'] / args.subjects:.1f} s per subject, "
                f"worker CPU share {r['cpu'] / (r['wall'] * r['workers']):.2f}; cluster start {r['startup']:.1f} s"
            )
        ratio = runs[0]["wall"] / runs[1]["wall"]
        shares = [r["cpu"] / (r["wall"] * r["workers"]) for r in runs]
        per_core = ratio * shares[0] / shares[1]  # the speed-up had each worker had its core to itself
        print(f"  speed-up 1 -> 2 workers: {ratio:.2f} (ideal 2); region maps byte-identical: {same}")
        print(
            f"  worker CPU seconds per subject: {runs[0]['cpu'] / args.subjects:.1f} (1 worker), "
            f"{runs[1]['cpu'] / args.subjects:.1f} (2 workers); speed-up per core obtained "
            f"(ratio x CPU share 1 / CPU share 2, what dedicated cores such as SLURM's give): {per_core:.2f}"
        )
        lesions = pd.read_csv(csv, dtype={"subject": str}).set_index("subject")["lesion"].to_dict()
        steps = step_seconds(tmp / "work1", runs[0]["qc"], lut, lesions)
        steps["segmentation"] = args.segmentation_seconds
        if args.lesion_checkpoint:
            seg = [timed_segmentation(tmp / "work1", w, args.lesion_checkpoint, args.region_checkpoint) for w in (1, 2)]
            print(
                "\nsegmentation step (one task per subject, each worker loading each network once), local Dask cluster:"
            )
            for r in seg:
                print(
                    f"  {r['workers']} worker(s): {r['wall']:.1f} s wall, {r['wall'] / args.subjects:.1f} s per subject, "
                    f"worker CPU share {r['cpu'] / (r['wall'] * r['workers']):.2f}"
                )
            seg_shares = [r["cpu"] / (r["wall"] * r["workers"]) for r in seg]
            seg_ratio = seg[0]["wall"] / seg[1]["wall"]
            print(
                f"  speed-up 1 -> 2 workers: {seg_ratio:.2f} (ideal 2); per core obtained: "
                f"{seg_ratio * seg_shares[0] / seg_shares[1]:.2f}"
            )
            steps["segmentation"] = seg[0]["wall"] / args.subjects
        overhead = (
            runs[0]["wall"] / args.subjects
            - steps[["mask_and_tissues", "registration", "propagation", "grey_fit"]].sum(axis=1).mean()
        )
        steps["scheduling_and_io"] = max(overhead, 0.0)
        print(
            f"\nseconds per subject and step (1 worker; segmentation: {'measured' if args.lesion_checkpoint else 'parameter'}):"
        )
        print(steps.describe().loc[["mean", "min", "max"]].round(2).to_string())
        per_subject = float(steps.sum(axis=1).mean())
        for name, efficiency in (("dedicated cores", min(1.0, per_core / 2)), ("this machine", min(1.0, ratio / 2))):
            print(
                f"\n1,000 subjects at {per_subject:.1f} s each, parallel efficiency {efficiency:.2f} ({name}, "
                f"measured at 2 workers), {args.price:g} per core-hour:"
            )
            print(projection(per_subject, efficiency, args.price).round(2).to_string())


if __name__ == "__main__":
    main()
