"""Cost of the fingerprints that decide whether a finished subject is reused (``wmloc_utils.provenance``).

    python benchmarks/bench_fingerprint.py [--root DIR] [--grid 2mm|1mm|aniso] [--n-subjects 4] [--repeats 5]

Generates (or reuses) a demo cohort in ``DIR`` and prints, per subject (T1 + FLAIR + lesion mask), the time of
the default fingerprint (stat + NIfTI header SHA-256) and of ``full_hash=True`` (SHA-256 of every byte), with
the bytes read. The full hash grows with the file size and the disk's read speed (files here come from the
page cache, so it is a lower bound); the default stays at a header read whatever the size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from wmloc_utils import demo, provenance, subjects


def per_subject_seconds(rows: list[dict], full_hash: bool, repeats: int) -> float:
    """Best-of-``repeats`` time to fingerprint every subject's files, divided by the number of subjects."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for row in rows:
            provenance.fingerprint({k: row[k] for k in ("t1", "flair", "lesion") if row[k]}, {}, full_hash=full_hash)
        best = min(best, time.perf_counter() - start)
    return best / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--grid", default="1mm", choices=sorted(demo.GRIDS))
    parser.add_argument("--n-subjects", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="wmloc-bench-fp-"))
    demo.generate(root, n_subjects=args.n_subjects, grid=args.grid)
    rows = [{"t1": str(s.t1), "flair": str(s.flair), "lesion": str(s.lesion or "")} for s in subjects.discover(root)]
    mb = sum(Path(r[k]).stat().st_size for r in rows for k in ("t1", "flair", "lesion") if r[k]) / len(rows) / 1e6
    table = pd.DataFrame(
        [
            {
                "fingerprint": name,
                "ms_per_subject": 1000 * per_subject_seconds(rows, full, args.repeats),
                "MB_hashed_per_subject": mb if full else 0.0,
            }
            for name, full in (("stat + header hash (default)", False), ("full SHA-256", True))
        ]
    )
    print(f"demo cohort {args.grid}, {len(rows)} subjects, {mb:.1f} MB of images per subject ({root})")
    print(table.round(2).to_string(index=False))


if __name__ == "__main__":
    main()
