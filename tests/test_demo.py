"""The built-in demo cohort: determinism, lesions inside WM, labels, grids, truth, distinct group patterns."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn import datasets

from wmloc_utils import demo, subjects


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    participants = demo.generate(root, n_subjects=8, seed=3, progress=False)
    return root, participants


def test_layout_participants_and_stamp(cohort):
    root, participants = cohort
    found = subjects.discover(root)
    assert len(found) == 8 and all(s.lesion is not None and s.extra.get("truth_dir") for s in found)
    assert list(participants.columns) == ["participant_id", "site", "group", "age", "sex", "lesion_ml"]
    assert set(participants.group) == set(demo.GROUPS)
    assert json.loads((root / "cohort.json").read_text())["spec"]["n_subjects"] == 8
    assert not list(root.glob("*/.*partial")), "no half-written subject folders"


def test_generate_reuses_an_identical_cohort(cohort):
    root, _ = cohort
    before = (root / "siteA" / "001" / "pre" / "FLAIR.nii.gz").stat().st_mtime_ns
    demo.generate(root, n_subjects=8, seed=3, progress=False)
    assert (root / "siteA" / "001" / "pre" / "FLAIR.nii.gz").stat().st_mtime_ns == before


def test_subjects_made_in_two_processes_are_the_same_files(tmp_path):
    """Each subject has its own random stream: two worker processes write byte-identical files to one."""
    import hashlib

    def digests(root):
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.nii.gz"))
        }

    one = demo.generate(tmp_path / "one", n_subjects=2, seed=5, progress=False, n_jobs=1)
    two = demo.generate(tmp_path / "two", n_subjects=2, seed=5, progress=False, n_jobs=2)
    pd.testing.assert_frame_equal(one, two)
    assert len(digests(tmp_path / "one")) == 2 * 4 and digests(tmp_path / "one") == digests(tmp_path / "two")


def test_labels_lesions_inside_wm_and_loads(cohort):
    root, participants = cohort
    for s in subjects.discover(root):
        wmh = np.asarray(s.lesion_img.dataobj)
        tissue = np.asarray(nib.load(f"{s.extra['truth_dir']}/tissue.nii.gz").dataobj)
        assert set(np.unique(wmh)) <= {0, 1, 2}
        assert np.all(tissue[wmh == 1] == 3), f"lesions outside WM in {s.id}"
        assert np.all(tissue[wmh == 2] == 1), "lacunes are CSF-like holes"
    loads = participants.set_index("group").lesion_ml
    assert loads.min() >= 0.3 and loads.max() <= 60
    assert loads["low_load"].max() < loads.drop("low_load").min()
    assert (participants.participant_id == "005").any()
    wmh5 = np.asarray(nib.load(root / "siteB" / "005" / "wmh.nii.gz").dataobj)
    assert (wmh5 == 2).sum() > 0, "every 5th subject carries other pathology"


def test_lesions_are_bright_on_flair_dark_on_t1(cohort):
    root, _ = cohort
    s = subjects.discover(root)[0]
    les = np.asarray(s.lesion_img.dataobj) == 1
    tissue = np.asarray(nib.load(f"{s.extra['truth_dir']}/tissue.nii.gz").dataobj)
    wm = (tissue == 3) & ~les
    flair, t1 = (np.asarray(i.dataobj, dtype=float) for i in (s.flair_img, s.t1_img))
    assert flair[les].mean() > 1.5 * flair[wm].mean()
    assert t1[les].mean() < 0.85 * t1[wm].mean()


def test_determinism(cohort):
    spec = demo.CohortSpec(n_subjects=8, seed=3)
    a, b = demo.make_subject(2, spec), demo.make_subject(2, spec)
    assert np.array_equal(a["flair"], b["flair"]) and np.array_equal(a["wmh"], b["wmh"])
    other = demo.make_subject(2, demo.CohortSpec(n_subjects=8, seed=4))
    assert not np.array_equal(a["flair"], other["flair"])
    root, _ = cohort
    on_disk = np.asarray(nib.load(root / "siteC" / "003" / "pre" / "FLAIR.nii.gz").dataobj)
    assert np.array_equal(on_disk, a["flair"])


def test_grid_options_and_orientations(cohort):
    root, _ = cohort
    orient = {s.site: "".join(nib.aff2axcodes(s.flair_img.affine)) for s in subjects.discover(root)}
    assert orient == {"siteA": "RAS", "siteB": "LAS", "siteC": "RAS"}
    t = demo._random_transform(np.random.default_rng(0))
    for voxel in demo.GRIDS.values():
        shape, aff = demo._subject_grid(t, voxel, "RAS")
        assert np.allclose(np.abs(np.diag(aff)[:3]), voxel)
        assert np.allclose(np.array(shape) * voxel, demo.FOV_MM, atol=3)
    aniso = demo.make_subject(0, demo.CohortSpec(grid="aniso", seed=3))
    assert aniso["t1"].shape[2] * 3 == pytest.approx(demo.FOV_MM[2], abs=3)
    assert (aniso["wmh"] == 1).sum() * 0.003 == pytest.approx(aniso["lesion_ml"])
    with pytest.raises(ValueError, match="grid must be one of"):
        demo.generate(root / "x", grid="5mm")


def test_true_transform_carries_template_anatomy_into_the_subject(cohort):
    """Template WM warped through the stored transform matches the subject's true WM."""
    root, _ = cohort
    s = subjects.discover(root)[3]
    wm_t = datasets.load_mni152_wm_template(resolution=1)
    warped = demo.warp_from_template(wm_t, s.extra["truth_dir"], order=1)
    assert warped.shape == s.flair_img.shape and np.allclose(warped.affine, s.flair_img.affine)
    truth = np.asarray(nib.load(f"{s.extra['truth_dir']}/tissue.nii.gz").dataobj) == 3
    pred = np.asarray(warped.dataobj) > 0.5
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.85


def test_group_patterns_differ(cohort):
    """Lesion centroids in template space: frontal groups anterior, posterior behind, deep far from ventricles."""
    root, participants = cohort
    groups = participants.set_index("participant_id").group
    rows = []
    t = demo.template()
    for s in subjects.discover(root):
        coords, _ = demo.template_coords(s.extra["truth_dir"])
        les = np.asarray(s.lesion_img.dataobj) == 1
        pts = coords[les]
        vent = demo._sample(t.vent_dist, t.affine, pts, cval=100.0)
        rows.append({"group": groups[s.id], "y": pts[:, 1].mean(), "vent": np.median(vent)})
    table = pd.DataFrame(rows).groupby("group").mean()
    assert table.loc["frontal_pv", "y"] > table.loc["posterior_pv", "y"] + 30
    assert table.loc["deep", "vent"] > table.loc["frontal_pv", "vent"] + 5
    assert table.loc["deep", "vent"] > table.loc["posterior_pv", "vent"] + 5


def test_command_line(tmp_path, capsys):
    demo.main([str(tmp_path / "cli"), "--n-subjects", "1", "--seed", "1"])
    assert "participant_id" in capsys.readouterr().out
    assert (tmp_path / "cli" / "siteA" / "001" / "pre" / "T1.nii.gz").exists()


def test_skull_option_adds_bright_scalp_outside_the_brain():
    plain = demo.make_subject(0, demo.CohortSpec(seed=1))
    skull = demo.make_subject(0, demo.CohortSpec(seed=1, skull=True))
    outside = plain["tissue"] == 0
    assert skull["t1"][outside].mean() > 2 * plain["t1"][outside].mean()


# ---------------------------------------------------------------- options for testing generalisation
@pytest.fixture(scope="module")
def unseen():
    """Three subjects of an unseen setting: Eve's brain, challenge grids, mixed skull, contrast jitter, one lesion-free."""
    spec = demo.CohortSpec(
        n_subjects=3, seed=5, grid="challenge", brain="eve", skull="mixed", contrast=0.3, lesion_free_every=3
    )
    return spec, [demo.make_subject(i, spec) for i in range(3)]


def test_challenge_grids_are_per_site_lps_and_oblique(unseen):
    _, subj = unseen
    assert [s["site"] for s in subj] == list(demo.CHALLENGE_SITES)
    for s in subj:
        aff = s["affine"]
        voxel = np.linalg.norm(aff[:3, :3], axis=0)
        assert np.allclose(voxel, demo.CHALLENGE_SITES[s["site"]], atol=1e-6)
        assert nib.aff2axcodes(aff) == ("L", "P", "S")
        off_diagonal = np.abs(aff[:3, :3] / voxel - np.diag(np.diag(aff[:3, :3]) / voxel)).max()
        assert off_diagonal > 0.01, "challenge headers are oblique"
        assert np.allclose(np.array(s["t1"].shape) * voxel, demo.FOV_MM, atol=3)


def test_eve_brain_is_another_anatomy_with_lesions_in_its_wm(unseen):
    spec, subj = unseen
    s = subj[0]
    tissue = s["tissue"]
    assert np.all(tissue[s["wmh"] == 1] == 3) and s["lesion_ml"] > 0.5
    eve, mni = demo.template("eve"), demo.template()
    coords = demo._world_coords(mni.wm.shape, mni.affine)  # Eve's WM seen on MNI152's grid, in the shared world
    wm_a, wm_b = demo._sample(eve.wm, eve.affine, coords) > 0.5, mni.wm > 0.5
    dice = 2 * (wm_a & wm_b).sum() / (wm_a.sum() + wm_b.sum())
    assert 0.4 < dice < 0.85, f"Eve's WM should overlap MNI152's roughly but not exactly (Dice {dice:.2f})"
    assert 20 < (eve.vent_dist == 0).sum() / 1000 < 80, "Eve's lateral ventricles found as for MNI152"
    assert (
        s["transform"]["template"] == "eve" and "template" not in demo.make_subject(0, demo.CohortSpec())["transform"]
    )


def test_mixed_skull_contrast_and_lesion_free_subjects(unseen):
    _, subj = unseen
    bright = [(s["t1"][s["tissue"] == 0] > 0.5 * s["t1"][s["tissue"] == 3].mean()).mean() for s in subj]
    assert min(bright[0], bright[2]) > 5 * bright[1], f"a bright scalp on sites 1 and 3 only: {bright}"
    free = subj[2]
    assert not free["wmh"].any() and free["lesion_ml"] == 0 and free["group"] == "none"
    assert subj[0]["wmh"].any() and subj[1]["wmh"].any()
    plain = demo.make_subject(0, demo.CohortSpec(seed=5))
    jittered = demo.make_subject(0, demo.CohortSpec(seed=5, contrast=0.3))
    assert np.array_equal(plain["wmh"], jittered["wmh"]), "contrast changes intensities, not anatomy"
    ratio = [s["flair"][s["wmh"] == 1].mean() / s["flair"][s["tissue"] == 3].mean() for s in (plain, jittered)]
    assert abs(ratio[0] - ratio[1]) > 0.05 and not np.array_equal(plain["t1"], jittered["t1"])


def test_contrast_jitter_keeps_the_tissue_order_of_real_scanners():
    """Jitter per tissue could make GM and WM equal (a subject of the unseen cohort had T1 medians 412 vs 414)."""
    rng = np.random.default_rng(0)
    raw = [
        demo.plausible_contrast(demo.T1_MEANS * rng.uniform(0.7, 1.3, 4), demo.FLAIR_MEANS * rng.uniform(0.7, 1.3, 4))
        for _ in range(500)
    ]
    assert 0.05 < 1 - np.mean(raw) < 0.95, "independent draws are sometimes implausible: the check has work to do"
    for seed in range(200):
        sc = demo._scanner(np.random.default_rng([seed, 1]), 0.3)
        t1, flair = demo.T1_MEANS * sc["t1"], demo.FLAIR_MEANS * sc["flair"]
        assert demo.plausible_contrast(t1, flair), (seed, t1, flair)
        assert t1[2] >= demo.MIN_GM_WM_RATIO * t1[1] and flair[1] >= demo.MIN_GM_WM_RATIO * flair[2]
    assert not demo.plausible_contrast(np.array([0.2, 0.6, 0.6, 0.5]), demo.FLAIR_MEANS), "GM = WM on T1"


def test_generate_checks_new_options(tmp_path):
    with pytest.raises(ValueError, match="brain must be one of"):
        demo.generate(tmp_path / "x", brain="colin27")
    with pytest.raises(ValueError, match="skull must be"):
        demo.generate(tmp_path / "x", skull="some")
    with pytest.raises(ValueError, match="must not be negative"):
        demo.generate(tmp_path / "x", contrast=-1)


def test_regenerating_with_fewer_subjects_leaves_no_extra_subject(tmp_path):
    from wmloc_utils import demo, subjects

    demo.generate(tmp_path, n_subjects=3, progress=False)
    demo.generate(tmp_path, n_subjects=2, progress=False)
    assert len(subjects.discover(tmp_path)) == 2
