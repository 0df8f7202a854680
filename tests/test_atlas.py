"""Tests of the refined JHU Eve atlas: LUT parsing, the merge table, the refinement and its outputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmloc_utils import atlas, figures
from wmloc_utils.errors import InputError


def test_lut_has_130_labels_background_and_hemispheres(eve_dir):
    lut = atlas.read_lut(eve_dir / atlas.LUT_FILE)
    assert lut["id"].tolist() == list(range(131))
    assert lut.loc[lut["id"] == 53, "name"].item() == "Body_of_corpus_callosum_left"
    assert lut["hemisphere"].value_counts().to_dict() == {"L": 65, "R": 65, "-": 1}
    # ids without a _left suffix (e.g. 15 INFERIOR_OCCIPITAL_GYRUS) are left; their twins right
    assert lut.set_index("id").loc[[15, 80], "hemisphere"].tolist() == ["L", "R"]
    assert lut.set_index("id").loc[[3, 40, 53, 68], "is_wm"].all()
    assert not lut.set_index("id").loc[[0, 26, 28, 61, 93, 126], "is_wm"].any()
    assert lut["is_wm"].sum() == 130 - 36  # 18 non-WM labels per hemisphere go to 35/36
    assert tuple(lut.loc[lut["id"] == 3, ["r", "g", "b"]].iloc[0]) == (0, 255, 255)


def test_lut_errors_name_the_file(tmp_path):
    bad = tmp_path / "lut.txt"
    bad.write_text("# header\n0 Background 0 0 0 0\n1 broken_line 1 2\n")
    with pytest.raises(InputError, match="lut.txt: line 3"):
        atlas.read_lut(bad)


def test_regions_table_invariants():
    table = atlas.regions_table()
    assert table["id"].tolist() == list(range(37))
    ids = [int(t) for cell in table["type2_ids"] for t in cell.split(",")]
    assert sorted(ids) == list(range(131))
    assert table.loc[table["id"].between(1, 17), "hemisphere"].eq("L").all()
    assert table.loc[table["id"].between(18, 34), "hemisphere"].eq("R").all()
    # right twins share the short name and lobe of their left region, in the same order
    left, right = table.iloc[1:18], table.iloc[18:35]
    assert [s[:-2] for s in left["short"]] == [s[:-2] for s in right["short"]]
    assert left["lobe"].tolist() == right["lobe"].tolist()
    assert set(table["lobe"]) <= set(atlas.LOBES) | {"-"}
    assert not table[["r", "g", "b"]].duplicated().any()
    assert table.loc[table["id"] == 25, "type2_ids"].item() == "77,78,82,106"


def test_mirror_labels_swap_hemispheres():
    mirror = atlas.mirror_labels()
    table = atlas.regions_table().set_index("id")
    assert mirror[0] == 0 and mirror[1] == 18 and mirror[18] == 1 and mirror[35] == 36
    np.testing.assert_array_equal(mirror[mirror], np.arange(37))  # an involution
    for i in range(1, 37):
        assert table.loc[i, "hemisphere"] != table.loc[mirror[i], "hemisphere"]
        assert table.loc[i, "short"][:-2] == table.loc[mirror[i], "short"][:-2]


def test_refine_labels_is_a_lookup_and_rejects_unknown_ids():
    arr = np.array([[[0, 1, 8, 23], [66, 73, 88, 130], [26, 91, 53, 118]]], dtype=np.int16)
    out = atlas.refine_labels(arr)
    assert out.tolist() == [[[0, 1, 1, 1], [18, 18, 18, 36], [35, 36, 17, 34]]]
    with pytest.raises(InputError, match="131"):
        atlas.refine_labels(np.array([[[0, 131]]]))
    with pytest.raises(InputError, match="-1"):
        atlas.refine_labels(np.array([[[-1, 2]]]))
    with pytest.raises(InputError, match="integers"):
        atlas.refine_labels(np.array([[[0.5, 2]]]))


def test_refine_image_keeps_grid():
    affine = np.diag([-1.0, 1.0, 3.0, 1.0])
    img = nib.Nifti1Image(np.full((2, 3, 4), 105, np.int16), affine)
    out = atlas.refine_labels(img)
    assert isinstance(out, nib.Nifti1Image) and out.get_data_dtype() == np.int16
    assert np.allclose(out.affine, affine) and np.asarray(out.dataobj).max() == 19


def test_refinement_matches_authors_atlas(eve_dir, reference_dir):
    refined = atlas.refined_atlas(eve_dir)
    reference = nib.load(reference_dir / "36_labels_merged.nii.gz")
    assert refined.shape == (181, 217, 181) and refined.get_data_dtype() == np.int16
    assert np.allclose(refined.affine, reference.affine)
    assert nib.aff2axcodes(refined.affine) == ("L", "A", "S")
    assert np.array_equal(np.asarray(refined.dataobj), np.asarray(reference.dataobj))


def test_refined_names_follow_the_authors(reference_dir):
    names = {}
    for line in (reference_dir / "refined_atlas_labels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            i, name = line.split(" ", 1)
            names[int(i)] = name
    table = atlas.regions_table().set_index("id")
    assert all(table.loc[i, "name"] == names[i] for i in range(1, 35))


def test_write_refined_atlas_round_trip(eve_dir, tmp_path):
    paths = atlas.write_refined_atlas(tmp_path / "out", eve_dir)
    img = nib.load(paths["atlas"])
    lut = pd.read_csv(paths["lut"], sep="\t")
    assert np.array_equal(np.asarray(img.dataobj), np.asarray(atlas.refined_atlas(eve_dir).dataobj))
    assert lut["id"].tolist() == list(range(37)) and {"name", "r", "g", "b"} <= set(lut.columns)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_lobe_map_codes_and_absorption():
    regions = np.zeros((12, 4, 4), np.int16)
    regions[0:4] = 3  # SFG left: frontal
    regions[4:8] = 12  # superior corona radiata left: deep
    regions[8:12] = 18  # SPL right: parietal
    codes = atlas.lobe_table().set_index("name")["code"]
    plain = atlas.lobe_map(regions)
    assert plain[0, 0, 0] == codes["frontal L"] and plain[5, 0, 0] == codes["deep L"]
    assert plain[10, 0, 0] == codes["parietal R"]
    absorbed = atlas.lobe_map(regions, absorb_deep=True, zooms=(1.0, 1.0, 1.0))
    assert (absorbed[4:6] == codes["frontal L"]).all() and (absorbed[6:8] == codes["parietal R"]).all()


def test_plotly_viewer_has_slider_and_region_names():
    data = np.zeros((10, 12, 6), np.int16)
    data[2:6, 3:8, :] = 4
    img = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]))
    fig = figures.plot_labels_plotly(img, atlas.regions_table(), n_slices=3)
    assert len(fig.data) == 3 and len(fig.layout.sliders[0].steps) == 3
    # names on the colour bar, 8-bit labels (no per-voxel hover text: a megabyte a figure in a page)
    bar = fig.data[0].colorbar
    assert dict(zip(bar.tickvals, bar.ticktext))[4] == "MFG_L" and np.asarray(fig.data[0].z).dtype == np.uint8
    assert fig.data[0].text is None
    assert sum(bool(t.visible) for t in fig.data) == 1
