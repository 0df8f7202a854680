"""The paper's comparison table on the demo cohort: lesion networks per architecture x input, scored on held-out subjects.

Run after notebooks 01-04 (it reuses their work directory, subjects and split)::

    python benchmarks/bench_architectures.py --workdir work [--epochs 12] [--archs unet segresnet ...]

Each (architecture, inputs) pair is trained with the book's CPU defaults of notebook 04 (or the given
epochs) into ``WORKDIR/bench_architectures/<architecture>_<inputs>/best.pt`` and scored on the test
subjects with the MICCAI 2017 WMH metrics (label 2 ignored), with flip test-time augmentation as
notebook 06 does by default and without. Prints mean (sd) per row, the training time (sum of epoch
times) and the inference time per subject, and writes ``WORKDIR/bench_architectures/table.csv``.
The checkpoints can be listed in notebook 06's ``compare_checkpoints`` to show the same rows there.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wmloc_utils import artefacts, book, inference, runtime, training

# Notebook 04's training settings, read from its parameters cell (its patch edge, 48, suits all five
# architectures: unetr/mednext/multiresunet need multiples of 16).
TRAINING = ("spacing", "patch_size", "batch_size", "lr", "skeleton_weight", "iters_per_epoch")
NOTEBOOK_04 = {k: v for k, v in book.defaults("04").items() if k in TRAINING}


def run_pair(
    arch: str, inputs: str, table: pd.DataFrame, split: pd.DataFrame, out: Path, epochs: int, device: str
) -> dict:
    """Train one lesion network (resumable) and score it on the test subjects."""
    rec = {
        s: training.make_records(table, inputs, "lesion", split.loc[split["split"] == s, "subject"])
        for s in ("train", "val")
    }
    cfg = training.TrainConfig(
        task="lesion", architecture=arch, inputs=inputs, epochs=epochs, device=device, **NOTEBOOK_04
    )
    result = training.train(cfg, rec["train"], rec["val"], out, resume=True, progress=False)
    seg = inference.load_segmenter(result["best"], device)
    test = table[table["subject"].isin(split.loc[split["split"] == "test", "subject"])]
    scores, seconds = {}, {}
    for tta in (True, False):  # predicted and scored as notebook 06 does (predict_cohort, score_lesions)
        folder = out / f"test_tta_{tta}"
        shutil.rmtree(folder, ignore_errors=True)  # timed afresh: predict_cohort reuses finished subjects
        start = time.perf_counter()
        preds = inference.predict_cohort(test, folder, result["best"], tta=tta, device=device, progress=False)
        seconds[tta] = (time.perf_counter() - start) / max(len(test), 1)
        scores[tta] = inference.score_lesions({result["best"]: preds}, test, test["subject"].tolist(), progress=False)
    params = sum(p.numel() for p in seg.model.parameters())
    keys = ("dice", "hd95", "avd", "recall", "f1")
    return {
        "architecture": arch,
        "inputs": inputs,
        "params_k": round(params / 1e3),
        **{f"{k}_mean": scores[True][k].mean() for k in keys},
        **{f"{k}_sd": scores[True][k].std() for k in keys},
        **{f"{k}_no_tta": scores[False][k].mean() for k in keys},
        "best_val_dice": result["best_dice"],
        "train_s": float(result["history"]["seconds"].sum()),
        "infer_s_tta": seconds[True],
        "infer_s_no_tta": seconds[False],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="work", help="work directory of notebooks 01-04")
    parser.add_argument("--archs", nargs="+", default=["unet", "segresnet", "mednext", "unetr", "multiresunet"])
    parser.add_argument("--inputs", nargs="+", default=["t1+flair"], help="input modes for every architecture")
    parser.add_argument(
        "--unet-inputs",
        nargs="*",
        default=["flair", "t1"],
        help="extra input modes for the U-Net only (the paper's input comparison)",
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir).resolve()
    table = pd.read_csv(artefacts.require(work, artefacts.SUBJECTS), dtype={"subject": str})
    table = table[table["lesion"].notna()]
    split = training.read_split(work)
    pairs = [(a, i) for a in args.archs for i in args.inputs]
    pairs += [("unet", i) for i in args.unet_inputs if ("unet", i) not in pairs]
    table_csv = work / artefacts.ARCHITECTURES_TABLE
    root = table_csv.parent
    print(
        f"device {runtime.resolve_device(args.device)}, {args.threads} threads, {args.epochs} epochs x "
        f"{NOTEBOOK_04['iters_per_epoch']} steps, test subjects: {int((split['split'] == 'test').sum())}",
        flush=True,
    )
    rows = []
    for arch, inputs in pairs:
        r = run_pair(arch, inputs, table, split, root / f"{arch}_{inputs.replace('+', '-')}", args.epochs, args.device)
        rows.append(r)
        print(
            f"{arch:9s} {inputs:8s} Dice {r['dice_mean']:.3f} ({r['dice_sd']:.3f})  HD95 {r['hd95_mean']:5.2f} mm  "
            f"AVD {r['avd_mean']:5.1f} %  recall {r['recall_mean']:.3f}  F1 {r['f1_mean']:.3f}  | no TTA: Dice "
            f"{r['dice_no_tta']:.3f} F1 {r['f1_no_tta']:.3f}  [{r['params_k']}k params, train {r['train_s']:.0f} s, "
            f"inference {r['infer_s_no_tta']:.1f} s/subject, {r['infer_s_tta']:.1f} s with TTA]",
            flush=True,
        )
    out = pd.DataFrame(rows)
    out.to_csv(table_csv, index=False)
    print(f"table: {table_csv}; checkpoints: {', '.join(str(p) for p in sorted(root.glob('*/best.pt')))}")
    if not np.isfinite(out["dice_mean"]).all():
        raise SystemExit("a network produced no valid score")


if __name__ == "__main__":
    main()
