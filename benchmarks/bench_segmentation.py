"""Inference time and peak memory of the lesion and region networks at 2 mm and 1 mm (CPU unless a GPU is present).

Run: ``python benchmarks/bench_segmentation.py [--lesion CKPT] [--regions CKPT] [--threads N]``.
Each case runs in its own process (so peak memory is its own): a brain-sized LAS FLAIR (+T1) at the
given voxel size is segmented with ``inference.predict`` (load, preprocess, sliding window, interpolation
back onto the FLAIR grid, writing), with a brain mask and, for regions, a WM mask, as notebooks 06 and 09
and the apply path do. Without checkpoints, untrained networks are timed (speed does not
depend on the weights), in two configurations: the book's (notebooks 04/05: lesions at 2 mm, regions
at 3 mm, whatever the FLAIR's voxel size) and one trained at the FLAIR's own voxel size (a network
run at full resolution, as on a GPU). Targets on 2 CPU cores: lesion <= 2 s at 2 mm and <= 10 s at
1 mm; regions <= 5 s at 2 mm and <= 40 s at 1 mm.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from wmloc_utils import book, inference, training
from wmloc_utils.networks import build_model

FOV_MM = np.array([180.0, 216.0, 180.0])
TARGETS = {("lesion", 2.0): 2.0, ("lesion", 1.0): 10.0, ("regions", 2.0): 5.0, ("regions", 1.0): 40.0}
# The defaults of notebooks 04 and 05 (architecture "unet", inputs T1 + FLAIR), read from their parameters cells.
NOTEBOOK_DEFAULTS = {
    task: {k: v for k, v in book.defaults(chapter).items() if k in ("spacing", "patch_size", "model_overrides")}
    for task, chapter in (("lesion", "04"), ("regions", "05"))
}


def maps_as_images(paths: dict[str, Path]) -> dict[str, Path]:
    """A network trained with ``inputs="tissue"`` reads tissue maps; any images on the grid time the same."""
    return {"tissue": paths["t1"], "prob_wm": paths["flair"]}


def subject(folder: Path, voxel: float) -> dict[str, Path]:
    """A brain-sized ellipsoid FLAIR/T1 pair stored LAS at ``voxel`` mm, with its brain and a WM mask (a shell
    holding about 40 % of the brain, as in a real subject)."""
    shape = tuple(int(s) for s in np.ceil(FOV_MM / voxel))
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    r2 = (ijk**2).sum(0)
    brain = (r2 < 0.7).astype(np.float32)
    rng = np.random.default_rng(0)
    aff = np.diag([-voxel, voxel, voxel, 1.0])
    paths = {}
    for key in ("t1", "flair"):
        paths[key] = folder / f"{key}_{voxel}mm.nii.gz"
        nib.save(nib.Nifti1Image(brain * (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)), aff), paths[key])
    for key, mask in (("brain", brain), ("wm", (r2 > 0.15) & (r2 < 0.45))):
        paths[key] = folder / f"{key}_{voxel}mm.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(mask, np.uint8), aff), paths[key])
    return paths


def default_checkpoint(task: str, spacing: float | None, folder: Path) -> Path:
    """An untrained network with the notebook's configuration, at ``spacing`` mm (None: the notebook's)."""
    kwargs = dict(NOTEBOOK_DEFAULTS[task])
    if spacing is not None:
        kwargs["spacing"] = spacing
    cfg = training.TrainConfig(task=task, **kwargs)
    config = training.model_config(cfg)
    model = build_model("unet", config["in_channels"], config["n_classes"], **config["model_kwargs"])
    path = folder / f"{task}_{cfg.spacing[0]}mm.pt"
    torch.save({"config": config, "model": model.state_dict()}, path)
    return path


def run_case(task: str, voxel: float, native: bool, checkpoint: str | None, repeats: int) -> dict:
    """Time ``predict`` on one subject (best of ``repeats`` after a warm-up) and report peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(checkpoint) if checkpoint else default_checkpoint(task, voxel if native else None, tmp)
        paths = subject(tmp, voxel)
        seg = inference.load_segmenter(ckpt)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            inference.predict(
                seg,
                paths["t1"],
                paths["flair"],
                out_dir=tmp / "out",
                channels=maps_as_images(paths),
                brain_mask=paths["brain"],
                wm_mask=paths["wm"] if task == "regions" else None,
            )
            times.append(time.perf_counter() - start)
        shape = nib.load(paths["flair"]).shape
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "task": task,
        "voxel_mm": voxel,
        "shape": list(shape),
        "model_spacing_mm": seg.config["spacing"][0],
        "seconds": min(times[1:]),
        "peak_rss_mb": round(peak_mb),
        "target_s": TARGETS.get((task, voxel)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesion", help="lesion checkpoint (default: untrained book-default network per spacing)")
    parser.add_argument("--regions", help="region checkpoint (default: untrained book-default network per spacing)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the book's target machine has 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        task, voxel, native = args.case.split(":")
        print(json.dumps(run_case(task, float(voxel), native == "native", getattr(args, task), args.repeats)))
        return
    print(f"device: {inference.runtime.resolve_device('auto')}, torch threads: {args.threads}")
    cases = [
        (task, config, voxel)
        for task in ("lesion", "regions")
        for config in (["checkpoint"] if getattr(args, task) else ["book", "native"])
        for voxel in (2.0, 1.0)
    ]
    for task, config, voxel in cases:
        cmd = [
            sys.executable,
            __file__,
            "--case",
            f"{task}:{voxel}:{config}",
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ] + sum(([f"--{k}", v] for k in ("lesion", "regions") if (v := getattr(args, k))), [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            sys.exit(f"case {task} at {voxel} mm ({config}) failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{task:7s} {config:10s} FLAIR {voxel:.0f} mm {tuple(r['shape'])}, model at {r['model_spacing_mm']:.0f} mm: "
            f"{r['seconds']:6.2f} s (target <= {r['target_s']:.0f} s), peak RSS {r['peak_rss_mb']} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
