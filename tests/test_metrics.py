"""Challenge metrics against hand-computed cases (anisotropic voxels, empty masks, label 2, lesion counts)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import dice as scipy_dice

from wmloc_utils import metrics
from wmloc_utils.errors import InputError


def block(shape=(12, 12, 10), lo=(3, 3, 3), size=(5, 5, 4)) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 1
    return out


def test_dice_matches_scipy_and_hand_value():
    ref = block()
    pred = np.roll(ref, 1, axis=0)  # 4 of 5 rows overlap: 80 of 100 voxels
    assert metrics.dice(ref, pred) == pytest.approx(0.8)
    assert metrics.dice(ref, pred) == pytest.approx(1 - scipy_dice(ref.ravel().astype(bool), pred.ravel().astype(bool)))


def test_boundary_is_in_plane():
    cube = block(size=(3, 3, 3))
    edge = metrics.boundary(cube)
    # 2D erosion keeps the centre voxel of every slice: 8 ring voxels x 3 slices (a 3D erosion gives 26)
    assert edge.sum() == 24
    assert not edge[4, 4, 3:6].any()


def test_hd95_slice_shift_anisotropic():
    ref = block()
    pred = np.roll(ref, 1, axis=2)  # one slice = 3 mm; a quarter of the rings lie 3 mm from the other mask
    assert metrics.hd95(ref, pred, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    assert metrics.hd95(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_hd95_in_plane_shift_uses_voxel_size():
    ref = block()
    pred = np.roll(ref, 1, axis=0)  # half of the ring voxels move off the other ring by one voxel
    assert metrics.hd95(ref, pred, (2.0, 1.0, 3.0)) == pytest.approx(2.0)
    assert metrics.hd95(ref, ref, (2.0, 1.0, 3.0)) == 0.0


def test_hd95_is_the_larger_direction():
    ref = block(shape=(30, 12, 10))
    pred = ref.copy()
    pred[25, 5, 5] = 1  # a far-away extra voxel: 1 of 73 prediction boundary voxels (<5%) ...
    assert metrics.hd95(ref, pred, (1, 1, 1)) == 0.0
    pred[25:27, 4:7, 4:7] = 1  # ... a larger far blob (18 of 90 voxels, >5%) moves the 95th percentile
    value = metrics.hd95(ref, pred, (1, 1, 1))
    assert value > 10.0
    assert value == pytest.approx(metrics.hd95(pred, ref, (1, 1, 1)))


def test_avd():
    ref = block()  # 100 voxels
    pred = ref.copy()
    pred[ref.astype(bool) & (np.indices(ref.shape)[0] == 3)] = 0  # remove one 5x4 row: 80 voxels
    assert metrics.avd(ref, pred) == pytest.approx(20.0)


def test_lesion_detection_counts_26_connected_components():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2, 2, 2] = ref[3, 3, 3] = 1  # corner-touching voxels: one lesion with 26-connectivity
    ref[10:12, 10:12, 10:12] = 1
    ref[15:17, 2:4, 2:4] = 1
    pred = np.zeros_like(ref)
    pred[3, 3, 3] = 1  # hits lesion 1
    pred[11, 11, 11] = 1  # hits lesion 2
    pred[5:7, 15:17, 15:17] = 1  # a false positive
    recall, f1 = metrics.lesion_detection(ref, pred)
    assert recall == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 / 3)  # precision = 2 detected / 3 predicted components


def test_lesion_detection_bridge_counts_predicted_components():
    # official evaluation.py (Aug 2017): precision = predicted components overlapping a reference lesion
    # / predicted components. The July 2017 version counted detected *reference* lesions (precision 2 here).
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2, 2, 2] = ref[2, 6, 2] = 1
    pred = np.zeros_like(ref)
    pred[2, 2:7, 2] = 1  # one predicted component over two reference lesions
    recall, f1 = metrics.lesion_detection(ref, pred)
    assert recall == 1.0
    assert f1 == pytest.approx(1.0)


def test_lesion_detection_two_predictions_on_one_lesion():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:9, 5, 5] = 1  # one reference lesion
    ref[10, 10, 10] = 1  # a second one, missed
    pred = np.zeros_like(ref)
    pred[2, 5, 5] = pred[8, 5, 5] = 1  # two predicted components, both on the first lesion
    pred[5, 10, 1] = 1  # a false positive
    recall, f1 = metrics.lesion_detection(ref, pred)
    precision = 2 / 3  # two of three predicted components overlap a lesion (July 2017 version: 1/3)
    assert recall == pytest.approx(1 / 2)
    assert f1 == pytest.approx(2 * precision * 0.5 / (precision + 0.5))


def test_label_two_is_discarded_from_prediction():
    ref = block()
    ref[0:2, 0:2, 0:2] = 2
    pred = (ref > 0).astype(np.uint8)  # prediction also covers the other-pathology voxels
    out = metrics.wmh_metrics(ref, pred, (1, 1, 3))
    assert out == {"dice": 1.0, "hd95": 0.0, "avd": 0.0, "recall": 1.0, "f1": 1.0}
    naive = metrics.dice(ref == 1, pred)  # scoring without discarding label 2
    assert naive == pytest.approx(2 * 100 / 208)


def test_empty_prediction_and_reference():
    ref = block()
    empty = np.zeros_like(ref)
    out = metrics.wmh_metrics(ref, empty, (1, 1, 1))
    assert out["dice"] == 0.0 and math.isnan(out["hd95"]) and out["avd"] == 100.0
    assert out["recall"] == 0.0 and out["f1"] == 0.0
    out = metrics.wmh_metrics(empty, ref, (1, 1, 1))
    assert out["recall"] == 1.0 and math.isnan(out["hd95"]) and math.isnan(out["avd"])
    assert out["f1"] == 0.0  # precision = 0 detected / 1 predicted component


def test_image_wrapper_checks_grid_and_labels(tmp_path):
    ref = block()
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    ref_path, pred_path = tmp_path / "wmh.nii.gz", tmp_path / "pred.nii.gz"
    nib.save(nib.Nifti1Image(ref, aff), ref_path)
    nib.save(nib.Nifti1Image(np.roll(ref, 1, axis=2), aff), pred_path)
    out = metrics.wmh_metrics_img(ref_path, pred_path, subject="s1")
    assert out["hd95"] == pytest.approx(3.0)
    nib.save(nib.Nifti1Image(ref, np.diag([1.0, 1.0, 1.0, 1.0])), pred_path)
    with pytest.raises(InputError, match="pred.nii.gz is not on the grid"):
        metrics.wmh_metrics_img(ref_path, pred_path, subject="s1")
    nib.save(nib.Nifti1Image(ref * 3, aff), pred_path)
    with pytest.raises(InputError, match=r"predicted mask must only hold labels \[0, 1\], found \[3\]"):
        metrics.wmh_metrics_img(ref_path, pred_path)


def test_region_dice_per_label_and_mean():
    ref = np.zeros((4, 4, 4), np.int16)
    ref[:2] = 1
    ref[2:] = 2
    pred = ref.copy()
    pred[1] = 2  # region 1: 16 of 32 kept; region 2 gets 16 extra
    out = metrics.region_dice(ref, pred, [1, 2, 3])
    assert out[1] == pytest.approx(2 * 16 / (32 + 16))
    assert out[2] == pytest.approx(2 * 32 / (32 + 48))
    assert math.isnan(out[3])
    assert out["mean"] == pytest.approx((out[1] + out[2]) / 2)


def test_hd95_matches_brute_force_in_world_coordinates():
    """Slice-by-slice 2D erosion, world coordinates from an oblique anisotropic affine, all-pairs distances."""
    from nibabel.affines import apply_affine
    from scipy import ndimage
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    ref = ndimage.binary_dilation(rng.random((20, 20, 8)) > 0.97, iterations=1)
    pred = ndimage.binary_dilation(rng.random((20, 20, 8)) > 0.97, iterations=1)
    zooms = (0.9, 1.1, 3.0)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    affine[:3, 3] = [-40, 12, 7]

    def edge_points(mask):
        edge = np.stack(
            [
                mask[..., z] & ~ndimage.binary_erosion(mask[..., z], np.ones((3, 3)), border_value=1)
                for z in range(mask.shape[2])
            ],
            axis=-1,
        )
        return apply_affine(affine, np.argwhere(edge))

    d = cdist(edge_points(ref), edge_points(pred))
    expect = max(np.percentile(d.min(axis=0), 95), np.percentile(d.min(axis=1), 95))
    assert metrics.hd95(ref, pred, zooms) == pytest.approx(expect)


def test_zero_voxel_sizes_and_negative_region_labels_are_refused():
    from wmloc_utils.errors import InputError

    ref = block()
    with pytest.raises(InputError, match="voxel sizes must be three positive numbers"):
        metrics.wmh_metrics(ref, ref, (1.0, 0.0, 1.0))
    with pytest.raises(InputError, match=r"labels >= 0, found \[-1\]"):
        metrics.region_dice(ref.astype(int) - 1, ref, [1])
