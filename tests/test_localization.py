"""Regional lesion loads on hand-built lesion and region maps (anisotropic voxels, bad inputs, cohort tables)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmloc_utils import figures
from wmloc_utils import localization as loc
from wmloc_utils.errors import InputError

ZOOMS = (1.0, 1.0, 3.0)  # 3 uL voxels
VOX_ML = 0.003
TABLE = pd.DataFrame(
    {
        "id": [0, 1, 2, 5],
        "name": ["Background", "left", "right", "empty"],
        "short": ["BG", "L", "R", "E"],
        "r": [0, 200, 0, 0],
        "g": [0, 0, 200, 0],
        "b": [0, 0, 0, 200],
    }
)


def maps() -> tuple[np.ndarray, np.ndarray]:
    """Regions: x<10 -> 1, 10<=x<20 -> 2, x>=20 -> 0 (outside). Three lesions with known majorities."""
    regions = np.zeros((24, 10, 6), np.int16)
    regions[:10] = 1
    regions[10:20] = 2
    lesion = np.zeros(regions.shape, np.uint8)
    lesion[2:5, 2:4, 1:3] = 1  # 12 voxels, all in region 1
    lesion[8:13, 6, 2] = 1  # 5 voxels: 2 in region 1, 3 in region 2 -> counted in region 2
    lesion[18:23, 1, 4] = 1  # 5 voxels: 2 in region 2, 3 outside -> counted as unlabelled
    lesion[9, 0, 0] = lesion[10, 1, 1] = 1  # corner-touching pair: one lesion, 1 voxel each side -> tie -> region 1
    return lesion, regions


def test_regional_loads_hand_computed():
    lesion, regions = maps()
    out = loc.regional_loads(lesion, regions, ZOOMS, TABLE).set_index("region")
    assert list(out.index) == [0, 1, 2, 5]
    assert list(out.columns) == loc.COLUMNS[1:]
    assert out.loc[0, "name"] == "unlabelled"
    np.testing.assert_allclose(out["lesion_ml"], np.array([3, 12 + 2 + 1, 3 + 2 + 1, 0]) * VOX_ML)
    np.testing.assert_allclose(out.loc[[1, 2, 5], "region_ml"], np.array([600, 600, 0]) * VOX_ML)
    assert math.isnan(out.loc[0, "region_ml"]) and math.isnan(out.loc[5, "lesion_fraction"])
    assert out.loc[1, "lesion_fraction"] == pytest.approx(15 / 600)
    np.testing.assert_allclose(out["load_share"], np.array([3, 15, 6, 0]) / 24)
    assert out["n_lesions"].tolist() == [1, 2, 1, 0]


def test_lesion_values_must_be_binary_unless_label_is_ignored():
    lesion, regions = maps()
    lesion[0, 0, 0] = 2
    with pytest.raises(InputError, match=r"binary \{0, 1\}, found values \[2\].*ignore_label=2"):
        loc.regional_loads(lesion, regions, ZOOMS, TABLE)
    out = loc.regional_loads(lesion, regions, ZOOMS, TABLE, ignore_label=2)
    assert out["lesion_ml"].sum() == pytest.approx(24 * VOX_ML)


def test_unknown_region_ids_are_rejected():
    lesion, regions = maps()
    regions[0, 0, 0] = 7
    with pytest.raises(InputError, match=r"region ids \[7\] are not in the region table"):
        loc.regional_loads(lesion, regions, ZOOMS, TABLE)


def test_any_table_periventricular_deep():
    lesion, regions = maps()
    pv_deep = pd.DataFrame({"id": [1, 2], "name": ["periventricular", "deep"]})
    out = loc.regional_loads(lesion, regions, ZOOMS, pv_deep)
    assert out["name"].tolist() == ["unlabelled", "periventricular", "deep"]
    assert out["short"].tolist() == out["name"].tolist()  # no short names in this table
    assert out["n_lesions"].sum() == 4


def _save(tmp_path, name, data, zooms=ZOOMS):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), path)
    return path


def test_image_level_grid_check_names_files(tmp_path):
    lesion, regions = maps()
    les = _save(tmp_path, "s1_lesion.nii.gz", lesion)
    reg = _save(tmp_path, "s1_regions.nii.gz", regions)
    out = loc.regional_loads_img(les, reg, TABLE, subject="s1")
    assert out["lesion_ml"].sum() == pytest.approx(24 * VOX_ML)
    bad = _save(tmp_path, "s1_regions_1mm.nii.gz", regions, zooms=(1.0, 1.0, 1.0))
    with pytest.raises(
        InputError, match=r"subject s1: .*s1_regions_1mm.nii.gz is not on the grid of .*s1_lesion.nii.gz"
    ):
        loc.regional_loads_img(les, bad, TABLE, subject="s1")


def test_cohort_wide_and_normalisation(tmp_path):
    lesion, regions = maps()
    recs = []
    for i, scale in enumerate([1, 0]):
        recs.append(
            {
                "subject": f"s{i}",
                "lesion": _save(tmp_path, f"l{i}.nii.gz", lesion * scale),
                "regions": _save(tmp_path, f"r{i}.nii.gz", regions),
            }
        )
    tidy = loc.cohort_loads(pd.DataFrame(recs), TABLE, progress=False)
    assert list(tidy.columns) == ["subject", *loc.COLUMNS]
    assert len(tidy) == 2 * 4
    wide = loc.wide_matrix(tidy)
    assert list(wide.columns) == ["unlabelled", "L", "R", "E"]
    assert list(loc.wide_matrix(tidy, names="name").columns) == ["unlabelled", "left", "right", "empty"]
    assert wide.loc["s0", "L"] == pytest.approx(15 * VOX_ML) and wide.loc["s1"].sum() == 0
    norm = loc.wide_matrix(
        tidy,
        normalise="icv",
        volumes=pd.DataFrame({"subject": ["s0", "s1"], "icv_ml": [1500.0, 1000.0]}),
        unlabelled=False,
        names="name",
    )
    assert list(norm.columns) == ["left", "right", "empty"]
    assert norm.loc["s0", "left"] == pytest.approx(15 * VOX_ML / 1500 * 100)
    with pytest.raises(InputError, match=r"no wm volume for subjects \['s1'\]"):
        loc.wide_matrix(tidy, normalise="wm", volumes={"s0": 400.0})


def test_subject_report_and_figures(tmp_path):
    lesion, regions = maps()
    tidy = loc.regional_loads(lesion, regions, ZOOMS, TABLE).assign(subject="s0")
    rep = loc.subject_report(tidy, "s0", top=2)
    assert rep.total_ml == pytest.approx(24 * VOX_ML) and rep.n_lesions == 4
    assert rep.unlabelled_ml == pytest.approx(3 * VOX_ML)
    assert rep.top["name"].tolist() == ["left", "right"]
    assert "subject s0: 0.07 mL in 4 lesions" in str(rep)
    bars = figures.bar_figure(tidy, "s0", table=TABLE)
    assert list(bars.data[0].y) == pytest.approx(list(tidy["lesion_ml"]))
    assert bars.data[0].marker.color[1] == "rgb(200,0,0)"
    heat = figures.cohort_heatmap(loc.wide_matrix(tidy))
    assert heat.data[0].z.shape == (1, 4)
    reg_img = nib.Nifti1Image(regions, np.diag([*ZOOMS, 1.0]))
    painted = loc.load_image(reg_img, tidy.set_index("region")["lesion_ml"])
    data = painted.get_fdata()
    assert (
        data[0, 0, 0] == pytest.approx(15 * VOX_ML)
        and data[15, 0, 0] == pytest.approx(6 * VOX_ML)
        and data[22, 0, 0] == 0
    )
    display = figures.brain_figure(reg_img, tidy, display_mode="z", cut_coords=2)
    display.close()


def test_pairings_and_agreement(tmp_path):
    lesion, regions = maps()
    shifted = np.roll(regions, 2, axis=0)  # predicted regions: moved by 2 voxels
    pred = lesion.copy()
    pred[2:5, 2:4, 1:3] = 0  # the predicted mask misses the 12-voxel lesion of region 1
    recs = pd.DataFrame(
        [
            {
                "subject": "s0",
                "lesion": _save(tmp_path, "l.nii.gz", lesion),
                "regions": _save(tmp_path, "r.nii.gz", regions),
                "lesion_pred": _save(tmp_path, "lp.nii.gz", pred),
                "regions_pred": _save(tmp_path, "rp.nii.gz", shifted),
            }
        ]
    )
    tidy = loc.cohort_pairings(recs, TABLE, progress=False)
    assert sorted(tidy["pairing"].unique()) == ["lesion_pred", "predicted", "reference"]
    assert tidy.groupby("pairing")["lesion_ml"].sum()["lesion_pred"] == pytest.approx(12 * VOX_ML)
    agree = loc.load_agreement(tidy, "lesion_pred")
    assert agree.loc["s0", "abs_error"] == pytest.approx(12 * VOX_ML)
    assert agree.loc["s0", "rel_error"] == pytest.approx(12 / 24)
    moved = loc.load_agreement(tidy, "predicted", reference="lesion_pred")
    # regions moved by 2 voxels: region 1 gets 6 lesion voxels (was 3), region 2 5 (was 6), unlabelled 1 (was 3)
    assert moved.loc["s0", "abs_error"] == pytest.approx((3 + 1 + 2) * VOX_ML)


def test_sparse_ids_of_a_bullseye_table():
    from wmloc_utils import wmdepth

    table = wmdepth.bullseye_table(4)
    ids = table.loc[table["id"] > 0, "id"].to_numpy()
    regions = np.zeros((8, 8, 4), np.int16)
    regions[:4], regions[4:] = ids[0], ids[-1]  # e.g. lobe 1 shell 1 and the last lobe's outer shell
    lesion = np.zeros(regions.shape, np.uint8)
    lesion[1:3, 1:3, 1] = 1
    lesion[6, 6, 2] = 1
    out = loc.regional_loads(lesion, regions, (2.0, 2.0, 2.0), table).set_index("region")
    assert len(out) == len(ids) + 1
    assert out.loc[ids[0], "lesion_ml"] == pytest.approx(4 * 0.008) and out.loc[ids[-1], "n_lesions"] == 1
    assert out.loc[ids[0], "region_ml"] == pytest.approx(128 * 0.008)


def test_every_lesion_voxel_inside_the_brain_gets_the_nearest_region():
    lesion, regions = maps()  # 3 lesion voxels at x = 20..22 lie outside every region
    brain = np.ones(regions.shape, bool)
    brain[22:] = False  # ... and one of them outside the brain
    out = loc.regional_loads(lesion, regions, ZOOMS, TABLE, fill_from=[1, 2], brain=brain).set_index("region")
    np.testing.assert_allclose(out["lesion_ml"], np.array([1, 15, 8, 0]) * VOX_ML)  # x=20, 21 -> region 2 (nearest)
    np.testing.assert_allclose(out["assigned_ml"], np.array([0, 0, 2, 0]) * VOX_ML)
    assert out.loc[1:, "lesion_fraction"].max() <= 1
    qc = loc.lesion_qc(out.reset_index().assign(subject="s0")).set_index("subject")
    assert qc.loc["s0", "unassigned_ml"] == pytest.approx(VOX_ML)
    assert qc.loc["s0", "unassigned_fraction"] == pytest.approx(1 / 24)
    everything = loc.regional_loads(lesion, regions, ZOOMS, TABLE, fill_from=[1, 2])  # no brain mask: all placed
    assert everything.loc[everything["region"] == 0, "lesion_ml"].item() == 0


def test_nearest_region_is_measured_in_mm_on_anisotropic_voxels():
    regions = np.zeros((9, 9, 9), np.int16)
    regions[0] = 1  # 4 voxels of 1 mm away along x
    regions[:, :, 8] = 2  # 2 voxels of 3 mm = 6 mm away along z
    lesion = np.zeros(regions.shape, np.uint8)
    lesion[4, 4, 6] = 1
    filled = loc.assign_lesion_voxels(lesion, regions, (1.0, 1.0, 3.0), fill_from=[1, 2])
    assert filled[4, 4, 6] == 1  # in voxels region 2 is nearer (2 vs 4), in mm region 1 (4 vs 6 mm)
    assert loc.assign_lesion_voxels(lesion, regions, (1.0, 1.0, 3.0), [1, 2], max_distance_mm=3)[4, 4, 6] == 0


def test_region_map_without_regions_is_an_error_not_an_unlabelled_load():
    lesion, regions = maps()
    with pytest.raises(InputError, match=r"holds none of the regions \[5\].*3 lesion voxels"):
        loc.regional_loads(lesion, regions, ZOOMS, TABLE, fill_from=[5])


def test_a_region_map_without_any_region_is_an_error():
    lesion, regions = maps()
    with pytest.raises(InputError, match="holds no region at all"):
        loc.regional_loads(lesion, np.zeros_like(regions), ZOOMS, TABLE)
    empty = loc.regional_loads(np.zeros_like(lesion), np.zeros_like(regions), ZOOMS, TABLE)  # no lesion: nothing lost
    assert empty["lesion_ml"].sum() == 0
