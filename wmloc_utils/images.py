"""NIfTI input/output with clear errors: loading, header, grid, intensity and label checks, atomic writes.

Every check names the file and says what is wrong and how to fix it, so that bad input (a header
without orientation, disagreeing qform/sform, implausible voxels, NaN or wrapped-around values,
an inverted lesion mask) never turns into a silent wrong answer. Writes go to a temporary file that is renamed into place, so an
interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import errno
import filecmp
import gzip
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError


def _who(path: str | os.PathLike, subject: str | None) -> str:
    return f"subject {subject}: {path}" if subject else str(path)


def load_nifti(path: str | os.PathLike, subject: str | None = None, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI image, raising :class:`InputError` if it is missing, unreadable, not 3D or unoriented.

    The orientation header is checked first (:func:`check_orientation_header`), so a file without
    orientation is reported as such, not as a grid mismatch later. A trailing singleton 4th
    dimension (common in exported masks) is dropped.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{_who(path, subject)}: {what} file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise InputError(
            f"{_who(path, subject)}: {what} is not a readable NIfTI file ({type(err).__name__}: {err})"
        ) from err
    check_orientation_header(img, path, subject, what)
    if data.ndim == 4 and data.shape[3] == 1:
        img = nib.Nifti1Image(data[..., 0], img.affine, img.header)
    elif data.ndim != 3:
        raise InputError(f"{_who(path, subject)}: {what} must be a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise InputError(f"{_who(path, subject)}: {what} has an invalid (singular or non-finite) affine")
    return img


#: qform and sform affines that differ by more than this (mm in translation, or in the direction
#: cosines / relative voxel size) put the image in two different places depending on the tool.
QFORM_SFORM_MM = 1.0
QFORM_SFORM_ROT = 1e-3


def _axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel sizes (mm) and unit direction cosines (columns) of an affine."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    return zooms, affine[:3, :3] / np.where(zooms > 0, zooms, 1.0)


def check_orientation_header(
    img: nib.spatialimages.SpatialImage, path: str | os.PathLike, subject: str | None = None, what: str = "image"
) -> None:
    """Refuse a NIfTI header without orientation (qform_code = sform_code = 0) or with disagreeing qform/sform.

    Without either, nibabel falls back to a voxel-size-only affine, so left and right may be
    swapped without any error; with two disagreeing ones, tools that read the qform (ITK/ANTs may)
    and tools that read the sform (nibabel) place the image differently.
    """
    header = img.header
    if "qform_code" not in header or "sform_code" not in header:
        return  # not a NIfTI header (no such fields): nothing to check
    who = _who(path, subject)
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode == 0 and scode == 0:
        raise InputError(
            f"{who}: {what} has no orientation in its header (qform_code = 0 and sform_code = 0): nibabel would "
            f"fall back to a voxel-size-only affine, so left and right may be swapped. Fix: write the scanner's "
            f"orientation into the sform/qform, e.g. re-export the image from DICOM with dcm2niix"
        )
    if qcode > 0 and scode > 0:
        q, s = header.get_qform(), header.get_sform()
        (qz, qr), (sz, sr) = _axes(q), _axes(s)
        shift = float(np.linalg.norm(q[:3, 3] - s[:3, 3]))
        rot = float(np.abs(qr - sr).max())
        scale = float(np.abs(qz / np.where(sz > 0, sz, 1.0) - 1).max())
        if shift > QFORM_SFORM_MM or rot > QFORM_SFORM_ROT or scale > QFORM_SFORM_ROT:
            raise InputError(
                f"{who}: {what} header holds a qform (qform_code {qcode}) and an sform (sform_code {scode}) that "
                f"disagree (origin {shift:.2f} mm apart, direction cosines differ by {rot:.3g}, voxel sizes by "
                f"{scale:.3g}): nibabel uses the sform, ITK/ANTs may use the qform, so the image would sit in "
                f"different places. Trust the one that matches the scanner (re-export from DICOM with dcm2niix if "
                f"unsure) and copy it onto the other, e.g. img.set_qform(img.get_sform(), code={scode}) in nibabel "
                f"or `fslorient -copysform2qform`"
            )


#: Voxel sizes (mm) a brain MRI can have; anything outside is a broken header, not a scan.
VOXEL_MM = (0.1, 10.0)


def check_voxel_sizes(
    img: nib.spatialimages.SpatialImage, path: str | os.PathLike, subject: str | None = None, what: str = "image"
) -> None:
    """Refuse voxel sizes outside 0.1-10 mm, or header voxel sizes (pixdim) that contradict the affine.

    Volumes (mL) are computed from the voxel size, so an implausible one would give wrong loads silently.
    """
    who = _who(path, subject)
    pixdim = np.array([float(z) for z in img.header.get_zooms()[:3]])
    from_affine = _axes(img.affine)[0]
    lo, hi = VOXEL_MM
    for name, zooms in (("header voxel size (pixdim)", pixdim), ("voxel size of the affine", from_affine)):
        if not np.all((zooms >= lo) & (zooms <= hi)):
            raise InputError(
                f"{who}: {what} {name} is {tuple(round(float(z), 4) for z in zooms)} mm, not a plausible brain MRI "
                f"voxel ({lo:g}-{hi:g} mm per axis). Fix the header (pixdim and sform/qform), e.g. re-export the "
                f"image from DICOM with dcm2niix"
            )
    if np.abs(pixdim / from_affine - 1).max() > 0.01:
        raise InputError(
            f"{who}: {what} header voxel size (pixdim) {tuple(round(float(z), 4) for z in pixdim)} mm contradicts "
            f"its affine's {tuple(round(float(z), 4) for z in from_affine)} mm, so volumes would be wrong. Fix the "
            f"header so both agree (e.g. re-export with dcm2niix, or in nibabel img.header.set_zooms(...))"
        )


#: A magnitude image (T1, FLAIR) with more negative voxels than this fraction has wrapped around
#: (e.g. stored as int8/int16 with values above the type's maximum) or is not a magnitude image.
MAX_NEGATIVE_FRACTION = 0.05


def check_intensities(
    img: nib.spatialimages.SpatialImage,
    path: str | os.PathLike,
    subject: str | None = None,
    what: str = "image",
    magnitude: bool = True,
) -> None:
    """Refuse intensities no method can use: complex or non-numeric, NaN/Inf, constant, or (magnitude) mostly negative."""
    who = _who(path, subject)
    data = np.asanyarray(img.dataobj)
    if np.iscomplexobj(data) or not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise InputError(
            f"{who}: {what} has data type {data.dtype}, not real-valued scalars. Save the magnitude image "
            f"(e.g. numpy.abs of complex data) as float32 or int16"
        )
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(
                f"{who}: {what} has {bad} non-finite voxels (NaN or Inf) of {data.size}. Replace them, e.g. with 0 "
                f"(numpy.nan_to_num, or fslmaths IN -nan OUT)"
            )
    lo, hi = data.min(), data.max()
    if lo == hi:
        state = "all zero" if lo == 0 else f"constant ({lo})"
        raise InputError(
            f"{who}: {what} is {state}: there is no image in it. Check that this is the right file "
            f"and that its export did not fail"
        )
    if magnitude:
        negative = float(np.count_nonzero(data < 0)) / data.size
        if negative > MAX_NEGATIVE_FRACTION:
            raise InputError(
                f"{who}: {what} has {100 * negative:.1f}% negative voxels (min {lo}, data type {data.dtype}); a "
                f"magnitude MRI is non-negative, so the values have most likely wrapped around a too small integer "
                f"type. Re-export it as int16/uint16 or float32 (with the scanner's scaling)"
            )


#: A lesion mask larger than this (mL), or than this fraction of the FLAIR's non-zero voxels, is
#: not a lesion segmentation (an inverted mask, a brain mask, or the wrong file).
MAX_LESION_ML = 500.0
MAX_LESION_FRACTION = 0.5


def check_lesion_volume(
    mask: np.ndarray,
    flair: np.ndarray,
    voxel_ml: float,
    path: str | os.PathLike,
    subject: str | None = None,
    what: str = "lesion mask",
) -> None:
    """Refuse an implausibly large lesion mask; an empty one is fine (a subject without lesions)."""
    lesion = int(np.count_nonzero(mask))
    if lesion == 0:
        return
    ml, tissue = lesion * voxel_ml, int(np.count_nonzero(flair))
    if ml > MAX_LESION_ML or lesion > MAX_LESION_FRACTION * tissue:
        raise InputError(
            f"{_who(path, subject)}: {what} covers {ml:.0f} mL, {100 * lesion / max(tissue, 1):.0f}% of the FLAIR's "
            f"non-zero voxels; a lesion segmentation is at most {MAX_LESION_ML:g} mL and "
            f"{100 * MAX_LESION_FRACTION:g}% of the image. Is it inverted (lesions 0, rest 1), a brain mask, or "
            f"another subject's file? Use a mask with 1 on the lesions and 0 elsewhere"
        )


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


def check_same_grid(
    ref: nib.spatialimages.SpatialImage,
    other: nib.spatialimages.SpatialImage,
    ref_name: str,
    other_name: str,
    subject: str | None = None,
) -> None:
    """Raise :class:`InputError` unless ``other`` lies on the grid of ``ref``."""
    if not same_grid(ref, other):
        g1, g2 = grid_of(ref), grid_of(other)
        who = f"subject {subject}: " if subject else ""
        raise InputError(
            f"{who}{other_name} is not on the grid of {ref_name}: shape {g2['shape']} voxel {g2['voxel_mm']} mm "
            f"{g2['orientation']} vs shape {g1['shape']} voxel {g1['voxel_mm']} mm {g1['orientation']} "
            f"(max affine difference {np.abs(ref.affine - other.affine).max():.3g})"
        )


def check_labels(
    img: nib.spatialimages.SpatialImage,
    allowed: Iterable[int],
    path: str | os.PathLike,
    subject: str | None = None,
    what: str = "mask",
) -> np.ndarray:
    """Return the image as an integer array, raising :class:`InputError` on values outside ``allowed``."""
    data = np.asanyarray(img.dataobj)
    allowed = sorted(int(a) for a in allowed)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(data, rounded, atol=1e-3):
            bad = np.unique(data[~np.isclose(data, rounded, atol=1e-3)])[:5]
            raise InputError(
                f"{_who(path, subject)}: {what} must hold integer labels {allowed}, found non-integer values such as {bad.tolist()}"
            )
        data = rounded
    data = data.astype(np.int16)
    values = np.unique(data)
    extra = sorted(set(values.tolist()) - set(allowed))
    if extra:
        raise InputError(f"{_who(path, subject)}: {what} must only hold labels {allowed}, found {extra[:10]}")
    return data


_WRITE_HINTS = {
    **dict.fromkeys((errno.EROFS, errno.EACCES, errno.EPERM), "choose a writable folder"),
    **dict.fromkeys((errno.ENOSPC, errno.EDQUOT), "free some space or choose a folder on another disk"),
}


@contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError while writing ``path`` with a message naming the path, the problem and the fix."""
    try:
        yield
    except OSError as err:
        if str(err).startswith(f"cannot write {path}:"):
            raise
        problem = os.strerror(err.errno) if err.errno else str(err)
        hint = _WRITE_HINTS.get(err.errno, "check the folder and the disk")
        message = f"cannot write {path}: {problem.lower()}; {hint}"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err


#: Temporary files older than this process are left over from a run that was killed (see :func:`atomic_path`).
_STARTED = time.time()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path`` to write to; rename it onto ``path`` only on success.

    The temporary name keeps the suffix (nibabel needs ``.nii.gz``) and is unique, so parallel
    workers never collide; an interrupted write leaves no half-written output behind; a file whose
    bytes would not change is left untouched (a rerun writes nothing new); and the
    temporary files of a run that was killed before are removed by the next write of the same file.
    Write errors (read-only folder, full disk) name the file.
    """
    path = Path(path)
    suffix = "".join(path.suffixes)
    prefix = f".{path.name.split('.')[0]}-"
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{prefix}*{suffix}"):
            if stale.stat().st_mtime < _STARTED - 1:
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        with write_errors(path):
            yield Path(tmp)
            if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
                Path(tmp).unlink()  # the same bytes: the file and its time stamp stay as they are
            else:
                os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
                os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write a NIfTI image atomically (temporary file in the same folder, then rename).

    A ``.nii.gz`` gets a reproducible gzip header (no file name, time 0; nibabel's holds the temporary
    name and the clock): the same image gives the same bytes, so a rerun leaves an unchanged file untouched
    and the same seed gives byte-identical outputs.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz") and hasattr(img, "to_bytes"):
            with (
                open(tmp, "wb") as raw,
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=nib.openers.Opener.default_compresslevel
                ) as gz,
            ):
                gz.write(img.to_bytes())
        else:
            nib.save(img, tmp)
    return path


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
