"""ANTsPy glue of the tissue, registration and subject steps: nibabel <-> ANTs images, seeding, scratch files.

The conversions keep each image's affine (orientation, voxel size, origin) intact. ANTs writes its
transforms under an output prefix and some of its calls (``ants.atropos``) leave files in the system
temp folder; :func:`scratch_prefix`, :func:`private_tempdir` and :func:`remove_files` keep them tidy.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ants
import nibabel as nib
import numpy as np

from .images import like


def to_ants(img: nib.spatialimages.SpatialImage, dtype=np.float32) -> ants.ANTsImage:
    """A nibabel image as an ANTs image with the same world geometry (spatial units forced to mm)."""
    data = np.asarray(np.asanyarray(img.dataobj), dtype=dtype)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_zooms(np.sqrt((img.affine[:3, :3] ** 2).sum(0)))
    out.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(out)


def to_nibabel(img: ants.ANTsImage, dtype=None) -> nib.Nifti1Image:
    """An ANTs image as a nibabel image (qform/sform set from the ANTs geometry)."""
    out = ants.to_nibabel_nifti(img)
    data = np.asanyarray(out.dataobj)
    return like(out, data if dtype is None else data.astype(dtype))


def seed_ants(seed: int = 0) -> None:
    """Seed ANTs' metric sampling (``--random-seed``) with ``seed + 1``: ANTs reads 0 as "seed from the clock"."""
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    ants.config._random_seed = int(seed) + 1


def coarsen(img: ants.ANTsImage, spacing: float | None) -> ants.ANTsImage:
    """Resample to at least ``spacing`` mm per axis (coarser axes are kept); None keeps the grid."""
    if not spacing:
        return img
    target = tuple(max(float(s), spacing) for s in img.spacing)
    if np.allclose(target, img.spacing):
        return img
    return ants.resample_image(img, target, False, 0)


def scratch_prefix(tag: str) -> str:
    """A fresh output prefix ``wmloc-{tag}-*`` in the system temp folder, for files deleted after the call."""
    fd, path = tempfile.mkstemp(prefix=f"wmloc-{tag}-")
    os.close(fd)
    os.unlink(path)
    return path


@contextmanager
def private_tempdir() -> Iterator[str]:
    """Point ``tempfile`` at a private folder for an ANTsPy call, then delete it.

    ``ants.atropos`` writes its probability maps with ``tempfile.mktemp`` and never removes
    them; without this, every segmentation leaves three files in the system temp folder.
    """
    old = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="wmloc-ants-") as tmp:
        tempfile.tempdir = tmp
        try:
            yield tmp
        finally:
            tempfile.tempdir = old


def remove_files(paths: Iterable[str | os.PathLike]) -> None:
    """Delete each file of ``paths`` (ANTs transforms, scratch outputs); missing ones are fine."""
    for p in paths:
        Path(p).unlink(missing_ok=True)
