"""Tests of the per-lesion location classes on a phantom with known geometry and 1x1x3 mm voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from wmloc_utils import lesion_classes as lc
from wmloc_utils.errors import InputError
from wmloc_utils.localization import regional_loads

ZOOMS = (1.0, 1.0, 3.0)
SHAPE = (80, 80, 32)
PV, JC, IT, DWM = lc.PERIVENTRICULAR, lc.JUXTACORTICAL, lc.INFRATENTORIAL, lc.DEEP


def box(x, y, k):
    """Boolean mask of the voxel box x[0]..x[1], y[0]..y[1], k[0]..k[1] (inclusive)."""
    m = np.zeros(SHAPE, bool)
    m[x[0] : x[1] + 1, y[0] : y[1] + 1, k[0] : k[1] + 1] = True
    return m


def anatomy():
    """Brain box with a 4 mm cortex shell, WM inside, a central ventricle, a brainstem block below it."""
    brain = box((2, 77), (2, 77), (1, 30))
    wm = box((6, 73), (6, 73), (3, 28))  # 4 mm in-plane, 6 mm (2 slices) of cortex below and above
    vent = box((30, 50), (30, 50), (14, 18))
    stem = box((30, 50), (30, 50), (2, 7))  # brainstem, reaching the bottom of the brain
    return brain, wm & ~vent, vent, brain & ~wm & ~stem, stem


LESIONS = {  # name: (voxel box, expected class)
    "pv": (((51, 53), (38, 41), (15, 16)), PV),  # next to the ventricle in x
    "jc": (((6, 8), (38, 41), (15, 16)), JC),  # on the inner surface of the cortex
    "it": (((38, 41), (38, 41), (4, 5)), IT),  # inside the brainstem
    "deep": (((15, 18), (15, 18), (15, 16)), DWM),  # >= 9 mm from everything
}


def lesion_mask(*names):
    return np.logical_or.reduce([box(*LESIONS[n][0]) for n in names])


def classes_of(lesion, **kwargs):
    brain, wm, vent, cortex, stem = anatomy()
    comps, classes = lc.classify_lesions(lesion, vent, cortex, stem, ZOOMS, **kwargs)
    return comps, classes


def test_each_lesion_gets_its_class():
    lesion = lesion_mask("pv", "jc", "it", "deep")
    comps, classes = classes_of(lesion)
    assert len(classes) == 4
    for name, (b, expected) in LESIONS.items():
        ids = np.unique(comps[box(*b)])
        assert len(ids) == 1 and classes[ids[0] - 1] == expected, name
    image = lc.class_image(comps, classes)
    assert set(np.unique(image)) == {0, PV, JC, IT, DWM} and (image[~lesion] == 0).all()


def test_priority_when_several_classes_apply():
    bridge_pv_jc = box((40, 41), (6, 29), (16, 16))  # from the cortex (y <= 5) to the ventricle (y >= 30)
    bridge_it_pv = box((40, 41), (40, 41), (8, 13))  # from the brainstem top (k 7) to the ventricle (k 14)
    _, classes = classes_of(bridge_pv_jc)
    assert classes.tolist() == [PV]
    _, classes = classes_of(bridge_it_pv)
    assert classes.tolist() == [IT]
    _, classes = classes_of(bridge_it_pv, priority=(PV, IT, JC))  # LST-AI's order
    assert classes.tolist() == [PV]
    with pytest.raises(InputError, match="priority"):
        classes_of(bridge_it_pv, priority=(PV, PV))


def test_distances_are_in_mm_on_anisotropic_voxels():
    gap_x = box((52, 53), (38, 41), (15, 16))  # one empty voxel (1 mm) beside the ventricle: centres 2 mm apart
    gap_k = box((38, 41), (38, 41), (20, 20))  # one empty slice (3 mm) above it: centres 6 mm apart
    _, touching = classes_of(gap_x | gap_k)
    assert touching.tolist() == [DWM, DWM], "a gap means not touching"
    comps, within = classes_of(gap_x | gap_k, distance_mm=2.5)
    assert within[comps[gap_x].max() - 1] == PV and within[comps[gap_k].max() - 1] == DWM
    comps, within = classes_of(gap_x | gap_k, distance_mm=6.0)
    assert within.tolist() == [PV, PV]
    # a lesion on the slice above the ventricle touches it (26-neighbours) but is 3 mm away
    above = box((38, 41), (38, 41), (19, 19))
    assert classes_of(above)[1].tolist() == [PV]
    assert classes_of(above, distance_mm=2.5)[1].tolist() == [DWM]
    corner = box((51, 52), (51, 52), (19, 19))  # meets the ventricle's corner (50, 50, 18) at a vertex only
    assert classes_of(corner)[1].tolist() == [PV], "touching means any of the 26 neighbours, as LST-AI's 3x3x3 dilation"


def test_lesion_voxels_are_never_cortex_or_ventricle():
    brain, wm, vent, cortex, stem = anatomy()
    lesion = lesion_mask("deep")
    # a lesion mis-segmented as cortex (GM) must not make itself juxtacortical, nor as CSF periventricular
    _, classes = lc.classify_lesions(lesion, vent | lesion, cortex | lesion, stem, ZOOMS)
    assert classes.tolist() == [DWM]


def image_phantom(affine):
    """Tissue, refined-region, brain and lesion images: regions 3 (frontal WM), 13 above the brainstem, 35 below."""
    brain, wm, vent, cortex, stem = anatomy()
    tissue = np.where(vent, 1, np.where(wm, 3, np.where(brain, 2, 0))).astype(np.int16)
    tissue[stem] = 3
    regions = np.where(tissue == 3, 3, 0).astype(np.int16)
    regions[stem] = 35
    regions[box((6, 73), (6, 73), (8, 9)) & (tissue == 3)] = 13  # tentorial landmark just above the brainstem
    thalamus = box((20, 26), (38, 45), (20, 22))
    regions[thalamus] = 35  # supratentorial part of label 35
    lesion = lesion_mask("pv", "jc", "it", "deep") | box((22, 23), (40, 41), (21, 21))
    return (*(nib.Nifti1Image(a.astype(np.int16), affine) for a in (lesion, tissue, regions, brain)), stem)


def _rotated_lps():
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1.0]])  # LPS, rotated 20 degrees in plane
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(ZOOMS)
    aff[:3, 3] = [40.0, 60.0, -50.0]
    return aff


def _flipped_z():
    return np.array([[1.0, 0, 0, -40], [0, 1, 0, -40], [0, 0, -3, 90], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [_rotated_lps(), _flipped_z()], ids=["oblique-LPS", "z-flipped"])
def test_classify_subject_derives_ventricles_cortex_and_brainstem(affine):
    lesion, tissue, regions, brain, stem = image_phantom(affine)
    if affine[2, 2] < 0:  # k runs downwards on this grid: flip the anatomy along k so that it stays upright
        lesion, tissue, regions, brain = (
            nib.Nifti1Image(np.asanyarray(img.dataobj)[..., ::-1].copy(), affine)
            for img in (lesion, tissue, regions, brain)
        )
        stem = stem[..., ::-1]
    out = lc.classify_subject(lesion, tissue, regions, brain, subject="p1")
    table, image = out["table"], np.asanyarray(out["classes"].dataobj)
    assert list(table.columns) == lc.COLUMNS and len(table) == 5 and (table["subject"] == "p1").all()
    les = np.asanyarray(lesion.dataobj) > 0
    assert set(np.unique(image[les])) == {PV, JC, IT, DWM} and (image[~les] == 0).all()
    assert np.allclose(out["classes"].affine, affine)
    # the lesion in the supratentorial part of label 35 lies above the tentorial level: deep, not infratentorial
    assert sorted(table["class"]) == sorted(
        ["periventricular", "juxtacortical", "infratentorial", "deep white matter", "deep white matter"]
    )
    it_row = table[table["class_id"] == IT].iloc[0]
    assert it_row["region"] == 35 and it_row["n_voxels"] == 4 * 4 * 2
    assert it_row["volume_ml"] == pytest.approx(32 * 3.0 / 1000)
    centre = np.argwhere(les & stem).mean(0)  # voxel centroid of the brainstem lesion, in world mm
    assert np.allclose(it_row[["x_mm", "y_mm", "z_mm"]].astype(float), nib.affines.apply_affine(affine, centre))
    # an explicit infratentorial mask is used as given (here: none, so the brainstem lesion becomes deep WM)
    none = nib.Nifti1Image(np.zeros(les.shape, np.uint8), affine)
    table2 = lc.classify_subject(lesion, tissue, regions, brain, infratentorial=none, subject="p1")["table"]
    assert IT not in table2["class_id"].tolist()
    # loads per class with the regional-loads machinery
    loads = regional_loads(les, image, ZOOMS, lc.location_class_table())
    assert loads.set_index("short").loc[["PV", "JC", "IT", "DWM"], "n_lesions"].tolist() == [1, 1, 1, 2]
    assert loads["lesion_ml"].sum() == pytest.approx(table["volume_ml"].sum())


def test_empty_lesion_mask_gives_an_empty_table():
    lesion, tissue, regions, brain, _ = image_phantom(_rotated_lps())
    empty = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), lesion.affine)
    out = lc.classify_subject(empty, tissue, regions, brain, subject="p1")
    assert out["table"].empty and list(out["table"].columns) == lc.COLUMNS
    assert not np.asanyarray(out["classes"].dataobj).any()


def test_bad_inputs_are_input_errors():
    lesion, tissue, regions, brain, _ = image_phantom(_rotated_lps())
    shifted = nib.Nifti1Image(np.asanyarray(regions.dataobj), regions.affine @ np.diag([1, 1, 2, 1]))
    with pytest.raises(InputError, match="subject p1.*region map.*not on the grid"):
        lc.classify_subject(lesion, tissue, shifted, brain, subject="p1")
    two = nib.Nifti1Image(np.asanyarray(lesion.dataobj) * 2, lesion.affine)
    with pytest.raises(InputError, match="lesion mask must only hold labels"):
        lc.classify_subject(two, tissue, regions, brain, subject="p1")
    assert len(lc.classify_subject(two, tissue, regions, brain, ignore_label=2)["table"]) == 0
    no_csf = nib.Nifti1Image(
        np.where(np.asanyarray(tissue.dataobj) == 1, 3, np.asanyarray(tissue.dataobj)), lesion.affine
    )
    with pytest.raises(InputError, match="subject p1.*lateral ventricles"):
        lc.classify_subject(lesion, no_csf, regions, brain, subject="p1")
    with pytest.raises(InputError, match="tentorial level"):
        no_mark = nib.Nifti1Image(
            np.where(np.asanyarray(regions.dataobj) == 13, 3, np.asanyarray(regions.dataobj)), lesion.affine
        )
        lc.classify_subject(lesion, tissue, no_mark, brain, subject="p1")


def test_location_class_table_is_a_region_table():
    table = lc.location_class_table()
    assert table["id"].tolist() == [0, 1, 2, 3, 4] and {"name", "short", "r", "g", "b"} <= set(table.columns)


def test_fallback_infratentorial_matches_the_atlas_on_eve(eve_dir):
    """On Eve, the fallback from WM-restricted refined labels agrees with the Type-II brainstem + cerebellum."""
    from wmloc_utils import atlas

    eve = atlas.load_eve(eve_dir)
    sub = (slice(None, None, 2),) * 3  # 2 mm for speed
    aff = eve["tissue"].affine @ np.diag([2, 2, 2, 1])
    wm = np.asanyarray(eve["tissue"].dataobj)[sub] == 3
    brain = np.asanyarray(eve["mask"].dataobj)[sub] > 0
    ids = np.where(wm, np.asanyarray(atlas.refined_atlas(eve_dir).dataobj)[sub], 0)
    truth = lc.atlas_infratentorial(eve["type2"])
    truth = np.asanyarray(truth.dataobj)[sub] > 0
    found = lc.infratentorial_from_regions(ids, brain, aff, (2.0, 2.0, 2.0))
    in_wm = wm & np.isin(ids, atlas.NON_WM)
    recall = (found & truth & in_wm).sum() / (truth & in_wm).sum()
    precision = (found & truth & in_wm).sum() / (found & in_wm).sum()
    assert recall > 0.95 and precision > 0.95, (recall, precision)
    assert (found & truth).sum() / truth.sum() > 0.9, "the cerebellar cortex follows its WM"


def test_a_lesion_behind_the_ventricle_wall_is_periventricular():
    """A partial-volume lining (here one GM voxel) between the CSF and the lesion is no WM: still periventricular."""
    lesion, tissue, regions, brain, _ = image_phantom(_rotated_lps())
    t = np.asanyarray(tissue.dataobj).copy()
    t[51, 30:51, 14:19] = 2  # GM lining on the ventricle's +x side, under the periventricular lesion (x 51..53)
    les = np.asanyarray(lesion.dataobj).copy()
    les[51] = 0  # the lesion now starts behind the lining
    lesion, tissue = nib.Nifti1Image(les, lesion.affine), nib.Nifti1Image(t, lesion.affine)
    pv_lesion = box(*LESIONS["pv"][0])
    classes_at = lambda out: set(np.unique(np.asanyarray(out["classes"].dataobj)[pv_lesion & (les > 0)]))  # noqa: E731
    assert classes_at(lc.classify_subject(lesion, tissue, regions, brain)) == {PV}
    # without the wall the lining is grey matter next to gyral WM, i.e. "cortex": the lesion turns juxtacortical
    assert classes_at(lc.classify_subject(lesion, tissue, regions, brain, wall_mm=0)) == {JC}
    # given ventricles are used as they are (here: far from the lesion, so the lining is not their wall)
    far = nib.Nifti1Image(box((30, 35), (30, 35), (14, 18)).astype(np.uint8), lesion.affine)
    assert classes_at(lc.classify_subject(lesion, tissue, regions, brain, ventricles=far)) == {JC}
