"""Paper-scale training and inference on a GPU: step time, patches per second, GPU memory and inference time.

Run on a machine with a CUDA GPU (issue 12's GPU measurements)::

    python benchmarks/bench_gpu.py [--out DIR] [--epochs 2] [--iters 30] [--workers 8] [--book-lesion CKPT]

Four parts, each printed as it finishes and written to ``OUT/bench_gpu.json``:

1. ``steps``: every architecture of :data:`wmloc_utils.training.PAPER_PRESETS`, both tasks: the training step
   that :func:`~wmloc_utils.training.train` takes (its own ``step_loss`` and ``step_update``: forward,
   :class:`~wmloc_utils.networks.SegLoss`, backward, AdamW under ``torch.autocast`` and a gradient scaler) on
   random batches of 2 patches of 128^3 voxels:
   median milliseconds per step, patches per second, peak GPU memory; then sliding-window inference of one
   1 mm brain-sized volume (182 x 218 x 182) with the lesion network. The cuDNN mode is the one training
   uses (MONAI ``set_determinism``: deterministic algorithms, no autotuning); U-Net is timed with
   autotuning too.
2. ``train``: :func:`~wmloc_utils.training.train` itself with the U-Net paper presets (lesions, regions) on
   a 1 mm demo cohort made here (true tissues as brain mask and tissue map, the true regions as labels),
   a few short epochs, ``device="auto"``: seconds per epoch and patches per second with the CPU data
   pipeline (``num_workers`` processes) included; validation timed apart.
3. ``infer``: :func:`~wmloc_utils.inference.predict` of both trained networks on whole 1 mm subjects, without
   and with the 8 flips of test-time augmentation (brain mask and, for regions, WM mask as the book gives).
4. ``book``: a network trained on the CPU (``--book-lesion``: notebook 04's best.pt) loaded with
   ``device="auto"`` on the GPU, its masks compared with the CPU's on the same subject (mixed precision on
   the GPU only).

The whole run takes about 5 minutes on one H200; ``--budget`` seconds stop it early (parts left out are named).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.inferers import sliding_window_inference

from wmloc_utils import demo, inference, runtime, training
from wmloc_utils.images import like, save_nifti

BRAIN_1MM = (182, 218, 182)
RESULTS: dict[str, list | dict] = {}


def gpu_mb() -> float:
    """Peak GPU memory allocated by PyTorch since the last reset (MB)."""
    return torch.cuda.max_memory_allocated() / 2**20


def time_steps(arch: str, task: str, device: torch.device, steps: int, warmup: int, benchmark: bool) -> dict:
    """Median time of ``train``'s step for one architecture and task at the paper preset, on random batches."""
    cfg = training.TrainConfig(**training.PAPER_PRESETS[arch][task])
    config = training.model_config(cfg)
    model, optimizer, loss_fn = training.training_parts(cfg, config, device)
    scaler = torch.amp.GradScaler("cuda")
    shape = (cfg.batch_size, 1, *cfg.patch_size)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn((cfg.batch_size, config["in_channels"], *cfg.patch_size), device=device, generator=gen)
    y = torch.randint(0, config["n_classes"], shape, device=device, generator=gen).float()
    torch.cuda.reset_peak_memory_stats()
    times = []
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, not benchmark
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = training.step_loss(model, loss_fn, x, y, y, use_amp=True)  # the labels stand in for their skeleton
        training.step_update(loss, optimizer, scaler)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_mb = gpu_mb()
    infer_s = None
    if task == "lesion":
        model.eval()
        volume = torch.randn((1, config["in_channels"], *BRAIN_1MM), device=device, generator=gen)
        with torch.no_grad(), torch.autocast("cuda"):
            for _ in range(2):  # warm-up, then timed
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                sliding_window_inference(volume, cfg.patch_size, 4, model, overlap=0.25, mode="gaussian")
                torch.cuda.synchronize()
                infer_s = time.perf_counter() - t0
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # as set_determinism leaves them
    median = statistics.median(times)
    return {
        "architecture": arch,
        "task": task,
        "cudnn": "autotune" if benchmark else "deterministic",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "ms_per_step": round(1e3 * median, 1),
        "patches_per_s": round(cfg.batch_size / median, 1),
        "peak_gpu_MB": round(step_mb),
        "brain_1mm_infer_s": None if infer_s is None else round(infer_s, 2),
    }


def part_steps(device: torch.device, steps: int, deadline: float) -> list[dict]:
    """Part 1: every architecture and task, plus U-Net with cuDNN autotuning (cases past ``deadline`` left out)."""
    cases = [(a, t, False) for a in training.PAPER_PRESETS for t in ("lesion", "regions")]
    cases.append(("unet", "lesion", True))
    rows = []
    for arch, task, bench in cases:
        if time.perf_counter() > deadline:
            print(f"left out (over budget): {arch} {task}", flush=True)
            continue
        row = time_steps(arch, task, device, steps, warmup=3, benchmark=bench)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def demo_table(root: Path, n_subjects: int, template_regions: Path | None) -> pd.DataFrame:
    """A 1 mm demo cohort with what the paper presets need: brain mask, tissue map and region labels per subject."""
    participants = demo.generate(root, n_subjects=n_subjects, grid="1mm", progress=False, n_jobs=n_subjects)
    regions_img = nib.load(template_regions) if template_regions else None
    rows = []
    for sid, site in zip(participants["participant_id"], participants["site"]):
        folder = root / site / sid
        tissue = nib.load(folder / "truth" / "tissue.nii.gz")
        t = np.asanyarray(tissue.dataobj)
        row = {
            "subject": sid,
            "t1": str(folder / "pre" / "T1.nii.gz"),
            "flair": str(folder / "pre" / "FLAIR.nii.gz"),
            "lesion": str(folder / "wmh.nii.gz"),
            "tissue": str(folder / "truth" / "tissue.nii.gz"),
            "brain": str(save_nifti(like(tissue, (t > 0).astype(np.uint8)), folder / "brain.nii.gz")),
            "wm": str(save_nifti(like(tissue, (t == 3).astype(np.uint8)), folder / "wm.nii.gz")),
        }
        # The true regions: template labels through the true transform, in true WM. demo_truth.truth_regions
        # also fills unlabelled WM, but it imports ANTsPy, which the GPU image lacks; a timing run needs no fill.
        if regions_img is not None:
            warped = np.asanyarray(demo.warp_from_template(regions_img, folder / "truth", order=0).dataobj)
            labels = np.where(t == 3, warped, 0).astype(np.uint8)
            row["regions"] = str(save_nifti(like(tissue, labels), folder / "regions.nii.gz"))
        rows.append(row)
    return pd.DataFrame(rows)


def part_train(table: pd.DataFrame, out: Path, epochs: int, iters: int, workers: int) -> dict:
    """Part 2: ``training.train`` with the U-Net paper presets; its checkpoints for part 3."""
    train_ids, val_ids = list(table["subject"][:-2]), list(table["subject"][-2:-1])
    results = {}
    for task, label in (("lesion", "lesion"), ("regions", "regions")):
        if label not in table:
            continue
        preset = dict(training.PAPER_PRESETS["unet"][task], epochs=epochs, iters_per_epoch=iters, num_workers=workers)
        cfg = training.TrainConfig(**preset)
        rec = {
            name: training.make_records(table, cfg.inputs, label, ids, brain_col="brain", tissue_col="tissue")
            for name, ids in (("train", train_ids), ("val", val_ids))
        }
        torch.cuda.reset_peak_memory_stats()  # this task's peak, not part 1's
        t0 = time.perf_counter()
        result = training.train(cfg, rec["train"], rec["val"], out / task, progress=False)
        total = time.perf_counter() - t0
        model = inference.load_segmenter(result["best"], "auto")
        _, val_ds = training.cached_datasets(cfg, [], rec["val"])
        t1 = time.perf_counter()
        training.validate(model.model, val_ds, cfg, model.device)
        torch.cuda.synchronize()
        val_s = time.perf_counter() - t1
        hist = result["history"]
        last = float(hist["seconds"].iloc[-1])
        row = {
            "task": task,
            "device": str(model.device),
            "epochs": epochs,
            "iters_per_epoch": iters,
            "num_workers": workers,
            "epoch_s": [round(float(s), 1) for s in hist["seconds"]],
            "validation_s_per_subject": round(val_s, 2),
            "patches_per_s_last_epoch": round(iters * cfg.batch_size / max(last - val_s, 1e-9), 1),
            "total_s_incl_caching": round(total, 1),
            "val_dice": [round(float(d), 3) for d in hist["val_dice"]],
            "peak_gpu_MB": round(gpu_mb()),
            "best": str(result["best"]),
        }
        print(json.dumps(row), flush=True)
        results[task] = row
    return results


def part_infer(table: pd.DataFrame, trained: dict, out: Path) -> list[dict]:
    """Part 3: whole-volume prediction of the trained networks on the last (unseen) subject, TTA off and on."""
    subject = table.iloc[-1]
    rows = []
    for task, row in trained.items():
        seg = inference.load_segmenter(row["best"], "auto")
        for tta in (False, True):
            times = []
            for _ in range(2):  # the first call warms up
                t0 = time.perf_counter()
                inference.predict(
                    seg,
                    subject["t1"],
                    subject["flair"],
                    out_dir=out / f"pred_{task}_{tta}",
                    tta=tta,
                    brain_mask=subject["brain"],
                    wm_mask=subject["wm"] if task == "regions" else None,
                )
                times.append(time.perf_counter() - t0)
            r = {
                "task": task,
                "tta": tta,
                "shape": list(nib.load(subject["flair"]).shape),
                "seconds": round(times[1], 2),
            }
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


def part_book(table: pd.DataFrame, checkpoint: Path, out: Path) -> dict:
    """Part 4: a CPU-trained checkpoint with device="auto" on the GPU vs on the CPU, same subject."""
    subject = table.iloc[-1]
    masks, seconds = {}, {}
    for device in ("auto", "cpu"):
        seg = inference.load_segmenter(checkpoint, device)
        t0 = time.perf_counter()
        images = inference.segment(seg, subject["t1"], subject["flair"], tta=True, brain_mask=subject["brain"])
        seconds["gpu" if device == "auto" else "cpu"] = round(time.perf_counter() - t0, 2)
        masks[device] = np.asanyarray(images["mask"].dataobj) > 0
    a, b = masks["auto"], masks["cpu"]
    row = {
        "checkpoint": str(checkpoint),
        "seconds": seconds,
        "mask_voxels_gpu_cpu": [int(a.sum()), int(b.sum())],
        "voxels_differing": int((a != b).sum()),
        "dice_gpu_vs_cpu": round(2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1), 4),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_gpu_out"))
    parser.add_argument("--work", default="/tmp/bench_gpu", help="scratch folder (demo cohort, checkpoints)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per architecture")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--template-regions", help="the true regions in MNI152 space (demo_truth's cache)")
    parser.add_argument("--book-lesion", help="a lesion checkpoint trained on the CPU (notebook 04's best.pt)")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds; parts that would start later are left out"
    )
    parser.add_argument("--parts", nargs="+", default=["steps", "train", "infer", "book"])
    args = parser.parse_args()
    start = time.perf_counter()
    device = runtime.resolve_device("auto")
    if device.type != "cuda":  # run_all.py runs every benchmark: on a CPU machine this one has nothing to measure
        print(f"bench_gpu: nothing measured, it needs a CUDA GPU (device='auto' gives {device})")
        return
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    RESULTS["machine"] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
    }
    print(json.dumps(RESULTS["machine"]), flush=True)
    table = None
    for part in args.parts:
        if time.perf_counter() - start > args.budget:
            print(f"left out (over the {args.budget:.0f} s budget): {part}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if part == "steps":
                RESULTS[part] = part_steps(device, args.steps, start + args.budget / 3)
            elif table is None and part in ("train", "infer", "book"):
                regions = Path(args.template_regions) if args.template_regions else None
                table = demo_table(work / "cohort", args.subjects, regions)
                RESULTS["cohort_s"] = round(time.perf_counter() - t0, 1)
                print(f"1 mm demo cohort of {args.subjects}: {RESULTS['cohort_s']} s", flush=True)
            if part == "train":
                RESULTS[part] = part_train(table, work / "train", args.epochs, args.iters, args.workers)
            elif part == "infer":
                RESULTS[part] = part_infer(table, RESULTS.get("train", {}), work)
            elif part == "book" and args.book_lesion:
                RESULTS[part] = part_book(table, Path(args.book_lesion), work)
        except Exception:  # one part's failure is reported; the others still run
            RESULTS[f"{part}_error"] = traceback.format_exc()
            print(RESULTS[f"{part}_error"], flush=True)
        print(f"--- {part}: {time.perf_counter() - t0:.0f} s", flush=True)
        (out / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    steps = pd.DataFrame(RESULTS.get("steps", []))
    if len(steps):
        print(steps.to_string(index=False))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
