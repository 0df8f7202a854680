"""Atlas registration on real subjects: region Dice vs the paper authors' own subject region maps, and repeatability.

For each of the authors' published subject maps (labels 0..36 on the challenge FLAIR grid, fetched and
verified by challenge id with :func:`wmloc_utils.authors_labels.fetch_map`: from ``--labels-dir``, else
``$WMLOC_AUTHORS_LABELS``, else downloaded), the subject WM is their labels > 0; the Eve WM is
registered to it with :func:`register_atlas`, the refined labels are propagated into that WM and
scored per label 1..36 against the authors' labels (mean over the labels present). Each subject is
registered ``--repeats`` times with the same seed: ``spread`` is max - min of the mean Dice over the
repeats (0 = the same labels every run), ``identical`` says whether every repeat gave the very same
label map; ``--seeds`` adds runs with other sampling seeds, ``seed_spread`` (max - min over all runs)
shows how much the optimum depends on ANTs' sampling. ANTs runs single-threaded, as everywhere in
wmloc (``WMLOC_ITK_THREADS`` overrides it); ``cpu_s`` counts all threads.

Measured with ANTs single-threaded (2 idle cores, 2 December 2026): default 0.870 / worst 0.847,
spread 0 (identical labels on every run), 4.0 CPU s per subject. Earlier, with 2 ITK threads
(2 shared cores, seed runs 0 and 1; mean Dice / worst subject / max seed spread / CPU s):
default (GC, dense, WM mask 12 mm) 0.871 / 0.852 / 0.013 / 4.7; legacy (20 % sampling, no mask)
0.732 / 0.459 / 0.314 / 5.8; dense without mask 0.868 / 0.827 / 0.354 / 15.6; mask 6 mm 0.864 / 0.821;
mask 20 mm 0.862 / 0.817; mattes with the 12 mm mask 0.870 / 0.835 but NOT repeatable (seeded runs differ).

    python benchmarks/bench_authors_labels.py [--variant default legacy ...] [--repeats 3] [--seeds 1 2] [--subjects 0 21]
                                              [--labels-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from wmloc_utils import authors_labels
from wmloc_utils import registration as reg
from wmloc_utils.atlas import LABEL_IDS
from wmloc_utils.images import like, load_nifti
from wmloc_utils.metrics import region_dice

#: challenge ids of the six maps measured above (Utrecht, Singapore and GE3T grids), staged for offline use.
SAMPLES = ("0", "21", "50", "61", "100", "137")

#: register_atlas keyword sets compared (the first is the current default).
VARIANTS = {
    "default": {},
    "legacy": dict(sampling=0.2, mask_mm=None),
    "dense": dict(sampling=1.0, mask_mm=None),
    "mask6": dict(mask_mm=6.0),
    "mask12": dict(mask_mm=12.0),
    "mask20": dict(mask_mm=20.0),
    "mask12-sampling0.2": dict(mask_mm=12.0, sampling=0.2),
    "mask12-mattes": dict(mask_mm=12.0, metric="mattes"),
    "mask12-meansquares": dict(mask_mm=12.0, metric="meansquares"),
    "mask12-AffineFast": dict(mask_mm=12.0, method="AffineFast"),
    "mask12-2mm": dict(mask_mm=12.0, reg_spacing=2.0),
}


def _register(atlas: dict, ref_img, out: Path, kwargs: dict) -> tuple[np.ndarray, float, float]:
    """One registration + propagation into the authors' WM: (labels, wall seconds, CPU seconds of all threads)."""
    wm = np.asanyarray(ref_img.dataobj) > 0
    start, cpu = time.perf_counter(), time.process_time()
    result = reg.register_atlas(atlas["wm"], like(ref_img, wm.astype(np.float32)), outprefix=out, **kwargs)
    labels = np.asanyarray(reg.propagate_labels(atlas["labels"], result["transforms"], ref_img, wm).dataobj)
    return labels, time.perf_counter() - start, time.process_time() - cpu


def run(variant: str, repeats: int, seeds: list[int], labels_dir: Path | None, subjects: list[str]) -> pd.DataFrame:
    """Score every subject ``repeats`` times with the ``variant`` keywords, then once per extra seed in ``seeds``."""
    atlas = reg.atlas_inputs()
    files = [authors_labels.fetch_map(s, path=labels_dir) for s in subjects]
    rows = []
    with tempfile.TemporaryDirectory(prefix="wmloc-authors-") as tmp:
        for path in files:
            ref_img = load_nifti(path, what="authors' region map")
            ref = np.asanyarray(ref_img.dataobj)
            runs = [dict(VARIANTS[variant])] * repeats + [dict(VARIANTS[variant], seed=s) for s in seeds]
            maps, scores, wall, cpu = [], [], [], []
            for k, kwargs in enumerate(runs):
                labels, w, c = _register(atlas, ref_img, Path(tmp) / f"{path.stem}_{k}_", kwargs)
                maps.append(labels)
                scores.append(float(region_dice(ref, labels, LABEL_IDS).loc[list(LABEL_IDS)].mean()))
                wall.append(w)
                cpu.append(c)
            same = scores[:repeats]
            rows.append(
                {
                    "variant": variant,
                    "subject": path.name[:-7],
                    "dice": round(same[0], 4),
                    "spread": round(max(same) - min(same), 4),
                    "identical": all(np.array_equal(maps[0], m) for m in maps[1:repeats]),
                    "seed_spread": round(max(scores) - min(scores), 4) if seeds else float("nan"),
                    "seconds": round(float(np.median(wall)), 2),
                    "cpu_s": round(float(np.median(cpu)), 2),
                }
            )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3, help="runs with the same seed (must agree)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="extra runs with these seeds (robustness)")
    parser.add_argument(
        "--subjects",
        nargs="+",
        default=list(SAMPLES),
        help="challenge subject ids, any of the 170 (default: the six measured above)",
    )
    parser.add_argument(
        "--labels-dir",
        type=Path,
        help="folder holding Train/ and Test/ "
        "(default: $WMLOC_AUTHORS_LABELS, else <data dir>/authors-labels; missing maps are downloaded)",
    )
    args = parser.parse_args()
    table = pd.concat([run(v, args.repeats, args.seeds, args.labels_dir, args.subjects) for v in args.variant])
    print(
        f"\nITK threads: {os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS']}, CPU cores: {os.cpu_count()}, "
        f"load average: {os.getloadavg()[0]:.1f}"
    )
    print(table.to_string(index=False))
    summary = table.groupby("variant", sort=False).agg(
        mean_dice=("dice", "mean"),
        worst_subject=("dice", "min"),
        max_spread=("spread", "max"),
        all_identical=("identical", "all"),
        max_seed_spread=("seed_spread", "max"),
        seconds=("seconds", "median"),
        cpu_s=("cpu_s", "median"),
    )
    print("\n" + summary.round(4).to_string())


if __name__ == "__main__":
    main()
