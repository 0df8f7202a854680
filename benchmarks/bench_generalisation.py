"""Do the lesion networks hold on another scanner and brain? The book's old set-up vs the robust one.

Run: ``nice -n 10 python benchmarks/bench_generalisation.py [--work DIR]`` (resumable: cohorts, masks,
checkpoints and predictions already in DIR are reused; ~2 min per training on 2 idle CPU cores).

Both networks are trained with notebook 04's CPU defaults (U-Net, T1+FLAIR, 2 mm, patch 48, 12x40
steps) on the book's 2 mm MNI152 demo cohort (its notebook-04 split):
- "old": ``augment="basic"``, no brain mask (the book's network before this change);
- "new": ``augment="scanner"``, ``brain_masked=True`` (masks from :func:`wmloc_utils.tissue.brain_mask`).
They are scored (Dice, lesion F1 with :func:`wmloc_utils.metrics.wmh_metrics_img`, false-positive mL in
lesion-free subjects) on the demo test split and on a setting never seen in training: another brain
(JHU Eve), challenge-like grids (Utrecht, Singapore, GE3T voxels; LPS; oblique), skull on two of three
sites, shifted contrasts, every fourth subject lesion-free. Targets on the unseen setting: Dice >= 0.70,
F1 >= 0.5, <= 1 mL of false lesions in lesion-free subjects.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from wmloc_utils import book, demo, inference, metrics, subjects, tissue, training
from wmloc_utils.images import save_nifti, write_table_atomic

# notebook 04's training settings, read from its parameters cell
TRAINING = ("architecture", "inputs", "spacing", "patch_size", "batch_size", "epochs", "iters_per_epoch", "lr", "seed")
NOTEBOOK_04 = {"task": "lesion", **{k: v for k, v in book.defaults("04").items() if k in TRAINING}}
MODELS = {"old": dict(augment="basic", brain_masked=False), "new": dict(augment="scanner", brain_masked=True)}
UNSEEN = dict(n_subjects=8, seed=100, grid="challenge", brain="eve", skull="mixed", contrast=0.3, lesion_free_every=4)
MIN_LESION_ML = (0.0, 0.02, 0.05, 0.1)  # post-hoc minimum lesion sizes scored on the saved probabilities


def cohort_table(root: Path, work: Path, **spec) -> pd.DataFrame:
    """Generate (or reuse) a demo cohort and give each subject a brain mask computed as notebook 03 does."""
    demo.generate(root, progress=False, **spec)
    rows = []
    for s in subjects.discover(root):
        mask = work / "masks" / root.name / f"{s.id}.nii.gz"
        if not mask.exists():
            save_nifti(tissue.brain_mask(s.t1_img, s.flair_img, subject=s.id), mask)
        rows.append(
            {
                "subject": s.id,
                "site": s.site,
                "t1": str(s.t1),
                "flair": str(s.flair),
                "lesion": str(s.lesion),
                "brain": str(mask),
            }
        )
    participants = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"participant_id": str})
    return pd.DataFrame(rows).merge(
        participants.rename(columns={"participant_id": "subject"}).drop(columns="site"), on="subject"
    )


def trained(name: str, table: pd.DataFrame, split: pd.DataFrame, work: Path) -> Path:
    """Train (or reuse) one network of :data:`MODELS` and return its best checkpoint."""
    cfg = training.TrainConfig(**NOTEBOOK_04, **MODELS[name])
    out = work / f"model_{name}"
    if (
        (out / "best.pt").exists()
        and (out / "history.csv").exists()
        and len(pd.read_csv(out / "history.csv")) == cfg.epochs
    ):
        return out / "best.pt"
    brain_col = "brain" if cfg.brain_masked else None
    recs = {
        k: training.make_records(table, cfg.inputs, "lesion", split.loc[split.split == k, "subject"], brain_col)
        for k in ("train", "val")
    }
    start = time.perf_counter()
    training.train(cfg, recs["train"], recs["val"], out, resume=True, progress=False)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out / "best.pt"


def score(name: str, checkpoint: Path, table: pd.DataFrame, setting: str, work: Path, masked: bool) -> pd.DataFrame:
    """Predict (or reuse predictions) and score every subject of ``table`` at each :data:`MIN_LESION_ML`."""
    seg = inference.load_segmenter(checkpoint, "cpu")
    tag = f"{name}{'+mask' if masked else ''}"
    rows = []
    for r in table.itertuples(index=False):
        prob_path = work / "pred" / setting / tag / f"{r.subject}_prob.nii.gz"
        if not prob_path.exists():
            out = inference.segment(seg, r.t1, r.flair, brain_mask=r.brain if masked else None)
            save_nifti(out["prob"], prob_path)
        prob_img = nib.load(prob_path)
        voxel_ml = abs(np.linalg.det(prob_img.affine[:3, :3])) / 1000
        for min_ml in MIN_LESION_ML:
            pred = inference.remove_small_lesions(prob_img.get_fdata() >= 0.5, int(np.ceil(min_ml / voxel_ml - 1e-9)))
            m = metrics.wmh_metrics_img(
                r.lesion, nib.Nifti1Image(pred.astype(np.uint8), prob_img.affine), subject=r.subject
            )
            rows.append(
                {
                    "model": tag,
                    "setting": setting,
                    "min_lesion_ml": min_ml,
                    "subject": r.subject,
                    "site": r.site,
                    "lesion_ml": r.lesion_ml,
                    "pred_ml": pred.sum() * voxel_ml,
                    **m,
                }
            )
    return pd.DataFrame(rows)


def summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice and F1 over subjects with lesions; mean predicted mL in lesion-free subjects."""
    has = scores[scores.lesion_ml > 0].groupby(["setting", "model", "min_lesion_ml"])[["dice", "f1", "hd95"]].mean()
    free = scores[scores.lesion_ml == 0].groupby(["setting", "model", "min_lesion_ml"])["pred_ml"].mean()
    return has.join(free.rename("false_ml_lesion_free")).round(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.environ.get("WMLOC_BENCH_DIR", "wmloc-bench") + "/generalisation")
    args = parser.parse_args()
    work = Path(args.work)
    train_table = cohort_table(work / "demo_2mm", work, n_subjects=24, seed=0, grid="2mm")
    split = training.make_split(train_table, val_fraction=0.15, test_fraction=0.25, seed=0)
    unseen = cohort_table(work / "unseen", work, **UNSEEN)
    test = train_table[train_table.subject.isin(split.loc[split.split == "test", "subject"])]
    checkpoints = {name: trained(name, train_table, split, work) for name in MODELS}
    scores = pd.concat(
        [
            score("old", checkpoints["old"], test, "demo test split", work, masked=False),
            score("new", checkpoints["new"], test, "demo test split", work, masked=True),
            score("old", checkpoints["old"], unseen, "unseen", work, masked=False),
            score("old", checkpoints["old"], unseen, "unseen", work, masked=True),
            score("new", checkpoints["new"], unseen, "unseen", work, masked=True),
        ]
    )
    write_table_atomic(scores, work / "scores.csv", index=False)
    pd.set_option("display.width", 160)
    print(summary(scores).to_string())
    by_site = scores[(scores.setting == "unseen") & (scores.min_lesion_ml == 0) & (scores.lesion_ml > 0)]
    print(by_site.pivot_table(index="site", columns="model", values="dice").round(3).to_string())


if __name__ == "__main__":
    main()
