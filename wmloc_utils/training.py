"""Training the lesion and region segmenters: subject split, MONAI data pipeline, loop and checkpoints.

One pipeline serves both tasks of the paper's part B: WMH segmentation (labels 0/1, challenge label 2
"other pathology" ignored) and WM region segmentation (labels 0..36 from the registered atlas).
A checkpoint carries its full configuration, so that inference rebuilds exactly the same preprocessing
(:mod:`wmloc_utils.checkpoints`, which writes and loads them). ``last.pt`` also holds the random states,
and every epoch re-seeds its sampling and augmentation from (seed, epoch), so a resumed run gives
exactly the weights and history of an uninterrupted one.

Multi-GPU (data-parallel) training: the same :func:`train` under ``torchrun``, one process per GPU
(DistributedDataParallel; "nccl" on CUDA, "gloo" on the CPU). Every process draws the epoch's global
batches exactly as one process would and trains on its slice of each; the loss is computed from sums over
the whole global batch and DDP averages the gradients, so N processes give the weights of one process up
to rounding. Only rank 0 validates and writes ``best.pt``, ``last.pt`` and ``history.csv``, which are
the checkpoints of a single-process run (same config). :func:`launch_files` writes the command line's
inputs from a notebook's records::

    # in a notebook: launch_files(cfg, train_records, val_records, "work/04_train_lesions/launch")
    torchrun --standalone --nproc_per_node=4 -m wmloc_utils.training \
        --config work/04_train_lesions/launch/config.json \
        --train work/04_train_lesions/launch/train.json --val work/04_train_lesions/launch/val.json \
        --out work/04_train_lesions

``python -m wmloc_utils.training ...`` (no torchrun) trains the same run in one process.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    DeleteItemsd,
    Flip,
    GaussianSmooth,
    MapTransform,
    MaskIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    SpatialPadd,
)
from tqdm.auto import tqdm

from . import __version__, artefacts, atlas, provenance, runtime
from .checkpoints import NORMALISATION, plain_data, preprocessing, read_checkpoint, save_checkpoint
from .errors import InputError
from .images import atomic_path, check_same_grid, write_errors, write_table_atomic
from .networks import PATCH_DIVISOR, SegLoss, build_model, label_skeleton, model_kwargs

# What each task predicts. Lesions may be flipped along any axis. Region labels are lateralised:
# they are flipped left-right only (axis 0 of RAS), with every left label swapped for its right
# counterpart ("mirror"), in augmentation and in test-time augmentation alike.
TASKS: dict[str, dict[str, Any]] = {
    "lesion": {"n_classes": 2, "ignore_label": 2, "flip_axes": (0, 1, 2), "label_values": (0, 1, 2), "mirror": False},
    "regions": {
        "n_classes": 37,
        "ignore_label": None,
        "flip_axes": (0,),
        "label_values": tuple(range(37)),
        "mirror": True,
    },
}
# Input modes -> channels (columns of the subjects table), in this order. "tissue" reads notebook 03's
# tissue classes and WM probability instead of intensities: maps that look alike from any scanner, for the
# region network (a region is found from where it lies, not from how bright it is); "t1+flair+tissue"
# reads both (notebook 05's default: on unseen data better than either alone, see there).
INPUTS: dict[str, tuple[str, ...]] = {
    "t1+flair": ("t1", "flair"),
    "flair": ("flair",),
    "t1": ("t1",),
    "tissue": ("tissue", "prob_wm"),
    "t1+flair+tissue": ("t1", "flair", "tissue", "prob_wm"),
}
# Augmentation sets: "basic" (flips, small affine, intensity scale/shift: the original set), "scanner" (also
# what changes between scanners: orientation, bias field, gamma, histogram, noise, blur, resolution) and
# "tissue" ("scanner" plus random intensities per tissue class and channel: needs the records' tissue maps).
AUGMENTATIONS = ("scanner", "basic", "tissue")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved inside every checkpoint)."""

    task: str = "lesion"  # "lesion" or "regions"
    architecture: str = "unet"  # see networks.ARCHITECTURES
    inputs: str = "t1+flair"  # "t1+flair", "flair" or "t1"
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)  # training voxel size (mm), RAS
    patch_size: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 4  # patches per optimisation step
    samples_per_volume: int = 2  # patches drawn from one loaded volume
    epochs: int = 12
    iters_per_epoch: int = 40
    lr: float = 3e-3
    weight_decay: float = 1e-5
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    skeleton_weight: float = 1.0
    pos_neg: tuple[int, int] = (2, 1)  # RandCropByPosNegLabeld pos:neg ratio (patches centred on labels)
    overlap: float = 0.25  # sliding-window overlap at validation
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    model_overrides: dict = field(default_factory=dict)
    augment: str = "scanner"  # "scanner" (scanner variation), "tissue" (also tissue contrasts) or "basic"
    brain_masked: bool = False  # images multiplied by a brain mask (records' "brain") before normalising

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {self.augment!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {list(INPUTS)}, got {self.inputs!r}")
        self.spacing = tuple(float(s) for s in np.broadcast_to(self.spacing, 3))
        self.patch_size = tuple(int(s) for s in np.broadcast_to(self.patch_size, 3))
        self.pos_neg = tuple(int(v) for v in self.pos_neg)
        div = PATCH_DIVISOR.get(self.architecture, 1)
        if any(s % div for s in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of {div} for {self.architecture!r}")


# GPU runs of the paper's scale: the networks at full size (each architecture's published or MONAI's
# standard configuration, instance norm where batches of 2 would make batch norm noisy) with a learning
# rate usual for it, trained nnU-Net-like at 1 mm on 128-voxel patches for 500 x 250 steps.
_PAPER_MODELS: dict[str, dict[str, Any]] = {
    "unet": dict(
        lr=1e-3,
        model_overrides=dict(channels=(32, 64, 128, 256, 320), strides=(2, 2, 2, 2), num_res_units=2, norm="instance"),
    ),
    "unetr": dict(
        lr=1e-4,
        model_overrides=dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, norm_name="instance"),
    ),
    "segresnet": dict(lr=1e-4, model_overrides=dict(init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))),
    "mednext": dict(
        lr=1e-3,
        model_overrides=dict(  # MedNeXt-B (Roy et al. 2023), 3x3x3 kernels
            init_filters=32,
            kernel_size=3,
            encoder_expansion_ratio=(2, 3, 4, 4),
            bottleneck_expansion_ratio=4,
            decoder_expansion_ratio=(4, 4, 3, 2),
            blocks_down=(2, 2, 2, 2),
            blocks_bottleneck=2,
            blocks_up=(2, 2, 2, 2),
            use_residual_connection=True,
        ),
    ),
    "multiresunet": dict(lr=1e-3, model_overrides=dict(base_filters=32, depth=4, alpha=1.67, norm="instance")),
}
_PAPER_TASKS: dict[str, dict[str, Any]] = {
    "lesion": dict(samples_per_volume=2, skeleton_weight=1.0),
    "regions": dict(samples_per_volume=1, skeleton_weight=0.0, augment="tissue"),  # records need tissue maps
}
PAPER_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    arch: {
        task: dict(
            task=task,
            architecture=arch,
            spacing=1.0,
            patch_size=128,
            batch_size=2,
            epochs=500,
            iters_per_epoch=250,
            brain_masked=True,
            **task_kw,
            **model_kw,
        )
        for task, task_kw in _PAPER_TASKS.items()
    }
    for arch, model_kw in _PAPER_MODELS.items()
}
"""TrainConfig keywords for a GPU run of the paper's scale, per architecture and task.

``TrainConfig(**PAPER_PRESETS["multiresunet"]["lesion"], inputs="flair")``; for training at the scans'
native resolution give ``spacing`` the FLAIR's voxel size. Mixed precision needs no option: :func:`train`
uses ``torch.autocast`` and a gradient scaler whenever the device is a CUDA GPU. These are starting points
in the paper's regime, not its verified hyperparameters.
"""


# ----------------------------------------------------------------------------- subjects and split


def make_split(
    table: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    group_col: str = "group",
) -> pd.DataFrame:
    """Subject-level train/val/test split, deterministic for a seed and stratified by ``group_col`` if filled.

    Subjects are shuffled within groups and dealt round-robin across groups, so every split gets
    groups in proportion. Returns columns subject, group, split.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1"
        )
    subjects = table["subject"].astype(str)
    if subjects.duplicated().any():
        raise InputError(f"duplicate subjects in the table: {sorted(subjects[subjects.duplicated()])[:5]}")
    groups = table[group_col].fillna("").astype(str) if group_col in table else pd.Series("", index=table.index)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(sorted(subjects[groups == g]))) for g in sorted(groups.unique())]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop())
    n = len(order)
    n_test = int(round(n * test_fraction)) if test_fraction else 0
    n_val = int(round(n * val_fraction)) if val_fraction else 0
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction else 0)
        n_val = max(n_val, 1 if val_fraction else 0)
    if n - n_test - n_val < 1:
        raise InputError(f"{n} subjects are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    split = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    out = pd.DataFrame({"subject": order, "split": split})
    out["group"] = out["subject"].map(dict(zip(subjects, groups)))
    return out[["subject", "group", "split"]].sort_values("subject").reset_index(drop=True)


def read_split(workdir: str | os.PathLike) -> pd.DataFrame:
    """The split notebook 04 saved in ``workdir`` (never re-split: every later notebook reuses it)."""
    path = artefacts.require(workdir, artefacts.SPLIT)
    split = pd.read_csv(path, dtype={"subject": str})
    if not {"subject", "split"} <= set(split.columns) or not set(split["split"]) <= {"train", "val", "test"}:
        raise InputError(f"{path}: not a split table (needs columns subject, split with train/val/test)")
    return split


def labelled_subjects(subjects: pd.DataFrame, label_col: str = "lesion", minimum: int = 3) -> pd.DataFrame:
    """The subjects that have a ``label_col`` file: what a network can be trained on (at least ``minimum``)."""
    has = (
        subjects[label_col].fillna("").astype(str) != "" if label_col in subjects else pd.Series(False, subjects.index)
    )
    if has.sum() < minimum:
        raise InputError(
            f"{int(has.sum())} of {len(subjects)} subjects have a {label_col} mask; training needs at least "
            f"{minimum}. To apply networks trained elsewhere to this cohort, skip training: run notebook "
            f"06_evaluate.ipynb with lesion_checkpoint=<best.pt> (or 09_new_cohort.ipynb, or the wmloc-apply "
            f"command)"
        )
    return subjects[has]


def make_records(
    table: pd.DataFrame,
    inputs: str,
    label_col: str | None = None,
    subjects: Sequence[str] | None = None,
    brain_col: str | None = None,
    tissue_col: str | None = None,
) -> list[dict]:
    """One pipeline record per subject: {"subject", "image": [channel paths], "label", "brain", "tissue": path}.

    ``brain_col`` names a column of brain masks (e.g. notebook 03's brain_mask.nii.gz) for brain-masked
    training (``TrainConfig(brain_masked=True)``), ``tissue_col`` one of tissue maps (notebook 03's
    tissue.nii.gz: 0 outside, 1 CSF, 2 GM, 3 WM) for ``TrainConfig(augment="tissue")``. Checks that every
    channel (label, mask) lies on the FLAIR grid and names the subject otherwise.
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {list(INPUTS)}, got {inputs!r}")
    rows = table if subjects is None else table[table["subject"].astype(str).isin([str(s) for s in subjects])]
    records = []
    for row in rows.itertuples(index=False):
        row = row._asdict()
        subject = str(row["subject"])
        ref_key = "flair" if isinstance(row.get("flair"), str) and row.get("flair") else INPUTS[inputs][0]
        paths = {m: row.get(m) for m in INPUTS[inputs]}
        if label_col:
            paths[label_col] = row.get(label_col)
        for col in (brain_col, tissue_col):
            if col:
                paths[col] = row.get(col)
        for what, p in paths.items():
            if not isinstance(p, str) or not p or not Path(p).exists():
                raise InputError(f"subject {subject}: {what} image missing ({p!r})")
        ref = nib.load(row[ref_key])
        for what, p in paths.items():
            check_same_grid(ref, nib.load(p), ref_key.upper(), what, subject=subject)
        rec = {"subject": subject, "image": [paths[m] for m in INPUTS[inputs]]}
        if label_col:
            rec["label"] = paths[label_col]
        for key, col in (("brain", brain_col), ("tissue", tissue_col)):
            if col:
                rec[key] = paths[col]
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- MONAI transforms


class SkeletonizeLabeld(MapTransform):
    """Add the per-class (tubed) skeleton of the label as ``skeleton_key``: computed once per cached sample."""

    def __init__(self, keys: str, n_classes: int, ignore_label: int | None, skeleton_key: str = "skeleton") -> None:
        super().__init__(keys)
        self.n_classes, self.ignore_label, self.skeleton_key = n_classes, ignore_label, skeleton_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        lab = d[self.keys[0]]
        skel = label_skeleton(np.asarray(lab[0]), self.n_classes, self.ignore_label)
        d[self.skeleton_key] = lab.clone() if hasattr(lab, "clone") else lab.copy()
        d[self.skeleton_key][0] = torch.as_tensor(skel, dtype=d[self.skeleton_key].dtype)
        return d


class RandMirrord(RandomizableTransform, MapTransform):
    """Flip left-right (axis 0 of RAS) with probability ``prob`` and swap left and right label ids in ``label_keys``."""

    def __init__(
        self, keys: Sequence[str], label_keys: Sequence[str], mirror: Sequence[int], prob: float = 0.5
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.label_keys, self.mirror, self.flip = tuple(label_keys), torch.as_tensor(mirror), Flip(spatial_axis=0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.keys:
            d[key] = self.flip(d[key])
            if key in self.label_keys:  # Flip returned a new tensor: relabel it in place
                d[key][:] = self.mirror[d[key].as_tensor().long()].to(d[key].dtype)
        return d


class RandTissueContrastd(RandomizableTransform, MapTransform):
    """Shift each tissue class (CSF, GM, WM) of each channel by its own random offset (in SD of the z-scored image).

    Contrasts between tissues change from scanner to scanner, and may all but vanish in one channel (a T1 whose
    grey and white matter look alike). Trained on such images, a network learns to use brain shape and whichever
    channel still shows the tissues: domain randomisation in the spirit of SynthSeg (Billot et al. 2023), here
    on the real images. The offsets are smoothed (1 voxel) so no tissue border gets an edge of its own; the
    background stays zero. Reads and then removes ``tissue_key`` (0 outside, 1..n_classes). The defaults
    measured best for the region network on an earlier version of the unseen demo cohort (mean region Dice
    0.57 inside the WM; 0.55 with offsets up to 1 SD in half the channels, 0.52 with 3 SD in 90 %, 0.50
    without). For the lesion network they did harm: Dice 0.55 vs 0.73 on 12 unseen subjects.
    """

    def __init__(
        self, keys: str, tissue_key: str = "tissue", max_offset: float = 2.0, prob: float = 0.7, n_classes: int = 3
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.tissue_key, self.max_offset, self.n_classes = tissue_key, max_offset, n_classes
        self.smooth = GaussianSmooth(sigma=1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        tissue = torch.as_tensor(d.pop(self.tissue_key))[0].long().clamp(0, self.n_classes)
        img = d[self.keys[0]]
        for c in range(img.shape[0]):
            self.randomize(None)
            if not self._do_transform:
                continue
            offsets = torch.zeros(self.n_classes + 1, dtype=torch.float32)
            offsets[1:] = torch.as_tensor(self.R.uniform(-self.max_offset, self.max_offset, self.n_classes))
            field = torch.as_tensor(self.smooth(offsets[tissue][None]))[0]
            img[c] = torch.where(img[c] != 0, img[c] + field.to(img.dtype), img[c])
        return d


class ForegroundMaskd(MapTransform):
    """Store where any channel of ``keys`` is non-zero (the brain of a masked or skull-stripped image) as ``mask_key``."""

    def __init__(self, keys: str, mask_key: str = "foreground") -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        img = d[self.keys[0]]
        d[self.mask_key] = (img != 0).any(0, keepdim=True).to(img.dtype)
        return d


def scanner_augmentations(keys: Sequence[str], fg_key: str) -> list:
    """Random changes of what differs between scanners, on z-scored patches; the background stays zero.

    Orientation (rotations up to ~20 degrees, scale), bias field, gamma, histogram warping, noise, blur
    (thicker along z, like 3 mm slices) and lower resolution; ``fg_key`` holds the patch's brain voxels.
    """
    img = "image"
    return [
        RandAffined(
            keys,
            prob=0.5,
            rotate_range=(0.35,) * 3,
            scale_range=(0.15,) * 3,
            mode=("bilinear", *["nearest"] * (len(keys) - 1)),
            padding_mode="zeros",
        ),
        RandBiasFieldd(img, degree=3, coeff_range=(0.0, 0.3), prob=0.4),
        RandAdjustContrastd(img, gamma=(0.6, 1.6), retain_stats=True, prob=0.4),
        RandHistogramShiftd(img, num_control_points=(5, 10), prob=0.3),
        RandGaussianSmoothd(img, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.5), prob=0.2),
        RandSimulateLowResolutiond(img, zoom_range=(0.5, 1.0), prob=0.2),
        RandGaussianNoised(img, std=0.1, prob=0.3),
        RandScaleIntensityd(img, factors=0.15, prob=0.5),
        RandShiftIntensityd(img, offsets=0.15, prob=0.5),
        MaskIntensityd(img, mask_key=fg_key),
    ]


def training_transforms(cfg: TrainConfig) -> Compose:
    """Preprocessing + skeleton (cached), then lesion-weighted patch sampling and augmentation (random).

    ``cfg.augment="basic"`` reproduces the original augmentation exactly; "scanner" adds
    :func:`scanner_augmentations`; "tissue" also :class:`RandTissueContrastd` on the records' "tissue" maps.
    ``cfg.brain_masked`` masks the images with the records' "brain".
    """
    task = TASKS[cfg.task]
    scanner = cfg.augment in ("scanner", "tissue")
    tissue = cfg.augment == "tissue"
    keys = ["image", "label", "skeleton", *(["foreground"] if scanner else [])]
    if task["mirror"]:
        flips = [RandMirrord(keys, ["label", "skeleton"], atlas.mirror_labels())]
    else:
        flips = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in task["flip_axes"]]
    if scanner:
        augment = scanner_augmentations(keys, "foreground") + [DeleteItemsd("foreground")]
    else:
        augment = [
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=(0.15,) * 3,
                scale_range=(0.1,) * 3,
                mode=("bilinear", "nearest", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return Compose(
        [
            *preprocessing(cfg.spacing, with_label=True, brain=cfg.brain_masked, tissue=tissue).transforms,
            *([DeleteItemsd("brain")] if cfg.brain_masked else []),  # whole-volume mask: not cropped, not batched
            *([ForegroundMaskd("image")] if scanner else []),
            SkeletonizeLabeld("label", task["n_classes"], task["ignore_label"]),
            SpatialPadd([*keys, *(["tissue"] if tissue else [])], spatial_size=cfg.patch_size),
            RandCropByPosNegLabeld(
                [*keys, *(["tissue"] if tissue else [])],
                label_key="label",
                spatial_size=cfg.patch_size,
                pos=cfg.pos_neg[0],
                neg=cfg.pos_neg[1],
                num_samples=cfg.samples_per_volume,
                image_key="image",
                image_threshold=0.0,
            ),
            *([RandTissueContrastd("image")] if tissue else []),
            *flips,
            *augment,
        ]
    )


# ----------------------------------------------------------------------------- checkpoints


def model_config(cfg: TrainConfig, train_subjects: Sequence[str] = (), val_subjects: Sequence[str] = ()) -> dict:
    """The full configuration stored in a checkpoint, as plain data (loads with ``weights_only=True``)."""
    import monai

    task = TASKS[cfg.task]
    overrides = dict(cfg.model_overrides)
    if cfg.architecture == "unetr":
        overrides.setdefault("img_size", cfg.patch_size)
    return plain_data(
        {
            "task": cfg.task,
            "architecture": cfg.architecture,
            "model_kwargs": model_kwargs(cfg.architecture, **overrides),
            "inputs": cfg.inputs,
            "modalities": list(INPUTS[cfg.inputs]),
            "in_channels": len(INPUTS[cfg.inputs]),
            "n_classes": task["n_classes"],
            "ignore_label": task["ignore_label"],
            "flip_axes": list(task["flip_axes"]),
            "label_mirror": atlas.mirror_labels().tolist() if task["mirror"] else None,
            "spacing": list(cfg.spacing),
            "orientation": "RAS",
            "patch_size": list(cfg.patch_size),
            "normalisation": NORMALISATION,
            "training": asdict(cfg),
            "train_subjects": list(train_subjects),
            "val_subjects": list(val_subjects),
            "versions": {
                "wmloc": __version__,
                "torch": torch.__version__,
                "monai": monai.__version__,
                "python": platform.python_version(),
            },
        }
    )


# What train() writes in out_dir; atomic_path's temporary copies of them are named ".<stem>-*<suffix>".
_OUTPUTS = ("best.pt", "last.pt", "history.csv")


def _remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete the temporary files of train()'s outputs that a killed run left in ``out_dir``; return them."""
    stale = [p for name in _OUTPUTS for p in out_dir.glob(f".{name.split('.')[0]}-*.{name.split('.', 1)[1]}")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------- training loop


def _epoch_batches(loader: DataLoader, dataset: CacheDataset, seed: int, n: int) -> Iterator[dict]:
    """The ``n`` batches of one epoch, passing through ``loader`` as often as needed.

    Patch sampling, augmentation and shuffling are re-seeded from ``seed`` (the run's seed + epoch), so
    that an epoch's batches depend only on (seed, epoch): a resumed run repeats them exactly.
    """
    dataset.transform.set_random_state(seed=seed)
    loader.generator.manual_seed(seed)
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), n)


def _rng_state() -> dict:
    """The global random states (torch CPU and CUDA, NumPy, Python) as tensors and plain data, for ``last.pt``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }


def _set_rng_state(state: dict) -> None:
    """Restore the global random states saved by :func:`_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))


def _non_finite_loss(value: float, epoch: int, step: int, batch: dict, x: torch.Tensor, cfg: TrainConfig) -> InputError:
    """The error that stops training at a NaN/Inf loss, naming the epoch, the step and the likely cause."""
    bad = sorted({str(s) for s, xi in zip(batch.get("subject", []), x) if not torch.isfinite(xi).all()})
    if bad or not torch.isfinite(x).all():
        cause = (
            f"the input patches of subject(s) {', '.join(bad) or '?'} hold non-finite (NaN/Inf) voxels: "
            f"fix or leave out those images"
        )
    else:
        cause = f"the inputs are finite, so the learning rate lr={cfg.lr:g} is likely too high (try lr={cfg.lr / 10:g})"
    return InputError(
        f"training stopped at epoch {epoch}, step {step + 1} of {cfg.iters_per_epoch}: the loss is "
        f"{value} (non-finite); {cause}. Nothing was saved for this epoch: last.pt still holds the "
        f"last finite state"
    )


def _check_finite_weights(model: torch.nn.Module, epoch: int, cfg: TrainConfig) -> None:
    """Refuse to go on (and to save) once any weight is NaN/Inf, naming the first bad tensors."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(
            f"training stopped at the end of epoch {epoch}: the weights hold non-finite values "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) although every loss was finite; "
            f"the learning rate lr={cfg.lr:g} is likely too high (try lr={cfg.lr / 10:g}). Nothing was "
            f"saved for this epoch: last.pt still holds the last finite state"
        )


def _onehot(labels: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), n).movedim(-1, 1)


def validate(model: torch.nn.Module, dataset: Sequence[dict], cfg: TrainConfig, device: torch.device) -> float:
    """Mean foreground Dice (MONAI DiceMetric) over whole validation volumes, sliding-window inference.

    Averaged in this process only: in a data-parallel run rank 0 alone validates (DiceMetric.aggregate
    would wait for the other processes to gather their scores).
    """
    from monai.metrics.utils import do_metric_reduction

    task = TASKS[cfg.task]
    n = task["n_classes"]
    metric, scores = DiceMetric(include_background=False, reduction="mean", ignore_empty=True), []
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for item in dataset:
            logits = sliding_window_inference(
                item["image"][None].to(device), cfg.patch_size, 4, model, overlap=cfg.overlap, mode="gaussian"
            )
            pred = torch.as_tensor(logits.argmax(1).cpu())
            label = torch.as_tensor(item["label"][0].long())[None]
            if task["ignore_label"] is not None:
                ignored = label == task["ignore_label"]
                label, pred = label.masked_fill(ignored, 0), pred.masked_fill(ignored, 0)
            scores.append(metric(_onehot(pred, n), _onehot(label, n)))
    value = do_metric_reduction(torch.cat(scores), "mean")[0].item()
    model.train()
    return float(value) if np.isfinite(value) else 0.0


def cached_datasets(
    cfg: TrainConfig, train_records: Sequence[dict], val_records: Sequence[dict]
) -> tuple[CacheDataset, CacheDataset]:
    """Training and validation datasets with their deterministic preprocessing cached in memory.

    Caching runs in one thread: MONAI's ``LoadImaged`` is not thread-safe, and caching threads gave
    records of two files (T1 + FLAIR) a single channel now and then. ``cfg.num_workers`` is for the
    DataLoader's worker processes, which each have their own copy of the transforms.
    """
    train_ds = CacheDataset(list(train_records), training_transforms(cfg), num_workers=1, progress=False)
    val_ds = CacheDataset(
        list(val_records),
        preprocessing(cfg.spacing, with_label=True, brain=cfg.brain_masked),
        num_workers=1,
        progress=False,
    )
    return train_ds, val_ds


def _comparable(config: dict) -> dict:
    """A checkpoint config without what does not change the result (versions, device, data-loading workers)."""
    training = {k: v for k, v in config.get("training", {}).items() if k not in ("device", "num_workers")}
    return {**{k: v for k, v in config.items() if k != "versions"}, "training": training}


def records_digest(records: Sequence[dict]) -> str:
    """SHA-256 over the bytes of every file the records name (channels, label, brain, tissue), in order.

    Stored in the checkpoint's config: a finished run is reused only when its images are the same bytes,
    so new inputs (e.g. bias-corrected images in place of the raw ones) are never served by an old network.
    """
    digest = hashlib.sha256()
    for rec in records:
        digest.update(str(rec.get("subject", "")).encode())
        for key in ("image", "label", "brain", "tissue"):
            for path in rec.get(key) if isinstance(rec.get(key), list) else [rec.get(key)]:
                if path:
                    digest.update(key.encode() + provenance.sha256_of(path).encode())
    return digest.hexdigest()


def _finished_run(out_dir: Path, config: dict, epochs: int) -> dict | None:
    """train()'s result when ``out_dir`` holds a finished run of the same configuration, subjects and data, else None."""
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if not (last_path.exists() and best_path.exists()):
        return None
    try:
        ckpt = read_checkpoint(last_path, needs=("config", "epoch", "history", "best_dice"))
    except InputError:
        return None  # unreadable: train again (the files are replaced)
    if ckpt["epoch"] != epochs - 1 or _comparable(ckpt["config"]) != _comparable(config):
        return None
    return {
        "best": best_path,
        "last": last_path,
        "history": pd.DataFrame(_with_seconds(ckpt["history"], out_dir)),
        "best_dice": ckpt["best_dice"],
    }


def _with_seconds(history: list[dict], out_dir: Path) -> list[dict]:
    """A checkpoint's history (no timings) with each epoch's seconds from ``history.csv`` (NaN where it has none)."""
    seconds = {}
    if (out_dir / "history.csv").exists():
        try:
            table = pd.read_csv(out_dir / "history.csv")
            seconds = dict(zip(table["epoch"], table["seconds"])) if {"epoch", "seconds"} <= set(table) else {}
        except (OSError, ValueError, pd.errors.ParserError):
            seconds = {}
    return [
        {**r, "seconds": float(seconds.get(r["epoch"], float("nan")))} if "seconds" not in r else dict(r)
        for r in history
    ]


# ----------------------------------------------------------------------------- data-parallel training


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (torchrun's RANK, LOCAL_RANK, WORLD_SIZE); one process: 0, 0, 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """The ranks torchrun sets in the environment (a plain run: a world of one)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes every file."""
        return self.rank == 0


def rank_device(device: str, ranks: Ranks) -> torch.device:
    """The device of this process: ``cfg.device`` alone, or under torchrun its own GPU (cuda:LOCAL_RANK) or the CPU.

    Any CUDA request ("auto" with GPUs, "cuda", "cuda:0") becomes cuda:LOCAL_RANK, so that N processes use N
    GPUs, never all the first; DDP has no Apple MPS backend, so "auto" on a Mac trains on the CPU.
    """
    dev = runtime.resolve_device(device)
    if not ranks.distributed:
        return dev
    if dev.type != "cuda":
        return torch.device("cpu")
    if ranks.local_rank >= torch.cuda.device_count():
        raise InputError(
            f"local rank {ranks.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            f"give torchrun --nproc_per_node={torch.cuda.device_count()} at most"
        )
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


@contextmanager
def _process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group ("nccl" on CUDA, "gloo" on the CPU) unless already joined; leave it after."""
    import torch.distributed as dist

    own = ranks.distributed and not dist.is_initialized()
    if own:  # rank 0 validates while the others wait: allow hours, not the default 30 minutes
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=3),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def _barrier(ranks: Ranks) -> None:
    """Wait for every process (nothing to wait for in a single-process run)."""
    if ranks.distributed:
        torch.distributed.barrier()


def _broadcast(value: float, ranks: Ranks) -> float:
    """Rank 0's ``value`` on every process (the validation Dice, which only rank 0 computes)."""
    if not ranks.distributed:
        return value
    backend = torch.distributed.get_backend()
    t = torch.tensor([value], dtype=torch.float64, device=f"cuda:{ranks.local_rank}" if backend == "nccl" else "cpu")
    torch.distributed.broadcast(t, 0)
    return float(t.item())


def rank_share(batch: dict, ranks: Ranks) -> tuple[dict, float]:
    """This process's slice of a global batch, and its weight in the loss (1, or 0 for a stand-in).

    Every process draws the same global batch (:func:`_epoch_batches`, seeded per epoch), so the union of
    the slices is exactly the batch one process would train on. Slices differ by one patch at most when
    the batch does not divide (an epoch's last pass over the subjects may give a short batch); a process
    left without a patch trains on the batch's first with weight 0, so that it still takes part in the
    gradient averaging but adds nothing to it.
    """
    n = len(batch["image"])
    if not ranks.distributed:
        return batch, 1.0
    bounds = np.linspace(0, n, ranks.world_size + 1).round().astype(int)
    lo, hi = int(bounds[ranks.rank]), int(bounds[ranks.rank + 1])
    weight = 1.0 if hi > lo else 0.0
    lo, hi = (lo, hi) if hi > lo else (0, 1)
    return {
        k: v[lo:hi] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) == n else v for k, v in batch.items()
    }, weight


def _sum_over_ranks(ranks: Ranks, weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``reduce`` of :meth:`SegLoss.global_terms`: a vector of loss sums, totalled over the processes.

    The total's value comes from an all-reduce, its gradient from this process's own sums; the caller
    multiplies the loss by the world size before backward, so that DDP's gradient average gives the
    gradient of the whole batch's loss (what one process computes).
    """

    def reduce(local: torch.Tensor) -> torch.Tensor:
        local = local * weight
        total = local.detach().clone()
        torch.distributed.all_reduce(total)
        return local + (total - local.detach())

    return reduce


def _data_parallel(model: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel (batch norm synchronised on GPUs); itself in one process."""
    if not ranks.distributed:
        return model
    if device.type == "cuda" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics of the global batch
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def step_loss(
    net: torch.nn.Module,
    loss_fn: SegLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    use_amp: bool,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training step's forward pass: the loss and its terms, under mixed precision when ``use_amp`` (CUDA).

    ``reduce`` sums the terms over data-parallel processes (:meth:`SegLoss.global_terms`); None: this batch only.
    """
    with torch.autocast(x.device.type, enabled=use_amp):
        logits = net(x)
        terms = loss_fn.global_terms(logits, y, s, reduce) if reduce is not None else loss_fn.terms(logits, y, s)
        return loss_fn.total(terms), terms


def step_update(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, world_size: int = 1
) -> None:
    """A training step's backward pass and update, through the gradient scaler (a no-op scaler off CUDA).

    The loss is multiplied by ``world_size`` because DDP averages the gradients that :func:`step_loss`'s
    ``reduce`` already summed over the processes.
    """
    scaler.scale(loss * world_size).backward()
    scaler.step(optimizer)
    scaler.update()


def training_parts(
    cfg: TrainConfig, config: dict, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, SegLoss]:
    """The network (on ``device``, freshly initialised), optimizer and loss that :func:`train` trains with, for
    ``cfg`` and its :func:`model_config` ``config``; benchmarks time the same parts."""
    model = build_model(cfg.architecture, config["in_channels"], config["n_classes"], **config["model_kwargs"])
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = SegLoss(cfg.ce_weight, cfg.dice_weight, cfg.skeleton_weight, ignore_label=TASKS[cfg.task]["ignore_label"])
    return model, optimizer, loss_fn


def train(
    cfg: TrainConfig,
    train_records: Sequence[dict],
    val_records: Sequence[dict],
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train with validation each epoch; write ``best.pt``, ``last.pt`` and ``history.csv`` in ``out_dir``.

    ``resume=True`` continues from ``last.pt`` when it exists (same task, architecture and inputs).
    A finished run of the same configuration and subjects in ``out_dir`` is reused: nothing is trained
    or written (a rerun of the book retrains nothing). Returns {"best": path, "last": path, "history": DataFrame, "best_dice": float}.

    Under ``torchrun`` each process trains on its share of every global batch of ``cfg.batch_size`` patches
    (``batch_size / world size`` each) on its own GPU; rank 0 alone validates and writes, and every process
    returns the same result. See the module docstring.
    """
    ranks = Ranks.from_env()
    device = rank_device(cfg.device, ranks)
    with _process_group(ranks, device):
        return _train(cfg, train_records, val_records, Path(out_dir), resume, progress, ranks, device)


def _train(
    cfg: TrainConfig,
    train_records: Sequence[dict],
    val_records: Sequence[dict],
    out_dir: Path,
    resume: bool,
    progress: bool,
    ranks: Ranks,
    device: torch.device,
) -> dict:
    """:func:`train` in one process of ``ranks`` on ``device``."""
    if ranks.main:
        with write_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(out_dir)
    _barrier(ranks)
    if not train_records:
        raise InputError("no training subjects")
    if cfg.batch_size < ranks.world_size:
        raise InputError(
            f"batch_size={cfg.batch_size} is smaller than the {ranks.world_size} processes: each trains on "
            f"a slice of every batch; give batch_size >= {ranks.world_size} (a multiple for equal slices)"
        )
    runtime.set_seed(cfg.seed)  # the same on every process: the same weights, and rank 0's random states resume all
    config = model_config(cfg, [r["subject"] for r in train_records], [r["subject"] for r in val_records])
    config["data_sha256"] = records_digest(train_records + val_records)
    finished = _finished_run(out_dir, config, cfg.epochs)
    if finished is not None:
        if progress and ranks.main:
            print(
                f"{out_dir}: a finished run with the same configuration and subjects is there, reused "
                f"(best validation Dice {finished['best_dice']:.3f}); delete its last.pt to train again"
            )
        return finished
    model, optimizer, loss_fn = training_parts(cfg, config, device)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(
        optimizer, total_iters=cfg.epochs * cfg.iters_per_epoch, power=0.9
    )
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start, best, history, rng = 0, -1.0, [], None
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and last_path.exists():
        ckpt = read_checkpoint(last_path, needs=("config", "model", "optimizer", "scheduler", "scaler", "epoch"))
        old = ckpt["config"]
        for key in ("task", "architecture", "inputs", "spacing", "patch_size"):
            if old[key] != config[key]:
                raise InputError(
                    f"{last_path}: cannot resume, it was trained with {key}={old[key]!r}, not {config[key]!r}"
                )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start, best, rng = ckpt["epoch"] + 1, ckpt["best_dice"], ckpt.get("rng")
        history = _with_seconds(ckpt["history"], out_dir)
    net = _data_parallel(model, device, ranks)  # what trains; ``model`` (the same weights) validates and is saved

    train_ds, val_ds = cached_datasets(cfg, train_records, val_records)
    loader = DataLoader(
        train_ds,
        batch_size=max(1, cfg.batch_size // cfg.samples_per_volume),
        shuffle=True,
        num_workers=cfg.num_workers,
        collate_fn=list_data_collate,
        generator=torch.Generator(),
    )
    if rng is not None:  # the global random states at the end of the saved epoch (older last.pt files have none)
        _set_rng_state(rng)
    model.train()
    bar = tqdm(
        range(start, cfg.epochs),
        desc=f"{cfg.task} {cfg.architecture} {cfg.inputs}",
        disable=not (progress and ranks.main),
        initial=start,
        total=cfg.epochs,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "dice": 0.0, "skeleton": 0.0}
        for step, batch in enumerate(_epoch_batches(loader, train_ds, cfg.seed + epoch, cfg.iters_per_epoch)):
            batch, weight = rank_share(batch, ranks)
            x, y, s = (batch[k].to(device) for k in ("image", "label", "skeleton"))
            optimizer.zero_grad(set_to_none=True)
            loss, terms = step_loss(
                net, loss_fn, x, y, s, use_amp, _sum_over_ranks(ranks, weight) if ranks.distributed else None
            )
            value = loss.item()  # the whole global batch's loss, the same on every process
            if not math.isfinite(value):
                raise _non_finite_loss(value, epoch, step, batch, x, cfg)
            step_update(loss, optimizer, scaler, ranks.world_size)
            scheduler.step()
            sums["loss"] += value
            for k in ("ce", "dice", "skeleton"):
                sums[k] += terms[k].item()
        _check_finite_weights(model, epoch, cfg)
        val_dice = validate(model, val_ds, cfg, device) if len(val_ds) and ranks.main else float("nan")
        val_dice = _broadcast(val_dice, ranks)
        row = {
            "epoch": epoch,
            **{k: v / cfg.iters_per_epoch for k, v in sums.items()},
            "val_dice": val_dice,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        improved = len(val_ds) == 0 or val_dice > best
        if improved:
            best = val_dice if len(val_ds) else best
        # wall-clock seconds go to history.csv only: the same seed gives byte-identical checkpoints
        state = {
            "config": config,
            "model": model.state_dict(),
            "epoch": epoch,
            "best_dice": best,
            "history": [{k: v for k, v in r.items() if k != "seconds"} for r in history],
            "val_dice": val_dice,
        }
        if ranks.main:
            if improved:
                save_checkpoint(state, best_path)
            save_checkpoint(
                {
                    **state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                },
                last_path,
            )
            with write_errors(out_dir / "history.csv"):
                write_table_atomic(pd.DataFrame(history), out_dir / "history.csv", index=False)
        _barrier(ranks)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_dice=f"{val_dice:.3f}")
    return {"best": best_path, "last": last_path, "history": pd.DataFrame(history), "best_dice": best}


# ----------------------------------------------------------------------------- command line (torchrun)


def launch_files(
    cfg: TrainConfig,
    train_records: Sequence[dict],
    val_records: Sequence[dict],
    folder: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    nproc: int | str = "gpu",
) -> str:
    """Write ``config.json``, ``train.json`` and ``val.json`` in ``folder``; return the torchrun command that trains on them.

    The run is the one ``train(cfg, train_records, val_records, out_dir)`` would do in the notebook, so a
    notebook can hand a multi-GPU machine the same configuration and subjects, and, run again after the
    command finished, reuse its checkpoints (a finished identical run is not retrained). The records' paths
    are written as given: give absolute ones when the command runs from another folder. ``nproc``: the
    processes (one per GPU; torchrun's "gpu" takes every GPU of the machine). ``out_dir`` defaults to ``folder``.
    """
    folder = Path(folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    paths = {"config": folder / "config.json", "train": folder / "train.json", "val": folder / "val.json"}
    for key, value in (("config", asdict(cfg)), ("train", list(train_records)), ("val", list(val_records))):
        with write_errors(paths[key]), atomic_path(paths[key]) as tmp:
            Path(tmp).write_text(json.dumps(plain_data(value, key), indent=1) + "\n")
    args = " ".join(f"--{k} {paths[k]}" for k in ("config", "train", "val"))
    return (
        f"torchrun --standalone --nproc_per_node={nproc} -m wmloc_utils.training {args} --out {Path(out_dir or folder)}"
    )


def read_config(path: str | os.PathLike) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file: its fields (as :func:`launch_files` writes them), or a
    checkpoint's whole config (its "training" section is used)."""
    try:
        data = json.loads(artefacts.must_exist(path, "write it with training.launch_files()").read_text())
        return TrainConfig(**data.get("training", data))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a training configuration ({err})") from None


def _read_records(path: str | os.PathLike) -> list[dict]:
    """Pipeline records (:func:`make_records`) from a JSON list."""
    try:
        records = json.loads(artefacts.must_exist(path, "write it with training.launch_files()").read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err})") from None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "subject" in r and "image" in r for r in records
    ):
        raise InputError(f"{path}: not a list of records (each with 'subject' and 'image', see make_records)")
    return records


def main(argv: Sequence[str] | None = None) -> None:
    """Command line ``python -m wmloc_utils.training`` (alone, or under torchrun; see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m wmloc_utils.training",
        description="Train a wmloc network (one process, or one per GPU under torchrun).",
    )
    parser.add_argument("--config", required=True, help="TrainConfig fields as JSON (launch_files' config.json)")
    parser.add_argument("--train", required=True, help="training records as JSON (launch_files' train.json)")
    parser.add_argument("--val", required=True, help="validation records as JSON (launch_files' val.json)")
    parser.add_argument("--out", required=True, help="output folder: best.pt, last.pt, history.csv")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = train(
            read_config(args.config),
            _read_records(args.train),
            _read_records(args.val),
            args.out,
            resume=args.resume,
            progress=not args.quiet,
        )
    except (InputError, FileNotFoundError) as err:
        raise SystemExit(f"wmloc training: {err}") from None
    if Ranks.from_env().main:
        print(f"best: {out['best']} (validation Dice {out['best_dice']:.3f})\nlast: {out['last']}")


if __name__ == "__main__":
    main()
