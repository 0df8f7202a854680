"""Time the lesion location classes of one subject at 1 mm: the JHU Eve anatomy (181x217x181) with ~200 lesions.

Run: ``python benchmarks/bench_lesion_classes.py`` (needs the JHU Eve files: ``WMLOC_DATA`` or the fetch cache).
The subject is Eve itself: its tissue classes, brain mask and refined labels kept inside WM (as notebook 03
writes them), with random blob lesions in WM. Prints the wall time of ``classify_subject`` (fallback
infratentorial mask; the atlas mask given; the atlas mask and the ventricles given) and the lesions per class.
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from wmloc_utils import atlas, lesion_classes, wmdepth


def synthetic_lesions(wm: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` blob lesions (radius about 2 voxels) centred on random WM voxels."""
    rng = np.random.default_rng(seed)
    idx = np.argwhere(wm)
    seeds = np.zeros(wm.shape, bool)
    seeds[tuple(idx[rng.choice(len(idx), n, replace=False)].T)] = True
    return ndimage.binary_dilation(seeds, iterations=2) & (wm | seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lesions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    eve = atlas.load_eve()
    aff = eve["tissue"].affine
    tissue = np.asanyarray(eve["tissue"].dataobj).astype(np.int16)
    wm = tissue == 3
    regions = np.where(wm, np.asanyarray(atlas.refined_atlas().dataobj), 0).astype(np.int16)
    lesion = synthetic_lesions(wm, args.lesions, seed=0).astype(np.uint8)
    imgs = {
        k: nib.Nifti1Image(v, aff)
        for k, v in (
            ("lesion", lesion),
            ("tissue", tissue),
            ("regions", regions),
            ("brain", np.asanyarray(eve["mask"].dataobj).astype(np.uint8)),
        )
    }
    infra = lesion_classes.atlas_infratentorial(eve["type2"])
    print(
        f"grid {tissue.shape} voxel {tuple(float(z) for z in eve['tissue'].header.get_zooms()[:3])} mm, "
        f"lesion {lesion.sum() / 1000:.1f} mL"
    )
    vent = wmdepth.depth_maps(imgs["tissue"], imgs["brain"], csf_labels=(0,))["ventricles"]
    configs = (
        ("fallback infratentorial", {}),
        ("atlas infratentorial mask", {"infratentorial": infra}),
        ("atlas mask + ventricles given (as from depth_maps)", {"infratentorial": infra, "ventricles": vent}),
    )
    for name, extra in configs:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = lesion_classes.classify_subject(
                imgs["lesion"], imgs["tissue"], imgs["regions"], imgs["brain"], subject="eve", csf_labels=(0,), **extra
            )
            times.append(time.perf_counter() - start)
        counts = out["table"]["class"].value_counts().to_dict()
        print(
            f"classify_subject, {name}: best {min(times):.2f} s, median {np.median(times):.2f} s over "
            f"{len(times)} runs; {len(out['table'])} lesions: {counts}"
        )


if __name__ == "__main__":
    main()
