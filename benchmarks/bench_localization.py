"""Time the localization of one subject at 1 mm (181x217x181): the refined Eve atlas with ~200 random lesions.

Run: ``python benchmarks/bench_localization.py`` (needs the JHU Eve files: ``WMLOC_DATA`` or the fetch cache).
Prints the best and median wall time of ``regional_loads`` (arrays) and ``regional_loads_img`` (from files).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from wmloc_utils import atlas, localization


def synthetic_lesions(regions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` blob lesions (radius 1-4 voxels) centred on random WM voxels."""
    rng = np.random.default_rng(seed)
    wm = np.argwhere((regions >= 1) & (regions <= 34))
    seeds = np.zeros(regions.shape, bool)
    seeds[tuple(wm[rng.choice(len(wm), n, replace=False)].T)] = True
    lesion = ndimage.binary_dilation(seeds, iterations=2) & (rng.random(regions.shape) < 0.9)
    return ndimage.binary_opening(lesion) | seeds


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lesions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    regions_img = atlas.refined_atlas()
    regions = np.asanyarray(regions_img.dataobj).astype(np.int16)
    table = atlas.regions_table()
    lesion = synthetic_lesions(regions, args.lesions, seed=0).astype(np.uint8)
    zooms = regions_img.header.get_zooms()[:3]
    print(
        f"grid {regions.shape} voxel {tuple(float(z) for z in zooms)} mm, lesion {lesion.sum() * np.prod(zooms) / 1000:.1f} mL"
    )

    arrays = timed(lambda: localization.regional_loads(lesion, regions, zooms, table), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        les_path, reg_path = Path(tmp) / "lesion.nii.gz", Path(tmp) / "regions.nii.gz"
        nib.save(nib.Nifti1Image(lesion, regions_img.affine), les_path)
        nib.save(nib.Nifti1Image(regions, regions_img.affine), reg_path)
        files = timed(lambda: localization.regional_loads_img(les_path, reg_path, table, subject="bench"), args.repeats)
    loads = localization.regional_loads(lesion, regions, zooms, table)
    print(f"{int(loads['n_lesions'].sum())} lesions over {int((loads['lesion_ml'] > 0).sum())} regions")
    for name, times in (("regional_loads (arrays)", arrays), ("regional_loads_img (from .nii.gz)", files)):
        print(f"{name}: best {min(times):.3f} s, median {np.median(times):.3f} s over {len(times)} runs")
    verdict = "OK" if np.median(files) < 2.0 else "TOO SLOW"
    print(f"whole localization of one subject: {np.median(files):.2f} s (target < 2 s): {verdict}")


if __name__ == "__main__":
    main()
