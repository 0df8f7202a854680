"""Headers and intensities that lie: orientation codes, qform/sform, voxel sizes, NaN/complex/wrapped data."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from wmloc_utils import images
from wmloc_utils.errors import InputError
from wmloc_utils.images import check_intensities, check_lesion_volume, check_voxel_sizes, load_nifti

AFF = np.diag([2.0, 2.0, 2.0, 1.0])
AUTHORS = Path(__file__).resolve().parents[2] / "shared" / "data" / "authors-labels" / "Train"


def brain(shape=(10, 12, 8), dtype=np.float32):
    return (np.random.default_rng(0).random(shape) * 100 + 1).astype(dtype)


def with_header(data, **fields):
    """An image whose raw header fields are set as given (affine None, so nibabel keeps them on save)."""
    header = nib.Nifti1Image(data, AFF).header.copy()
    for key, value in fields.items():
        header[key] = value
    return nib.Nifti1Image(data, None, header)


def saved(tmp_path, image, name="x.nii.gz"):
    nib.save(image, tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------- orientation header
def test_no_orientation_codes_is_refused(tmp_path):
    path = saved(tmp_path, with_header(brain(), qform_code=0, sform_code=0))
    with pytest.raises(
        InputError,
        match=r"subject s9: .*x.nii.gz: FLAIR has no orientation .*qform_code = 0 and "
        r"sform_code = 0.*voxel-size-only affine.*left and right.*dcm2niix",
    ):
        load_nifti(path, "s9", "FLAIR")


def test_plain_nibabel_images_and_project_images_load(tmp_path):
    """nib.Nifti1Image(data, affine) writes sform code 2 (qform 0); images.like writes both codes 1."""
    plain = nib.Nifti1Image(brain(), AFF)
    assert int(plain.header["sform_code"]) == 2 and int(plain.header["qform_code"]) == 0
    load_nifti(saved(tmp_path, plain))
    load_nifti(saved(tmp_path, images.like(plain, brain()), "like.nii.gz"))


def test_qform_only_image_loads(tmp_path):
    load_nifti(saved(tmp_path, with_header(brain(), qform_code=1, sform_code=0)))


@pytest.mark.parametrize("shift, ok", [(0.1, True), (5.0, False)])
def test_qform_and_sform_must_agree(tmp_path, shift, ok):
    img = nib.Nifti1Image(brain(), AFF)
    img.set_qform(AFF, code=1)
    moved = AFF.copy()
    moved[0, 3] += shift
    img.set_sform(moved, code=1)
    path = saved(tmp_path, img)
    if ok:
        load_nifti(path)
        return
    with pytest.raises(
        InputError,
        match=r"qform \(qform_code 1\) and an sform \(sform_code 1\) that disagree "
        r"\(origin 5.00 mm apart.*nibabel uses the sform.*copysform2qform",
    ):
        load_nifti(path, "s1", "T1")


def test_qform_and_sform_rotated_apart_are_refused(tmp_path):
    img = nib.Nifti1Image(brain(), AFF)
    img.set_qform(AFF, code=1)
    angle = np.deg2rad(1.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    turned = AFF.copy()
    turned[:3, :3] = rot @ AFF[:3, :3]
    img.set_sform(turned, code=1)
    with pytest.raises(InputError, match="direction cosines differ by 0.017"):
        load_nifti(saved(tmp_path, img))


def test_authors_region_maps_load():
    files = sorted(AUTHORS.glob("WMH_*.nii.gz"))
    if not files:
        pytest.skip(f"authors' region maps not found in {AUTHORS}")
    for path in files:
        img = load_nifti(path)
        check_voxel_sizes(img, path)


# ---------------------------------------------------------------- voxel sizes
@pytest.mark.parametrize(
    "zooms, message",
    [
        ((2000.0, 2.0, 2.0), r"voxel size \(pixdim\) is \(2000.0, 2.0, 2.0\) mm, not a plausible"),
        ((0.01, 1.0, 1.0), r"voxel size \(pixdim\) is \(0.01, 1.0, 1.0\) mm, not a plausible"),
    ],
    ids=["2000mm", "0.01mm"],
)
def test_implausible_voxel_sizes_are_refused(tmp_path, zooms, message):
    path = saved(tmp_path, nib.Nifti1Image(brain(), np.diag([*zooms, 1.0])))
    with pytest.raises(InputError, match=r"subject s1: .*FLAIR header " + message):
        check_voxel_sizes(load_nifti(path), path, "s1", "FLAIR")


def test_zero_voxel_size_is_refused(tmp_path):
    """A zero pixdim (nibabel reads it as 1 mm) against a 2 mm sform: volumes would be wrong."""
    path = saved(tmp_path, with_header(brain(), pixdim=[1, 0, 2, 2, 1, 1, 1, 1]))
    with pytest.raises(InputError, match=r"pixdim\) \(1.0, 2.0, 2.0\) mm contradicts its affine's \(2.0, 2.0, 2.0\)"):
        check_voxel_sizes(load_nifti(path), path, "s1", "FLAIR")
    flat = with_header(brain(), srow_z=[0.0, 0.0, 0.0, 0.0])  # sform with a zero third voxel axis
    with pytest.raises(InputError, match="invalid .*singular"):
        load_nifti(saved(tmp_path, flat, "flat.nii.gz"))


def test_anisotropic_oblique_voxels_are_accepted(tmp_path):
    aff = np.diag([-1.0, 1.0, 3.0, 1.0])
    angle = np.deg2rad(12)
    aff[1:3, 1:3] = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1.0, 3.0])
    path = saved(tmp_path, images.like(nib.Nifti1Image(brain(), aff), brain()))
    check_voxel_sizes(load_nifti(path), path)


# ---------------------------------------------------------------- intensities
def test_nan_and_inf_are_counted(tmp_path):
    data = brain()
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(InputError, match=r"subject s1: f.nii: FLAIR has 4 non-finite voxels \(NaN or Inf\) of 960"):
        check_intensities(nib.Nifti1Image(data, AFF), "f.nii", "s1", "FLAIR")


def test_complex_data_is_refused(tmp_path):
    path = saved(tmp_path, nib.Nifti1Image(brain().astype(np.complex64), AFF))
    with pytest.raises(InputError, match="T1 has data type complex64, not real-valued"):
        check_intensities(load_nifti(path), path, "s1", "T1")


@pytest.mark.parametrize("value, state", [(0, "all zero"), (7, r"constant \(7")])
def test_constant_image_is_refused(value, state):
    with pytest.raises(InputError, match=f"T1 is {state}"):
        check_intensities(nib.Nifti1Image(np.full((6, 6, 6), value, np.int16), AFF), "t.nii", "s1", "T1")


def test_wrapped_int8_is_refused(tmp_path):
    values = np.random.default_rng(0).integers(0, 250, (10, 12, 8))
    path = saved(tmp_path, nib.Nifti1Image(values.astype(np.int8), AFF))  # 128..249 wrap to negative
    with pytest.raises(InputError, match=r"FLAIR has 5\d\.\d% negative voxels .*int8.*wrapped around"):
        check_intensities(load_nifti(path), path, "s1", "FLAIR")
    check_intensities(nib.Nifti1Image(values.astype(np.int16), AFF), path, "s1", "FLAIR")


def test_a_few_negative_voxels_are_fine():
    """Interpolation undershoot (1% negative) is fine; so are negative values in a non-magnitude image."""
    data = brain()
    data[0, 0, :] = -5.0
    check_intensities(nib.Nifti1Image(data, AFF), "f.nii", "s1", "FLAIR")
    data[:5] = -data[:5]  # half negative: fine only when the image is not a magnitude image
    check_intensities(nib.Nifti1Image(data, AFF), "f.nii", "s1", "phase", magnitude=False)


# ---------------------------------------------------------------- lesion volume
def test_lesion_volume_limits():
    flair = np.zeros((20, 20, 20))
    flair[2:18, 2:18, 2:18] = 1.0
    mask = np.zeros_like(flair, dtype=np.uint8)
    check_lesion_volume(mask, flair, 0.008, "m.nii", "s1")  # no lesions: fine
    mask[5:7, 5:7, 5:7] = 1
    check_lesion_volume(mask, flair, 0.008, "m.nii", "s1")
    with pytest.raises(InputError, match=r"subject s1: m.nii: lesion mask covers \d+ mL, 100% .*inverted"):
        check_lesion_volume((flair > 0).astype(np.uint8), flair, 0.008, "m.nii", "s1")
    small = np.zeros_like(mask)
    small[:10] = 1  # 4000 voxels of 1 mL: 4 L
    with pytest.raises(InputError, match="lesion mask covers 4000 mL"):
        check_lesion_volume(small, np.ones_like(flair), 1.0, "m.nii", "s1")


def test_write_errors_name_the_file_and_killed_runs_leave_no_temp_files(tmp_path, monkeypatch):
    import errno
    import os

    from wmloc_utils import images

    target = tmp_path / "regions.nii.gz"
    stale = tmp_path / ".regions-abc123.nii.gz"  # what a run killed during a write leaves behind
    stale.write_bytes(b"half")
    os.utime(stale, (images._STARTED - 3600, images._STARTED - 3600))
    img = images.like(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), np.ones((4, 4, 4), np.uint8))
    images.save_nifti(img, target)
    assert target.exists() and not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = target.stat().st_mtime_ns
    images.save_nifti(img, target)  # the same bytes again: the file is left as it is
    assert target.stat().st_mtime_ns == before
    monkeypatch.setattr(images.os, "replace", full_disk)
    with pytest.raises(OSError, match=rf"cannot write {target}: no space left on device; free some space"):
        images.save_nifti(images.like(img, np.zeros((4, 4, 4), np.uint8)), target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary copy is gone too


def test_saved_nifti_bytes_depend_on_the_image_only(tmp_path):
    """The same image gives the same .nii.gz bytes (gzip header without temp name or time), whatever the name
    or the moment; a rewrite of unchanged content leaves the file and its mtime untouched."""
    import os
    import time as _time

    import nibabel as nib
    import numpy as np

    from wmloc_utils.images import save_nifti

    img = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), np.diag([2.0, 2.0, 3.0, 1.0]))
    a = save_nifti(img, tmp_path / "a.nii.gz")
    _time.sleep(1.1)  # gzip stores seconds
    b = save_nifti(img, tmp_path / "sub" / "other_name.nii.gz")
    assert a.read_bytes() == b.read_bytes()
    back = nib.load(a)
    assert np.array_equal(back.get_fdata(), img.get_fdata()) and np.allclose(back.affine, img.affine)
    os.utime(a, ns=(1, 1))
    save_nifti(img, a)
    assert a.stat().st_mtime_ns == 1
