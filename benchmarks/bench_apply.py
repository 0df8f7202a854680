"""Lesion locations on data the networks never saw: the apply path on a new demo setting, and the book's own numbers.

Run after ``make book`` (it reuses the checkpoints of notebooks 04 and 05 in its work directory)::

    python benchmarks/bench_apply.py --workdir work [--n-subjects 12] [--demo '{"grid": "aniso", "skull": true}']

Prints
1. from the book's run (notebook 07): the fully automatic regional loads against the reference loads on the
   demo test subjects (median Pearson r and relative error), per region source, and the median fraction
   of lesion volume left in no region;
2. on a new demo cohort made with ``--demo`` generator options (settings the networks never trained on),
   masks withheld: the seconds of the whole apply path (brain mask, tissues, registration, both networks,
   loads) for the first subject of each site alone (each site has its own grid) and per subject of the
   cohort, lesion Dice / F1 / false mL in subjects without lesions, region Dice of the atlas registration
   and of the region network against the true regions, and the load agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

from wmloc_utils import apply, artefacts, demo, demo_truth, inference, localization, subjects

#: A demo setting the book's networks never trained on: another brain, the challenge's scanner grids (LPS,
#: oblique, 3 mm slices), skull on some sites, shifted contrasts, and lesion-free subjects.
UNSEEN = {"brain": "eve", "grid": "challenge", "skull": "mixed", "contrast": 0.3, "lesion_free_every": 3}
SEED = 1000  # the cohort the numbers in the book were measured on; another seed draws other subjects


def book_numbers(workdir: Path) -> None:
    """Agreement of the automatic loads with the reference loads on the book's test subjects."""
    loads = pd.read_csv(artefacts.require(workdir, artefacts.REGIONAL_LOADS), dtype={"subject": str})
    preds = pd.read_csv(artefacts.require(workdir, artefacts.PREDICTIONS), dtype={"subject": str})
    test = set(preds.loc[preds["split"] == "test", "subject"])
    tidy = loads[loads["pairing"].isin(["reference", "lesion_pred", "predicted"]) & loads["subject"].isin(test)]
    print(f"book run, {len(test)} demo test subjects: automatic regional loads vs reference loads")
    for pairing, source in (("lesion_pred", "atlas"), ("predicted", "network")):
        agree = localization.load_agreement(tidy, pairing, "reference")
        print(
            f"  regions from {source:7s}: median Pearson r {agree['pearson_r'].median():.3f}, "
            f"median relative error {agree['rel_error'].median():.3f}"
        )
    qc = localization.lesion_qc(tidy).groupby("pairing")["unassigned_fraction"].median()
    print("  median lesion volume fraction in no region:", qc.round(4).to_dict())


def one_subject_steps(workdir: Path) -> dict[str, float]:
    """Seconds of each regions step of a one-subject apply run (its qc.json), as last computed."""
    qc = json.loads(next(artefacts.folder(workdir, artefacts.REGIONS).glob("*/qc.json")).read_text())
    names = ("brain_mask", "bias_correction", "tissues", "registration", "propagation", "grey_fit")
    return {name: qc[f"{name}_seconds"] for name in names if f"{name}_seconds" in qc}


def one_subject_per_site(
    data: Path, out: Path, lesion_ckpt: Path, region_ckpt: Path, tta: bool, drop_grey_matter: bool = True
) -> pd.DataFrame:
    """A new user's first subject, on each site's grid: the whole apply path on the site's first subject alone
    (a one-row manifest), with the seconds of its regions steps and whether they were computed or reused."""
    firsts: dict[str, subjects.Subject] = {}
    for subject in subjects.discover(data):
        firsts.setdefault(subject.site, subject)
    rows = []
    for site, first in firsts.items():
        folder = out / f"one_subject_{site}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "subject.csv"
        manifest.write_text(f"subject,t1,flair\n{first.id},{first.t1.resolve()},{first.flair.resolve()}\n")
        since, start = time.time(), time.perf_counter()
        apply.run(
            manifest,
            folder / "work",
            lesion_ckpt,
            region_ckpt,
            tta=tta,
            progress=False,
            drop_grey_matter=drop_grey_matter,
        )
        seconds = time.perf_counter() - start
        table = pd.read_csv(artefacts.path(folder / "work", artefacts.SUBJECTS), dtype=str)  # notebook 01's grid
        rows.append(
            {
                "site": site,
                "subject": first.id,
                "grid": table["shape"].iloc[0],
                "seconds": seconds,
                "computed": computed_since(folder / "work", since),
                **one_subject_steps(folder / "work"),
            }
        )
    return pd.DataFrame(rows).sort_values("site", ignore_index=True)


def computed_since(workdir: Path, since: float) -> bool:
    """Whether every subject's regions step of ``workdir`` was computed after ``since`` (time.time()), none reused."""
    done = list(artefacts.folder(workdir, artefacts.REGIONS).glob("*/qc.json"))
    return bool(done) and all(p.stat().st_mtime >= since for p in done)


def unseen_numbers(
    workdir: Path, n_subjects: int, options: dict, seed: int, tta: bool, drop_grey_matter: bool = True
) -> None:
    """The apply path on a new demo cohort with its masks withheld."""
    name = "_".join(f"{k}-{v}" for k, v in sorted(options.items())) + ("" if seed == SEED else f"_seed-{seed}")
    out = workdir / "bench_apply" / name
    data = out / "data"
    demo.generate(data, n_subjects=n_subjects, seed=seed, progress=False, **options)
    withheld = demo.withhold_masks(data, out / "withheld")
    lesion_ckpt, region_ckpt = inference.checkpoints(workdir)
    # a rerun reuses every finished step (its seconds are not a cold run's) unless the code changed what they hold
    ones = one_subject_per_site(data, out, lesion_ckpt, region_ckpt, tta, drop_grey_matter)
    since = time.time()
    start = time.perf_counter()
    apply.run(data, out / "work", lesion_ckpt, region_ckpt, tta=tta, progress=False, drop_grey_matter=drop_grey_matter)
    seconds = (time.perf_counter() - start) / n_subjects
    cold = computed_since(out / "work", since)
    truth = demo_truth.demo_template_regions(
        options.get("brain", "mni152"), artefacts.path(workdir, artefacts.TEMPLATE_TRUTH)
    )
    scores = apply.evaluate(out / "work", withheld, lesion_ckpt, truth_regions=truth, progress=False)
    les = scores["lesions"]
    free = les[les["reference_ml"] == 0]
    with_lesions = les[les["reference_ml"] > 0]
    print(
        f"new demo cohort {options}, {n_subjects} subjects, masks withheld (tta={tta}, drop_grey_matter={drop_grey_matter}):"
    )
    print("  apply path, one subject alone (a new user's first), the first subject of each site (seconds):")
    print(ones.round(1).to_string(index=False).replace("\n", "\n    ").join(["    ", ""]))
    print(
        f"  apply path: {seconds:.1f} s per subject for the cohort "
        f"(subjects registered {os.cpu_count()} at a time; "
        + (
            "every subject's regions computed)"
            if cold
            else f"a rerun reusing finished steps: delete {out} for a cold one)"
        )
    )
    print(
        f"  lesions: Dice {with_lesions['dice'].mean():.3f}, F1 {with_lesions['f1'].mean():.3f}, "
        f"HD95 {with_lesions['hd95'].mean():.1f} mm, AVD {with_lesions['avd'].mean():.1f} %"
    )
    if len(free):
        print(
            f"  false lesion mL in {len(free)} lesion-free subjects: max {free['predicted_ml'].max():.2f}, "
            f"mean {free['predicted_ml'].mean():.2f}"
        )
    regions = scores["regions"].groupby("source")["mean_dice"].agg(["mean", "min"])
    for source, row in regions.iterrows():
        print(f"  region Dice vs truth, {source:7s}: mean {row['mean']:.3f} (min {row['min']:.3f})")
    agree = scores["agreement"].groupby("pairing")[["pearson_r", "rel_error"]].median()
    for pairing, row in agree.iterrows():
        print(f"  loads {pairing:11s} vs reference: median r {row['pearson_r']:.3f}, rel. error {row['rel_error']:.3f}")
    print(
        "  median fraction of lesion volume in no region:",
        scores["qc"].groupby("pairing")["unassigned_fraction"].median().round(4).to_dict(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="work")
    parser.add_argument("--n-subjects", type=int, default=12)  # 6 gave numbers 0.04-0.07 off the 12-subject ones
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--demo", default=json.dumps(UNSEEN), help="demo.generate options (JSON)")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--keep-grey-matter-lesions", action="store_true", help="wmloc-apply's option")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if not artefacts.path(workdir, artefacts.LESION_MODEL).exists():
        raise SystemExit(f"{workdir}: run `make book` first (this benchmark reuses its checkpoints)")
    book_numbers(workdir)
    unseen_numbers(
        workdir, args.n_subjects, json.loads(args.demo), args.seed, not args.no_tta, not args.keep_grey_matter_lesions
    )


if __name__ == "__main__":
    main()
