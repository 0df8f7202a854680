"""A network's checkpoint: writing and safe loading, and the preprocessing its configuration rebuilds.

Training writes checkpoints and inference reads them; both use the deterministic :func:`preprocessing`
a checkpoint's config describes (RAS, its spacing, z-scoring), so inference needs nothing of training.
A checkpoint carries its full configuration (architecture, inputs, classes, spacing, patch size,
normalisation, training parameters, versions), so that inference rebuilds exactly the same
preprocessing and refuses inputs the network was not trained on.

Checkpoints hold only tensors and plain data and are loaded with ``weights_only=True``: a file
holding Python objects (which could run code) is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    MaskIntensityd,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
)

from . import runtime
from .errors import InputError
from .images import atomic_path, write_errors
from .networks import build_model

NORMALISATION = (
    "z-score per modality over non-zero (brain) voxels: NormalizeIntensityd(nonzero=True, channel_wise=True)"
)


# ----------------------------------------------------------------------------- preprocessing


class RequireFiled(MapTransform):
    """Raise :class:`InputError` naming the subject when a pipeline gets a record without a file it needs."""

    # record key -> what it is, the setting that needs it, the make_records column, notebook 03's file
    NEEDS = {
        "brain": ("brain mask", "this pipeline is brain-masked (brain_masked=True)", "brain_col", "brain_mask"),
        "tissue": ("tissue map", 'augment="tissue" shifts each tissue class', "tissue_col", "tissue"),
    }

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key in self.keys:
            if not data.get(key):
                what, why, col, name = self.NEEDS[key]
                who = f"subject {data['subject']}: " if data.get("subject") else ""
                raise InputError(
                    f"{who}no {what}: {why}; give each record a '{key}' path "
                    f"(make_records(..., {col}=...), e.g. notebook 03's {name}.nii.gz)"
                )
        return data


def preprocessing(spacing: Sequence[float], with_label: bool, brain: bool = False, tissue: bool = False) -> Compose:
    """Deterministic preprocessing shared by training, validation and inference (inverted at inference).

    ``brain=True``: the record's "brain" mask (on the FLAIR grid) multiplies the image before the
    z-scoring, so skull, scalp and neck never enter the statistics or the network. ``tissue=True`` also
    loads the record's "tissue" map (training with ``augment="tissue"``).
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    for key, wanted in (("brain", brain), ("tissue", tissue)):
        if wanted:
            keys, modes = [*keys, key], [*modes, "nearest"]
    return Compose(
        [
            *(
                [RequireFiled([k for k, wanted in (("brain", brain), ("tissue", tissue)) if wanted])]
                if brain or tissue
                else []
            ),
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS", labels=None),
            Spacingd(keys, pixdim=tuple(spacing), mode=modes),
            *([MaskIntensityd("image", mask_key="brain")] if brain else []),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
            EnsureTyped(keys, dtype=torch.float32, track_meta=True),
        ]
    )


# ----------------------------------------------------------------------------- checkpoints


def plain_data(value: Any, where: str = "config") -> Any:
    """``value`` as plain data (dict/list/str/int/float/bool/None, tuples as lists), which loads with ``weights_only``.

    Raises TypeError naming the entry (``where``) that holds anything else.
    """
    if value is None or isinstance(value, bool):
        return value
    for base in (str, int, float):  # subclasses (TorchVersion, IntEnum, np.float64) become the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, np.generic):
        return plain_data(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: dictionary keys must be strings, got {sorted(map(repr, value))[:5]}")
        return {k: plain_data(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not plain data (dict/list/str/int/float/bool/None)")


# Checkpoints written before configs were plain data stored ``torch.__version__``, a str subclass.
_LEGACY_SAFE_GLOBALS = [torch.torch_version.TorchVersion]


def _interned(value):
    """``value`` with every string interned: pickle then writes equal content as equal bytes (its memo keys
    on object identity, and a resumed run's strings come from a loaded file, a fresh run's from the code)."""
    if isinstance(value, str):
        return sys.intern(str(value))
    if isinstance(value, dict):  # a state_dict (OrderedDict) keeps its type and _metadata (module versions)
        out = type(value)((_interned(k), _interned(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if type(value) in (list, tuple):  # (not namedtuples or other subclasses)
        return type(value)(_interned(v) for v in value)
    return value


def save_checkpoint(obj: dict, path: Path) -> None:
    """Write a checkpoint atomically; through a Python file so that a full disk raises OSError (ENOSPC).

    The same content gives the same bytes (:func:`_interned`): the same seed gives byte-identical checkpoints."""
    with write_errors(path), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(_interned(obj), f)


def read_checkpoint(path: str | os.PathLike, needs: Sequence[str] = ("config", "model")) -> dict:
    """Load a checkpoint file with ``weights_only=True`` (tensors and plain data only: no code can run).

    Raises :class:`InputError` naming the file if it is missing, corrupt or truncated, holds Python
    objects beyond tensors and plain data, or lacks the entries ``needs``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: checkpoint does not exist")
    try:
        with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: (GLOBAL \S+)", str(err))
        if found:
            raise InputError(
                f"{path}: not loaded: the file holds Python objects beyond tensors and plain data "
                f"({found.group(1)}), which could run code when loaded; use checkpoints written by "
                f"wmloc's train(), from a source you trust"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise InputError(
            f"{path}: not loaded: corrupt, truncated or not a torch checkpoint (the safe loader "
            f"refused it: {detail.group(1).strip()[:200] if detail else type(err).__name__}); "
            f"write it again (train again, or resume=False)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise InputError(
            f"{path}: not loaded: corrupt or truncated checkpoint ({type(err).__name__}: "
            f"{str(err).split('. ')[0][:200] if str(err) else 'empty or cut short'}); "
            f"write it again (train again, or resume=False)"
        ) from None
    missing = [k for k in needs if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"{path}: not a wmloc checkpoint (no {'/'.join(missing)} entries)")
    return ckpt


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "auto") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network of a checkpoint (eval mode, on ``device``) and return it with its config."""
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    model = build_model(config["architecture"], config["in_channels"], config["n_classes"], **config["model_kwargs"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise InputError(
            f"{path}: its weights do not fit the {config['architecture']} network its config describes "
            f"({str(err).splitlines()[0][:200]})"
        ) from None
    dev = device if isinstance(device, torch.device) else runtime.resolve_device(device)
    return model.to(dev).eval(), config


def check_inputs(config: dict, inputs: str, checkpoint: str | os.PathLike = "checkpoint") -> None:
    """Raise :class:`InputError` if ``inputs`` differs from the input mode the network was trained on."""
    if inputs != config["inputs"]:
        raise InputError(
            f"{checkpoint}: this {config['architecture']} {config['task']} network was trained on inputs "
            f"{config['inputs']!r} ({' + '.join(m.upper() for m in config['modalities'])}) and cannot be used "
            f"with inputs {inputs!r}; train a network for {inputs!r} or provide {config['inputs']!r}"
        )
