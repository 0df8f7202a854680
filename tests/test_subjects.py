"""Subject discovery in the three layouts, and every bad-input case, on tiny images in temp folders."""

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmloc_utils import subjects
from wmloc_utils.errors import InputError
from wmloc_utils.images import load_nifti, save_nifti

AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def img(data, affine=AFF):
    return nib.Nifti1Image(np.asarray(data), affine)


def write_subject(folder, lesion=True, shape=(12, 14, 10), lesion_data=None, flair_affine=AFF):
    rng = np.random.default_rng(0)
    save_nifti(img(rng.random(shape).astype(np.float32), flair_affine), folder / "pre" / "FLAIR.nii.gz")
    save_nifti(img(rng.random(shape).astype(np.float32), flair_affine), folder / "pre" / "T1.nii.gz")
    if lesion:
        data = np.zeros(shape, np.uint8) if lesion_data is None else lesion_data
        if lesion_data is None:
            data[4:6, 4:6, 4:6] = 1
            data[8, 8, 5] = 2
        save_nifti(img(data, flair_affine), folder / "wmh.nii.gz")


def test_challenge_layout_with_sites(tmp_path):
    write_subject(tmp_path / "Utrecht" / "0")
    write_subject(tmp_path / "Singapore" / "50", lesion=False)
    found = subjects.discover(tmp_path)
    assert [(s.site, s.id) for s in found] == [("Singapore", "50"), ("Utrecht", "0")]
    assert found[0].lesion is None and found[1].lesion.name == "wmh.nii.gz"
    table = subjects.validate(found, progress=False)
    row = table.set_index("subject").loc["0"]
    assert row.lesion_ml == pytest.approx(8 * 0.008) and row.other_pathology_ml == pytest.approx(0.008)
    assert row.voxel_mm == "2x2x2" and row.orientation == "RAS"


def test_challenge_layout_without_site_level(tmp_path):
    write_subject(tmp_path / "7")
    (found,) = subjects.discover(tmp_path)
    assert found.id == "7" and found.site == ""


def test_bids_layout_with_sessions_and_derivatives(tmp_path):
    rng = np.random.default_rng(1)
    for sub, ses in (("sub-01", None), ("sub-02", "ses-1")):
        anat = tmp_path / sub / (ses or "") / "anat"
        stem = "_".join(p for p in (sub, ses) if p)
        for suffix in ("T1w", "FLAIR"):
            save_nifti(img(rng.random((8, 8, 8)).astype(np.float32)), anat / f"{stem}_{suffix}.nii.gz")
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    save_nifti(
        img(mask), tmp_path / "derivatives" / "manual" / "sub-01" / "anat" / "sub-01_FLAIR_label-WMH_mask.nii.gz"
    )
    found = {s.id: s for s in subjects.discover(tmp_path)}
    assert set(found) == {"sub-01", "sub-02_ses-1"}
    assert found["sub-01"].lesion is not None and found["sub-02_ses-1"].lesion is None
    assert found["sub-01"].flair.name == "sub-01_FLAIR.nii.gz"
    assert subjects.validate(list(found.values()), progress=False)["lesion_ml"].max() == pytest.approx(8 * 0.008)


def test_csv_manifest_with_relative_paths(tmp_path):
    write_subject(tmp_path / "data" / "a")
    pd.DataFrame(
        {
            "subject": ["a"],
            "t1": ["data/a/pre/T1.nii.gz"],
            "flair": ["data/a/pre/FLAIR.nii.gz"],
            "lesion": ["data/a/wmh.nii.gz"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    (found,) = subjects.discover(tmp_path / "m.csv")
    assert found.flair == (tmp_path / "data" / "a" / "pre" / "FLAIR.nii.gz").resolve()
    assert found.lesion_img is not None


def test_manifest_missing_column(tmp_path):
    pd.DataFrame({"subject": ["a"], "t1": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(InputError, match=r"m.csv.*lacks column.*flair"):
        subjects.discover(tmp_path / "m.csv")


def test_empty_directory(tmp_path):
    with pytest.raises(InputError, match="no subjects found"):
        subjects.discover(tmp_path)


def test_missing_modality_names_subject(tmp_path):
    write_subject(tmp_path / "s1")
    (tmp_path / "s1" / "pre" / "FLAIR.nii.gz").unlink()
    with pytest.raises(InputError, match="subject s1: FLAIR image not found"):
        subjects.discover(tmp_path)


def test_unreadable_nifti_names_file(tmp_path):
    write_subject(tmp_path / "s1")
    bad = tmp_path / "s1" / "pre" / "T1.nii.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"this is not a nifti file")
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"subject s1: .*T1.nii.gz: T1 is not a readable NIfTI"):
        s.validate()


def test_4d_image_is_refused(tmp_path):
    write_subject(tmp_path / "s1")
    save_nifti(img(np.zeros((12, 14, 10, 3), np.float32)), tmp_path / "s1" / "pre" / "FLAIR.nii.gz")
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"FLAIR must be a 3D volume, got shape \(12, 14, 10, 3\)"):
        s.validate()


def test_trailing_singleton_dimension_is_accepted(tmp_path):
    save_nifti(img(np.zeros((4, 4, 4, 1), np.float32)), tmp_path / "x.nii.gz")
    assert load_nifti(tmp_path / "x.nii.gz").shape == (4, 4, 4)


def test_lesion_on_another_grid_is_refused(tmp_path):
    write_subject(tmp_path / "s1")
    save_nifti(img(np.zeros((12, 14, 11), np.uint8)), tmp_path / "s1" / "wmh.nii.gz")
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"subject s1: lesion mask .* is not on the grid of FLAIR"):
        s.validate()


def test_lesion_with_shifted_affine_is_refused(tmp_path):
    write_subject(tmp_path / "s1")
    shifted = AFF.copy()
    shifted[0, 3] = 5.0
    save_nifti(img(np.zeros((12, 14, 10), np.uint8), shifted), tmp_path / "s1" / "wmh.nii.gz")
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match="max affine difference 5"):
        s.validate()


def test_lesion_labels_outside_challenge_set(tmp_path):
    data = np.zeros((12, 14, 10), np.uint8)
    data[1, 1, 1] = 3
    write_subject(tmp_path / "s1", lesion_data=data)
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"wmh.nii.gz: lesion mask must only hold labels \[0, 1, 2\], found \[3\]"):
        s.validate()


def test_probabilistic_lesion_mask_is_refused(tmp_path):
    data = np.zeros((12, 14, 10), np.float32)
    data[2, 2, 2] = 0.4
    write_subject(tmp_path / "s1", lesion_data=data)
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match="non-integer values"):
        s.validate()


def test_t1_far_from_flair_is_refused(tmp_path):
    write_subject(tmp_path / "s1")
    far = AFF.copy()
    far[:3, 3] = 300.0
    t1 = np.random.default_rng(2).random((12, 14, 10)).astype(np.float32)  # a usable image, in the wrong place
    save_nifti(img(t1, far), tmp_path / "s1" / "pre" / "T1.nii.gz")
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match="centres are .* mm apart"):
        s.validate()
    with pytest.raises(InputError, match="T1 .* is not on the grid of FLAIR"):
        s.validate(t1_other_grid="error")


def test_t1_on_another_grid_is_registered_rigidly_to_flair(tmp_path):
    """A shifted T1 comes back on the FLAIR grid, aligned (ANTsPy rigid registration)."""
    yy, xx, zz = np.meshgrid(*[np.arange(32)] * 3, indexing="ij")
    blob = np.exp(-(((xx - 16) / 6.0) ** 2 + ((yy - 14) / 8.0) ** 2 + ((zz - 17) / 5.0) ** 2)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_nifti(img(blob * 100, aff), tmp_path / "s" / "pre" / "FLAIR.nii.gz")
    t1_aff = aff.copy()
    t1_aff[:3, 3] = [6.0, -4.0, 2.0]  # same anatomy, stored on a shifted grid, values moved accordingly
    shifted = np.roll(blob, (-3, 2, -1), axis=(0, 1, 2))
    save_nifti(img(shifted * 100, t1_aff), tmp_path / "s" / "pre" / "T1.nii.gz")
    (s,) = subjects.discover(tmp_path)
    assert not s.validate()["t1_on_flair_grid"]
    out = s.t1_on_flair(tmp_path / "work")
    assert out.shape == s.flair_img.shape and np.allclose(out.affine, s.flair_img.affine)
    corr = np.corrcoef(np.asarray(out.dataobj).ravel(), blob.ravel())[0, 1]
    assert corr > 0.98
    assert list((tmp_path / "work").glob("s_t1_to_flair_*")), "ANTs transforms belong in the work dir"


def test_write_manifest_and_participants(tmp_path):
    write_subject(tmp_path / "data" / "site" / "1")
    (tmp_path / "data" / "participants.tsv").write_text("participant_id\tage\tgroup\n1\t70\tdeep\n")
    found = subjects.discover(tmp_path / "data")
    table = subjects.validate(found, progress=False)
    parts = subjects.read_participants(tmp_path / "data", table["subject"].tolist())
    paths = subjects.write_manifest(table, parts, tmp_path / "out")
    manifest = pd.read_csv(paths["subjects"], dtype={"subject": str})
    assert manifest.loc[0, "group"] == "deep" and manifest.columns[:6].tolist() == [
        "subject",
        "site",
        "group",
        "t1",
        "flair",
        "lesion",
    ]


# ---------------------------------------------------------------- BIDS entities
def write_bids(root, names, shape=(8, 8, 8)):
    """Write BIDS files: ``names`` are paths relative to ``root``; masks (in derivatives) get a small lesion."""
    rng = np.random.default_rng(3)
    for name in names:
        if name.startswith("derivatives"):
            data = np.zeros(shape, np.uint8)
            data[2:4, 2:4, 2:4] = 1
        else:
            data = rng.random(shape).astype(np.float32)
        save_nifti(img(data), root / name)


def test_bids_brain_mask_is_not_a_lesion_mask(tmp_path):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_FLAIR.nii.gz",
            "derivatives/fsl/sub-01/anat/sub-01_desc-brain_mask.nii.gz",
            "derivatives/fsl/sub-01/anat/sub-01_label-brain_desc-lesion_mask.nii.gz",
            "derivatives/fsl/sub-01/anat/sub-01_label-WMH_probseg.nii.gz",
            "derivatives/manual/sub-01/anat/sub-01_FLAIR_label-WMH_mask.nii.gz",
        ],
    )
    (s,) = subjects.discover(tmp_path)
    assert s.lesion.name == "sub-01_FLAIR_label-WMH_mask.nii.gz"


def test_bids_brain_mask_alone_gives_no_lesion(tmp_path):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_FLAIR.nii.gz",
            "derivatives/fsl/sub-01/anat/sub-01_desc-brain_mask.nii.gz",
            "derivatives/fsl/sub-01/anat/sub-01_mask.nii.gz",
        ],
    )
    (s,) = subjects.discover(tmp_path)
    assert s.lesion is None


@pytest.mark.parametrize(
    "mask",
    [
        "sub-01_label-wmh_mask",
        "sub-01_label-Lesions_dseg",
        "sub-01_desc-lesion_mask",
        "sub-01_space-orig_desc-WMH_dseg",
        "sub-01_label-lesion_mask",
    ],
)
def test_bids_lesion_mask_entities(tmp_path, mask):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_FLAIR.nii.gz",
            f"derivatives/x/sub-01/anat/{mask}.nii.gz",
        ],
    )
    (s,) = subjects.discover(tmp_path)
    assert s.lesion.name == f"{mask}.nii.gz"


def test_bids_name_parsing():
    name = subjects.parse_bids_name("sub-01_ses-2_FLAIR_label-WMH_mask.nii.gz")
    assert name.entities == {"sub": "01", "ses": "2", "label": "WMH"} and name.suffix == "mask"
    assert name.tokens == ("FLAIR",)
    assert subjects.parse_bids_name("sub-01_run-2.nii.gz") is None  # no suffix
    assert subjects.parse_bids_name("lesion_mask.nii.gz") is None  # no subject entity


def test_bids_masks_match_subject_and_session(tmp_path):
    """sub-1's mask must not go to sub-10 (prefix) or sub-01 (labels are strings), nor a ses-2 mask to ses-1."""
    write_bids(
        tmp_path,
        [f"{sub}/ses-1/anat/{sub}_ses-1_{m}.nii.gz" for sub in ("sub-1", "sub-10", "sub-01") for m in ("T1w", "FLAIR")]
        + ["derivatives/m/sub-1/ses-1/anat/sub-1_ses-1_label-WMH_mask.nii.gz"],
    )
    found = {s.id: s for s in subjects.discover(tmp_path)}
    assert found["sub-1_ses-1"].lesion.name == "sub-1_ses-1_label-WMH_mask.nii.gz"
    assert found["sub-10_ses-1"].lesion is None and found["sub-01_ses-1"].lesion is None
    # a ses-2 mask is not given to ses-1: it fits no FLAIR, which is an error that names it
    write_bids(tmp_path, ["derivatives/m/sub-10/ses-2/anat/sub-10_ses-2_label-WMH_mask.nii.gz"])
    with pytest.raises(
        InputError,
        match=r"1 lesion mask\(s\) under .*derivatives fit no FLAIR of the data set: "
        r".*sub-10_ses-2_label-WMH_mask.nii.gz.*rename it",
    ):
        subjects.discover(tmp_path)


def test_bids_mask_of_an_unchosen_run_is_not_an_orphan(tmp_path):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_run-1_FLAIR.nii.gz",
            "sub-01/anat/sub-01_run-2_FLAIR.nii.gz",
            "derivatives/m/sub-01/anat/sub-01_run-1_label-WMH_mask.nii.gz",
            "derivatives/m/sub-01/anat/sub-01_run-3_label-WMH_mask.nii.gz",
        ],
    )
    with pytest.raises(InputError, match="sub-01_run-3_label-WMH_mask.nii.gz"):  # run-3 exists nowhere
        subjects.discover(tmp_path, run=2)
    (tmp_path / "derivatives/m/sub-01/anat/sub-01_run-3_label-WMH_mask.nii.gz").unlink()
    (s,) = subjects.discover(tmp_path, run=2)
    assert s.flair.name == "sub-01_run-2_FLAIR.nii.gz" and s.lesion is None


def test_bids_several_runs_need_a_choice(tmp_path):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_run-1_FLAIR.nii.gz",
            "sub-01/anat/sub-01_run-2_FLAIR.nii.gz",
            "derivatives/m/sub-01/anat/sub-01_run-1_label-WMH_mask.nii.gz",
            "derivatives/m/sub-01/anat/sub-01_run-02_label-WMH_mask.nii.gz",
        ],
    )
    with pytest.raises(
        InputError,
        match=r"subject sub-01: 2 FLAIR images in .*anat \(sub-01_run-1_FLAIR.nii.gz, "
        r"sub-01_run-2_FLAIR.nii.gz\).*discover\(\.\.\., run=N\)",
    ):
        subjects.discover(tmp_path)
    (s,) = subjects.discover(tmp_path, run=2)
    assert s.flair.name == "sub-01_run-2_FLAIR.nii.gz" and s.t1.name == "sub-01_T1w.nii.gz"
    assert s.lesion.name == "sub-01_run-02_label-WMH_mask.nii.gz"  # a run is an index: 02 is 2
    with pytest.raises(InputError, match="run-3 selects 0 of them"):
        subjects.discover(tmp_path, run=3)


def test_bids_acquisitions_chosen_by_entity(tmp_path):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_acq-sag_T1w.nii.gz",
            "sub-01/anat/sub-01_acq-ax_T1w.nii.gz",
            "sub-01/anat/sub-01_FLAIR.nii.gz",
        ],
    )
    with pytest.raises(InputError, match="2 T1w images"):
        subjects.discover(tmp_path)
    (s,) = subjects.discover(tmp_path, run="acq-sag")
    assert s.t1.name == "sub-01_acq-sag_T1w.nii.gz"


def test_bids_two_matching_lesion_masks_are_refused(tmp_path):
    write_bids(
        tmp_path,
        [
            "sub-01/anat/sub-01_T1w.nii.gz",
            "sub-01/anat/sub-01_FLAIR.nii.gz",
            "derivatives/rater1/sub-01/anat/sub-01_label-WMH_mask.nii.gz",
            "derivatives/rater2/sub-01/anat/sub-01_desc-lesion_dseg.nii.gz",
        ],
    )
    with pytest.raises(InputError, match=r"subject sub-01: 2 lesion masks match sub-01_FLAIR.nii.gz: .*rater1.*rater2"):
        subjects.discover(tmp_path)


def test_run_only_for_bids(tmp_path):
    write_subject(tmp_path / "7")
    with pytest.raises(InputError, match="not a BIDS data set"):
        subjects.discover(tmp_path, run=1)


# ---------------------------------------------------------------- unique ids
def test_same_id_at_two_sites_is_refused_unless_prefixed(tmp_path):
    write_subject(tmp_path / "Utrecht" / "0")
    write_subject(tmp_path / "Amsterdam" / "0", lesion=False)
    write_subject(tmp_path / "Amsterdam" / "1", lesion=False)
    with pytest.raises(
        InputError,
        match=r"1 subject id\(s\) appear more than once \(0: .*Amsterdam/0, .*Utrecht/0\);"
        r" use discover\(\.\.\., site_prefix=True\)",
    ):
        subjects.discover(tmp_path)
    found = subjects.discover(tmp_path, site_prefix=True)
    assert [s.id for s in found] == ["Amsterdam_0", "Amsterdam_1", "Utrecht_0"]
    assert subjects.validate(found, progress=False)["subject"].tolist() == ["Amsterdam_0", "Amsterdam_1", "Utrecht_0"]


# ---------------------------------------------------------------- headers and intensities through validate()
def test_flair_without_orientation_is_a_header_error_not_a_grid_error(tmp_path):
    write_subject(tmp_path / "s1")
    flair = tmp_path / "s1" / "pre" / "FLAIR.nii.gz"
    header = nib.load(flair).header.copy()
    header["qform_code"], header["sform_code"] = 0, 0
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(flair).dataobj), None, header), flair)
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"subject s1: .*FLAIR.nii.gz: FLAIR has no orientation in its header"):
        s.validate()
    with pytest.raises(InputError, match="FLAIR has no orientation"):
        s.validate(t1_other_grid="error")


def test_nan_flair_is_refused_in_validate(tmp_path):
    write_subject(tmp_path / "s1")
    data = np.random.default_rng(0).random((12, 14, 10)).astype(np.float32)
    data[:2] = np.nan
    save_nifti(img(data), tmp_path / "s1" / "pre" / "FLAIR.nii.gz")
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"subject s1: .*FLAIR.nii.gz: FLAIR has 280 non-finite voxels"):
        s.validate()


def test_huge_voxels_are_refused_in_validate(tmp_path):
    write_subject(tmp_path / "s1", lesion=False, flair_affine=np.diag([2000.0, 2.0, 2.0, 1.0]))
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"subject s1: .*FLAIR.nii.gz: FLAIR header voxel size .*2000"):
        s.validate()


def test_inverted_lesion_mask_is_refused_empty_is_fine(tmp_path):
    write_subject(tmp_path / "s1", lesion_data=np.ones((12, 14, 10), np.uint8))
    (s,) = subjects.discover(tmp_path)
    with pytest.raises(InputError, match=r"subject s1: .*wmh.nii.gz: lesion mask covers 13 mL, 100% .*inverted"):
        s.validate()
    write_subject(tmp_path / "ok" / "s2", lesion_data=np.zeros((12, 14, 10), np.uint8))
    (s2,) = subjects.discover(tmp_path / "ok")
    assert s2.validate()["lesion_ml"] == 0.0


# ---------------------------------------------------------------- notebook 01 on a cohort without masks
def test_notebook_01_runs_without_lesion_masks(tmp_path):
    """A cohort without reference masks is valid input: notebook 01 runs to the end and says so."""
    import papermill as pm

    from wmloc_utils import demo

    data = tmp_path / "data"
    demo.generate(data, n_subjects=3, progress=False)
    for mask in data.glob("*/*/wmh.nii.gz"):
        mask.unlink()
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "01_data.ipynb"
    out = pm.execute_notebook(
        str(notebook),
        str(tmp_path / "01.ipynb"),
        cwd=str(tmp_path),
        kernel_name="python3",
        progress_bar=False,
        parameters={"data_dir": str(data), "workdir": str(tmp_path / "w")},
    )
    printed = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "no reference lesion masks: evaluation sections will be skipped" in printed
    table = pd.read_csv(tmp_path / "w" / "01_data" / "subjects.csv", dtype={"subject": str})
    assert len(table) == 3 and table["lesion"].isna().all()
