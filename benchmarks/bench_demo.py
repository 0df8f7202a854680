"""Demo cohort: generation time per subject and size on disk, for each grid option."""

import tempfile
import time
from pathlib import Path

from wmloc_utils import demo

t0 = time.perf_counter()
demo.template()
print(f"template maps (once per process): {time.perf_counter() - t0:.1f} s")
for grid, n in (("2mm", 4), ("aniso", 2), ("1mm", 1)):
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        demo.generate(tmp, n_subjects=n, grid=grid, progress=False)
        per = (time.perf_counter() - start) / n
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / n / 1e6
        print(f"grid {grid:5s}: {per:5.1f} s per subject, {size:5.1f} MB per subject on disk")
