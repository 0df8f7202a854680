"""Atlas registration on real subjects: region Dice vs the paper authors' own subject region maps, and repeatability.

For each of the authors' published subject maps (labels 0..36 on the challenge FLAIR grid,
``authors-labels/Train/WMH_<id>.nii.gz``), the subject WM is their labels > 0; the Eve WM is
registered to it with :func:`register_atlas`, the refined labels are propagated into that WM and
scored per label 1..36 against the authors' labels (mean over the labels present). Each subject is
registered ``--repeats`` times: ``spread`` is max - min of the mean Dice over the repeats (0 = the
same labels every run), ``identical`` says whether every repeat gave the very same label map.

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 python benchmarks/bench_authors_labels.py \
        [--variant default] [--repeats 3] [--labels-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from wmloc_utils import registration as reg  # noqa: E402
from wmloc_utils.images import like, load_nifti  # noqa: E402
from wmloc_utils.metrics import region_dice  # noqa: E402

LABELS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "authors-labels" / "Train"

#: register_atlas keyword sets compared (the first is the current default).
VARIANTS = {
    "default": {},
    "legacy": dict(method="Affine", metric="GC", staged=False, sampling=0.2, n_starts=1),
    "legacy-dense": dict(method="Affine", metric="GC", staged=False, sampling=1.0, n_starts=1),
    "staged-dense": dict(method="Affine", metric="GC", staged=True, sampling=1.0, n_starts=1),
    "staged-mattes": dict(method="Affine", metric="mattes", staged=True, sampling=1.0, n_starts=1),
    "staged-meansquares": dict(method="Affine", metric="meansquares", staged=True, sampling=1.0, n_starts=1),
    "staged-dense-smooth": dict(method="Affine", metric="GC", staged=True, sampling=1.0, n_starts=1, smooth=3.0),
    "staged-dense-multistart": dict(method="Affine", metric="GC", staged=True, sampling=1.0, n_starts=5),
}


def run(variant: str, repeats: int, labels_dir: Path, subjects: list[str] | None) -> pd.DataFrame:
    """Register, propagate and score every subject ``repeats`` times with the ``variant`` keywords."""
    atlas = reg.atlas_inputs()
    kwargs = VARIANTS[variant]
    files = sorted(labels_dir.glob("WMH_*.nii.gz"), key=lambda p: int(p.name[4:-7]))
    if subjects:
        files = [f for f in files if f.name[4:-7] in subjects]
    rows = []
    with tempfile.TemporaryDirectory(prefix="wmloc-authors-") as tmp:
        for path in files:
            ref_img = load_nifti(path, what="authors' region map")
            ref = np.asanyarray(ref_img.dataobj)
            wm = ref > 0
            wm_img = like(ref_img, wm.astype(np.float32))
            maps, scores, seconds = [], [], []
            for rep in range(repeats):
                start = time.perf_counter()
                result = reg.register_atlas(atlas["wm"], wm_img, outprefix=Path(tmp) / f"{path.stem}_{rep}_", **kwargs)
                labels = np.asanyarray(reg.propagate_labels(atlas["labels"], result["transforms"], ref_img, wm).dataobj)
                seconds.append(time.perf_counter() - start)
                maps.append(labels)
                scores.append(float(region_dice(ref, labels, reg.LABEL_IDS).loc[list(reg.LABEL_IDS)].mean()))
            rows.append({"variant": variant, "subject": path.name[:-7], "dice": round(float(np.mean(scores)), 4),
                         "dice_min": round(min(scores), 4), "spread": round(max(scores) - min(scores), 4),
                         "identical": all(np.array_equal(maps[0], m) for m in maps[1:]),
                         "seconds": round(float(np.median(seconds)), 2)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subjects", nargs="*", help="subject ids (e.g. 0 21); default all")
    parser.add_argument("--labels-dir", type=Path, default=Path(os.environ.get("WMLOC_AUTHORS_LABELS", LABELS_DIR)))
    args = parser.parse_args()
    table = pd.concat([run(v, args.repeats, args.labels_dir, args.subjects) for v in args.variant])
    print(f"\nITK threads: {os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS']}, CPU cores: {os.cpu_count()}, "
          f"load average: {os.getloadavg()[0]:.1f}")
    print(table.to_string(index=False))
    summary = table.groupby("variant", sort=False).agg(mean_dice=("dice", "mean"), worst_subject=("dice", "min"),
                                                       max_spread=("spread", "max"), all_identical=("identical", "all"),
                                                       seconds=("seconds", "median"))
    print("\n" + summary.round(4).to_string())


if __name__ == "__main__":
    main()
