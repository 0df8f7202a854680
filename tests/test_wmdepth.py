"""Tests of the depth parcellations on a phantom with known geometry and anisotropic voxels."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from wmloc_utils import wmdepth
from wmloc_utils.errors import InputError

ZOOMS = (1.0, 1.5, 3.0)  # anisotropic voxels (mm)


def phantom(shape=(90, 60, 30), r_vent=8.0, r_wm=36.0, r_brain=40.0):
    """Concentric spheres (mm): ventricle r<r_vent, WM r_vent<=r<r_wm, cortex r_wm<=r<r_brain."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape, ZOOMS)], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    vent = radius < r_vent
    wm = (radius >= r_vent) & (radius < r_wm)
    brain = radius < r_brain
    return radius, vent, wm, brain


def test_periventricular_band_is_ten_mm_thick():
    radius, vent, wm, _ = phantom()
    pv = wmdepth.periventricular_deep(wm, vent, ZOOMS, distance_mm=10.0)
    assert set(np.unique(pv)) == {0, 1, 2}
    assert (pv[~wm] == 0).all()
    band = radius[pv == 1]
    assert band.max() == pytest.approx(8.0 + 10.0, abs=1.0)
    assert radius[pv == 2].min() == pytest.approx(18.0, abs=1.0)


def test_lateral_ventricles_keep_deep_csf_only():
    radius, vent, wm, brain = phantom()
    sulcal = (radius >= 37.0) & brain  # CSF near the surface must be dropped
    small = np.zeros_like(vent)
    small[40:42, 40:42, 20] = True  # a tiny deep CSF speck (< 10 % of the ventricle)
    found = wmdepth.lateral_ventricles(vent | sulcal | small, brain, ZOOMS, min_depth_mm=15.0)
    assert found.sum() == vent.sum() and (found == vent).all()
    with pytest.raises(InputError, match="deeper than"):
        wmdepth.lateral_ventricles(sulcal, brain, ZOOMS)


def test_bullseye_shells_are_ordered_and_equal_in_depth():
    radius, vent, wm, brain = phantom()
    lobes = np.where(np.meshgrid(np.arange(90), np.arange(60), np.arange(30), indexing="ij")[0] < 45, 1, 4)
    bull = wmdepth.bullseye(wm, vent, lobes, ZOOMS, n_shells=4)
    assert (bull[~wm] == 0).all() and set(np.unique(bull[wm]) // 10) == {1, 4}
    shell = bull % 10
    # shells follow the radius, and each spans ~ (36 - 8) / 4 = 7 mm of depth
    edges = [(radius[(shell == s) & wm].min(), radius[(shell == s) & wm].max()) for s in range(1, 5)]
    for s, (lo, hi) in enumerate(edges):
        assert lo == pytest.approx(8.0 + 7.0 * s, abs=1.6)
        assert hi - lo == pytest.approx(7.0, abs=2.0)
    assert all(edges[i][1] <= edges[i + 1][0] + 1.6 for i in range(3))
    table = wmdepth.bullseye_table(4)
    assert {11, 14, 41, 44} <= set(table["id"]) and len(table) == 1 + 16 * 4
    with pytest.raises(InputError, match="n_shells"):
        wmdepth.bullseye(wm, vent, lobes, ZOOMS, n_shells=10)


def test_empty_ventricles_are_an_error():
    _, vent, wm, _ = phantom()
    with pytest.raises(InputError, match="ventricle mask is empty"):
        wmdepth.periventricular_deep(wm, np.zeros_like(vent), ZOOMS)


def test_depth_maps_on_an_anisotropic_image():
    radius, vent, wm, brain = phantom()
    tissue = np.where(wm, 3, np.where(vent, 1, np.where(brain, 2, 0))).astype(np.int16)
    regions = np.where(brain, 3, 0).astype(np.int16)  # superior frontal WM, left
    affine = np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2], 1.0])
    maps = wmdepth.depth_maps(nib.Nifti1Image(tissue, affine), regions=nib.Nifti1Image(regions, affine))
    assert np.array_equal(np.asarray(maps["ventricles"].dataobj).astype(bool), vent)
    pv = np.asarray(maps["periventricular"].dataobj)
    assert radius[pv == 1].max() == pytest.approx(18.0, abs=1.0)
    bull = np.asarray(maps["bullseye"].dataobj)
    assert set(np.unique(bull[wm])) == {11, 12, 13, 14} and np.allclose(maps["bullseye"].affine, affine)


def test_cohort_depth_maps_writes_each_subjects_maps_and_falls_back_without_cortex(tmp_path, capsys):
    import pandas as pd

    from wmloc_utils import artefacts

    _, vent, wm, brain = phantom()
    affine = np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2], 1.0])
    nib.save(
        nib.Nifti1Image(np.where(wm, 3, np.where(vent, 1, np.where(brain, 2, 0))).astype(np.int16), affine),
        tmp_path / "tissue.nii.gz",
    )
    for name, regions in (("gyral", np.where(brain, 3, 0)), ("none", np.zeros(wm.shape))):
        nib.save(nib.Nifti1Image(regions.astype(np.int16), affine), tmp_path / f"{name}.nii.gz")
    records = pd.DataFrame(
        {
            "subject": ["a", "b"],
            "tissue": [str(tmp_path / "tissue.nii.gz")] * 2,
            "regions": [str(tmp_path / "gyral.nii.gz"), str(tmp_path / "none.nii.gz")],
            "lesion": ["ref_a", "ref_b"],
            "lesion_pred": ["pred_a", "pred_b"],
        }
    )
    out = wmdepth.cohort_depth_maps(records, tmp_path / "work", "lesion", progress=False)
    assert out["lesion"].tolist() == ["ref_a", "ref_b"] and out["lesion_pred"].tolist() == ["pred_a", "pred_b"]
    assert out.loc[0, "bullseye"] == str(
        artefacts.path(tmp_path / "work", artefacts.DEPTH_MAPS, subject="a", map="bullseye")
    )
    assert pd.isna(out.loc[1, "bullseye"]) and "subject b: periventricular/deep only" in capsys.readouterr().out
    assert all(Path(p).exists() for p in out["periventricular"])


def test_bullseye_on_regions_kept_inside_wm(eve_dir):
    """Subject region maps hold labels only inside WM; the cortex then comes from grey matter near gyral regions."""
    import nibabel as nib

    from wmloc_utils import atlas, wmdepth

    eve = atlas.load_eve(eve_dir)
    tissue = np.asanyarray(eve["tissue"].dataobj)
    refined = np.asanyarray(atlas.refined_atlas(eve_dir).dataobj)
    in_wm = np.where(tissue == 3, refined, 0).astype(np.int16)
    sub = (slice(None, None, 2),) * 3  # 2 mm for speed
    aff = eve["tissue"].affine @ np.diag([2, 2, 2, 1])
    brain = np.asanyarray(eve["mask"].dataobj)[sub].astype(np.uint8)
    maps = wmdepth.depth_maps(
        nib.Nifti1Image(tissue[sub].astype(np.int16), aff),
        nib.Nifti1Image(brain, aff),
        nib.Nifti1Image(in_wm[sub], aff),
        csf_labels=(0,),
    )
    bull = np.asanyarray(maps["bullseye"].dataobj)
    wm = tissue[sub] == 3
    assert (bull[wm] > 0).mean() > 0.95, "nearly every WM voxel gets a lobe x shell label"
    shells = np.bincount(bull[bull > 0] % 10)
    assert all(shells[1:5] > 0), f"all four shells present: {shells}"


def test_depth_below_surface_is_in_mm_and_counts_the_volume_edge():
    """wmdepth.depth_below_surface: mm on an anisotropic grid; a mask touching the volume's edge is shallow there."""
    brain = np.ones((9, 9, 9), bool)
    depth = wmdepth.depth_below_surface(brain, (1.0, 1.0, 3.0))
    assert depth[4, 4, 4] == pytest.approx(5.0)  # 5 voxels to the x and y edges (1 mm), 5 x 3 mm in z
    assert depth[0, 4, 4] == pytest.approx(1.0) and depth[4, 4, 0] == pytest.approx(3.0)
    assert (wmdepth.depth_below_surface(np.zeros((4, 4, 4), bool), (1, 1, 1)) == 0).all()
