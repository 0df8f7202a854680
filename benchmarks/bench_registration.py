"""Time and accuracy of atlas registration + label propagation at 1 mm and 2 mm subject grids.

The "subject" is the Eve WM moved by a known affine (8/10 degree rotations, a 6 mm shift,
5 % scaling) onto an RAS grid of the given voxel size, so the recovered transform can be
compared with the known one (mean distance over WM points, mm). Prints numbers only: wall
seconds, and CPU seconds of all threads (``cpu_s``; on a busy machine wall time overstates the
cost, and on two free cores the wall time lies between cpu_s / 2 and cpu_s).

    python benchmarks/bench_registration.py [--full]   (ANTs single-threaded, as in wmloc; WMLOC_ITK_THREADS overrides)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ants
import numpy as np
import pandas as pd

from wmloc_utils import registration as reg
from wmloc_utils.antsio import to_ants, to_nibabel

CONFIGS = [  # method, affine metric, registration spacing (mm; None = subject grid)
    ("AffineFast", "mattes", None),
    ("AffineFast", "mattes", 2.0),
    ("AffineFast", "GC", 2.0),
    ("Affine", "mattes", 3.0),
    ("Affine", "GC", 3.0),
]
FULL = [("Affine", "mattes", None), ("Affine", "GC", 2.0)]


def known_subject(atlas_wm, voxel: float):
    """The atlas WM moved by a known affine onto an RAS grid of ``voxel`` mm; returns (image, transform)."""
    moving = to_ants(atlas_wm)
    a, b = np.deg2rad(8), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=rz @ rx * 1.05,
        translation=(6.0, -5.0, 4.0),
        center=ants.get_center_of_mass(moving),
    )
    shape = tuple(int(round(200 / voxel)) for _ in range(3))
    com = np.asarray(ants.get_center_of_mass(moving))
    grid = ants.make_image(
        shape, spacing=(voxel,) * 3, origin=tuple(com + [100, 100, -100]), direction=np.diag([-1.0, -1.0, 1.0])
    )  # LPS direction of an RAS-stored image
    return to_nibabel(tx.apply_to_image(moving, reference=grid, interpolation="linear")), tx


def recovery_error(transforms: list[str], known, subject_wm, n: int = 3000) -> float:
    """Mean distance (mm) between recovered and known maps over ``n`` WM points of the subject."""
    rec = ants.read_transform(transforms[0])
    grid = to_ants(subject_wm)
    pts = np.argwhere(subject_wm.get_fdata() > 0.5)
    pts = pts[np.random.default_rng(0).choice(len(pts), min(n, len(pts)), replace=False)]
    errs = []
    for p in pts:
        x = ants.transform_index_to_physical_point(grid, tuple(int(i) for i in p))
        errs.append(np.linalg.norm(np.subtract(rec.apply_to_point(x), known.apply_to_point(x))))
    return float(np.mean(errs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also time full-resolution Affine (slow at 1 mm)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    atlas = reg.atlas_inputs()
    rows = []
    with tempfile.TemporaryDirectory(prefix="wmloc-bench-") as tmp:
        for voxel in (2.0, 1.0):
            subject_wm, known = known_subject(atlas["wm"], voxel)
            wm = subject_wm.get_fdata() > 0.5
            for method, metric, spacing in CONFIGS + (FULL if args.full else []):
                for _ in range(args.repeats):
                    start, cpu = time.perf_counter(), time.process_time()
                    result = reg.register_atlas(
                        atlas["wm"],
                        subject_wm,
                        outprefix=Path(tmp) / f"b{voxel}_",
                        method=method,
                        metric=metric,
                        reg_spacing=spacing,
                    )
                    t_reg = time.perf_counter() - start
                    reg.propagate_labels(atlas["labels"], result["transforms"], subject_wm, wm)
                    total = time.perf_counter() - start
                    cpu = time.process_time() - cpu
                    rows.append(
                        {
                            "subject_mm": voxel,
                            "method": method,
                            "metric": metric,
                            "reg_spacing_mm": spacing or voxel,
                            "register_s": round(t_reg, 2),
                            "propagate_s": round(total - t_reg, 2),
                            "total_s": round(total, 2),
                            "cpu_s": round(cpu, 2),
                            "error_mm": round(recovery_error(result["transforms"], known, subject_wm), 3),
                        }
                    )
                    print(rows[-1], flush=True)
    table = pd.DataFrame(rows).groupby(["subject_mm", "method", "metric", "reg_spacing_mm"]).median()
    print(
        f"\nITK threads: {os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS']}, CPU cores: {os.cpu_count()}, "
        f"load average: {os.getloadavg()[0]:.1f}"
    )
    print(table.to_string())


if __name__ == "__main__":
    main()
