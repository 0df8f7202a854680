"""NIfTI input/output with clear errors: loading, grid and label checks, atomic writes.

Every check names the file and says what is wrong, so that bad input never turns into a
silent wrong answer. Writes go to a temporary file that is renamed into place, so an
interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator

import nibabel as nib
import numpy as np


class InputError(ValueError):
    """Input data that cannot be used as given (the message names the file and the problem)."""


def _who(path: str | os.PathLike, subject: str | None) -> str:
    return f"subject {subject}: {path}" if subject else str(path)


def load_nifti(path: str | os.PathLike, subject: str | None = None, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI image, raising :class:`InputError` if it is missing, unreadable or not 3D.

    A trailing singleton 4th dimension (common in exported masks) is dropped.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{_who(path, subject)}: {what} file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(f"{_who(path, subject)}: {what} is not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        img = nib.Nifti1Image(data[..., 0], img.affine, img.header)
    elif data.ndim != 3:
        raise InputError(f"{_who(path, subject)}: {what} must be a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise InputError(f"{_who(path, subject)}: {what} has an invalid (singular or non-finite) affine")
    return img


def grid_of(img: nib.spatialimages.SpatialImage) -> dict:
    """A summary of an image's grid: shape, voxel size (mm), orientation code, voxel volume (mL)."""
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return {
        "shape": tuple(int(s) for s in img.shape[:3]),
        "voxel_mm": tuple(round(z, 4) for z in zooms),
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "voxel_ml": float(np.prod(zooms)) / 1000.0,
    }


def same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage, atol: float = 1e-3) -> bool:
    """True when two images share shape and affine (to ``atol`` mm)."""
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol)


def check_same_grid(ref: nib.spatialimages.SpatialImage, other: nib.spatialimages.SpatialImage,
                    ref_name: str, other_name: str, subject: str | None = None) -> None:
    """Raise :class:`InputError` unless ``other`` lies on the grid of ``ref``."""
    if not same_grid(ref, other):
        g1, g2 = grid_of(ref), grid_of(other)
        who = f"subject {subject}: " if subject else ""
        raise InputError(
            f"{who}{other_name} is not on the grid of {ref_name}: shape {g2['shape']} voxel {g2['voxel_mm']} mm "
            f"{g2['orientation']} vs shape {g1['shape']} voxel {g1['voxel_mm']} mm {g1['orientation']} "
            f"(max affine difference {np.abs(ref.affine - other.affine).max():.3g})"
        )


def check_labels(img: nib.spatialimages.SpatialImage, allowed: Iterable[int], path: str | os.PathLike,
                 subject: str | None = None, what: str = "mask") -> np.ndarray:
    """Return the image as an integer array, raising :class:`InputError` on values outside ``allowed``."""
    data = np.asanyarray(img.dataobj)
    allowed = sorted(int(a) for a in allowed)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(data, rounded, atol=1e-3):
            bad = np.unique(data[~np.isclose(data, rounded, atol=1e-3)])[:5]
            raise InputError(f"{_who(path, subject)}: {what} must hold integer labels {allowed}, found non-integer values such as {bad.tolist()}")
        data = rounded
    data = data.astype(np.int16)
    values = np.unique(data)
    extra = sorted(set(values.tolist()) - set(allowed))
    if extra:
        raise InputError(f"{_who(path, subject)}: {what} must only hold labels {allowed}, found {extra[:10]}")
    return data


def check_nonempty(mask: np.ndarray, path: str | os.PathLike, subject: str | None = None, what: str = "mask") -> None:
    """Raise :class:`InputError` when a mask has no foreground voxel."""
    if not np.any(mask):
        raise InputError(f"{_who(path, subject)}: {what} is empty (no foreground voxel)")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write to; rename it onto ``path`` only on success.

    The temporary name keeps the suffix (nibabel needs ``.nii.gz``) and is unique, so parallel
    workers never collide; an interrupted write leaves no half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write a NIfTI image atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def like(ref: nib.spatialimages.SpatialImage, data: np.ndarray, dtype=None) -> nib.Nifti1Image:
    """A new NIfTI image with ``data`` on the grid (affine) of ``ref``."""
    data = np.asarray(data if dtype is None else data.astype(dtype))
    img = nib.Nifti1Image(data, ref.affine)
    img.header.set_zooms(ref.header.get_zooms()[:3])
    img.set_qform(ref.affine, code=1)
    img.set_sform(ref.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_table_atomic(df, path: str | os.PathLike, **kwargs) -> Path:
    """Write a pandas table (CSV, or TSV when the name ends with .tsv) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t" if path.suffix == ".tsv" else ",", **kwargs)
    return path
