"""Inference writes on the exact FLAIR grid (LAS, anisotropic), inverts preprocessing in place, refuses wrong inputs."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from wmloc_utils import artefacts, inference, training
from wmloc_utils.errors import InputError
from wmloc_utils.networks import build_model


def _subject(folder, zooms, orientation, shape):
    """FLAIR/T1 with one bright cuboid lesion off-centre (so a wrong flip or shift would miss it)."""
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (ijk**2).sum(0) < 0.9
    lesion = np.zeros(shape, np.uint8)
    lesion[shape[0] // 5 : shape[0] // 2, shape[1] // 3 : 2 * shape[1] // 3, shape[2] // 3 : 2 * shape[2] // 3 + 1] = 1
    flair = brain * 1.0 + 2.0 * lesion
    aff = np.diag([*zooms, 1.0])
    if orientation == "LAS":
        aff[0, 0] = -zooms[0]
    aff[:3, 3] = [30.0, -20.0, 10.0]
    paths = {}
    for key, arr in (("flair", flair), ("t1", brain * 1.0 - 0.3 * lesion)):
        paths[key] = folder / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(np.float32), aff), paths[key])
    return paths, lesion, aff


class FlairThreshold(torch.nn.Module):
    """A stand-in 'network' whose lesion logit is the normalised FLAIR minus a threshold."""

    def forward(self, x):
        fg = 4.0 * (x[:, -1:] - 1.0)
        return torch.cat([-fg, fg], 1)


def _config(task="lesion", inputs="t1+flair"):
    return training.model_config(
        training.TrainConfig(
            task=task,
            inputs=inputs,
            patch_size=(16, 16, 16),
            spacing=(2.0, 2.0, 2.0),
            model_overrides={"channels": (4, 8, 16, 32)},
        )
    )


@pytest.mark.parametrize(
    "zooms,orientation,shape", [((1.0, 1.0, 3.0), "LAS", (40, 36, 14)), ((2.0, 2.0, 2.0), "RAS", (24, 28, 22))]
)
def test_lesion_output_on_exact_flair_grid_and_aligned(tmp_path, zooms, orientation, shape):
    paths, lesion, aff = _subject(tmp_path, zooms, orientation, shape)
    seg = inference.Segmenter(FlairThreshold(), _config(), torch.device("cpu"), Path("stub.pt"))
    out = inference.predict(seg, paths["t1"], paths["flair"], out_dir=tmp_path / "out", tta=True)
    assert set(out) == {"mask", "prob"} and out["mask"].name == "lesion_pred.nii.gz"
    mask, prob = nib.load(out["mask"]), nib.load(out["prob"])
    for img in (mask, prob):
        assert img.shape == shape and np.allclose(img.affine, aff)
    assert mask.get_data_dtype() == np.uint8 and prob.get_data_dtype() == np.float32
    m = np.asanyarray(mask.dataobj)
    dice = 2 * (m & lesion).sum() / (m.sum() + lesion.sum())
    assert dice > 0.8, dice


def test_region_labels_on_flair_grid_from_a_real_checkpoint(tmp_path):
    paths, _, aff = _subject(tmp_path, (1.0, 1.0, 3.0), "LAS", (40, 36, 14))
    config = _config(task="regions", inputs="flair")
    torch.manual_seed(0)
    model = build_model("unet", 1, 37, **config["model_kwargs"])
    ckpt = tmp_path / "regions.pt"
    torch.save({"config": config, "model": model.state_dict()}, ckpt)
    out = inference.predict(ckpt, flair_path=paths["flair"], out_paths={"labels": tmp_path / "r.nii.gz"})
    img = nib.load(out["labels"])
    assert img.shape == (40, 36, 14) and np.allclose(img.affine, aff) and img.get_data_dtype() == np.int16
    assert np.asanyarray(img.dataobj).max() <= 36 and np.asanyarray(img.dataobj).min() >= 0


class FlairClasses(torch.nn.Module):
    """A stand-in 37-class 'network': background outside the brain, class 5 in it, class 30 in the lesion."""

    def forward(self, x):
        f = x[:, -1:]
        logits = torch.full((x.shape[0], 37, *x.shape[2:]), -10.0)
        logits[:, 0:1] = 4.0 * (-1.0 - f)
        logits[:, 5:6] = 4.0 * (0.5 - (f - 0.2).abs())
        logits[:, 30:31] = 4.0 * (f - 1.0)
        return logits


def test_region_probabilities_interpolated_onto_flair_grid_in_chunks(tmp_path):
    """Class probabilities are interpolated a chunk of FLAIR voxels at a time; the chunking must not change the labels."""
    paths, lesion, aff = _subject(tmp_path, (1.0, 1.0, 3.0), "LAS", (40, 36, 14))
    seg = inference.Segmenter(
        FlairClasses(), _config(task="regions", inputs="flair"), torch.device("cpu"), Path("r.pt")
    )
    whole = inference.segment(seg, flair_path=paths["flair"])["labels"]
    chunked = inference.segment(seg, flair_path=paths["flair"], voxels_per_chunk=997)["labels"]
    assert whole.shape == (40, 36, 14) and np.allclose(whole.affine, aff)
    a, b = np.asanyarray(whole.dataobj), np.asanyarray(chunked.dataobj)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0, 5, 30}
    dice = 2 * ((a == 30) & (lesion == 1)).sum() / ((a == 30).sum() + lesion.sum())
    assert dice > 0.8, dice


def test_on_grid_equals_monai_invertd_on_an_oblique_lps_grid(tmp_path, monkeypatch):
    """Interpolating at the FLAIR voxels through the affines gives what MONAI's Invertd gives on the whole grid
    (a challenge-like oblique LPS grid with 3 mm slices), at the voxels asked for only."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from wmloc_utils.checkpoints import preprocessing

    shape = (30, 34, 12)
    rot = nib.eulerangles.euler2mat(0.12, -0.08, 0.1)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.96, -0.95, 3.0])  # LPS, oblique
    aff[:3, 3] = [14.0, 17.0, -15.0]
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(size=shape), 0), 1).astype(np.float32)
    nib.save(nib.Nifti1Image(smooth, aff), tmp_path / "flair.nii.gz")
    pre = preprocessing((2.0, 2.0, 2.0), with_label=False)
    image = pre({"image": [str(tmp_path / "flair.nii.gz")]})["image"]
    channels = torch.stack([image[0], -2.0 * image[0], image[0] ** 2])
    data = {"image": image, "pred": MetaTensor(channels, meta=image.meta, applied_operations=image.applied_operations)}
    expected = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"].numpy()
    where = np.zeros(shape, bool)
    where[3:-3, 4:-4, 2:-2] = rng.random((24, 26, 8)) < 0.5
    got = inference.on_grid(channels, image.affine, aff, where, voxels_per_chunk=500)
    assert expected.shape == (3, *shape) and got.shape == (3, where.sum())
    np.testing.assert_allclose(got, expected[:, where], atol=1e-4 * np.abs(expected).max())
    monkeypatch.setattr(inference, "CLASSES_PER_PASS", 2)  # the largest class is found across passes
    labels = inference.on_grid(channels, image.affine, aff, where, voxels_per_chunk=500, argmax=True)
    np.testing.assert_array_equal(labels, expected[:, where].argmax(0))
    assert set(np.unique(labels)) == {0, 1, 2}


class LeftRight(torch.nn.Module):
    """A stand-in 37-class 'network' that labels the left half of what it sees 1 (left SPL) and the right half 18."""

    def forward(self, x):
        logits = torch.zeros((x.shape[0], 37, *x.shape[2:]))
        half = x.shape[2] // 2
        logits[:, 1, :half] = 5.0
        logits[:, 18, half:] = 5.0
        return logits


def test_region_tta_mirrors_left_and_right_back(tmp_path):
    """A left-right flipped pass must have its labels swapped back, or left and right would be mixed up."""
    paths, _, aff = _subject(tmp_path, (2.0, 2.0, 2.0), "LAS", (24, 28, 22))
    config = _config(task="regions", inputs="flair")
    assert config["flip_axes"] == [0] and config["label_mirror"][1] == 18
    seg = inference.Segmenter(LeftRight(), config, torch.device("cpu"), Path("r.pt"))
    labels = np.asanyarray(inference.segment(seg, flair_path=paths["flair"], tta=True, roi_size=32)["labels"].dataobj)
    x_world = (aff @ np.c_[np.indices(labels.shape).reshape(3, -1).T, np.ones(labels.size)].T)[0].reshape(labels.shape)
    centre = x_world.mean()
    left, right = x_world < centre - 2, x_world > centre + 2
    assert (labels[left] == 1).mean() > 0.95 and (labels[right] == 18).mean() > 0.95


def test_refuses_wrong_or_missing_inputs(tmp_path):
    paths, _, _ = _subject(tmp_path, (2.0, 2.0, 2.0), "RAS", (24, 28, 22))
    seg = inference.Segmenter(FlairThreshold(), _config(inputs="t1+flair"), torch.device("cpu"), Path("m.pt"))
    with pytest.raises(InputError, match="trained on inputs 't1\\+flair'"):
        inference.segment(seg, flair_path=paths["flair"], inputs="flair")
    with pytest.raises(InputError, match="needs T1"):
        inference.segment(seg, flair_path=paths["flair"])
    odd = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 28, 20), np.float32), np.eye(4)), odd)
    with pytest.raises(InputError, match="T1 is not on the grid of FLAIR"):
        inference.segment(seg, t1_path=odd, flair_path=paths["flair"])


# ---------------------------------------------------------------- brain masks and minimum lesion size
@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A demo head with skull and scalp (bright on FLAIR), as files, and its true brain mask on the FLAIR grid."""
    from wmloc_utils import demo

    folder = demo.write_subject(
        demo.make_subject(0, demo.CohortSpec(seed=1, skull=True)), tmp_path_factory.mktemp("head")
    )
    t = demo.template()
    mask = demo.warp_from_template(nib.Nifti1Image(t.brain.astype(np.uint8), t.affine), folder / "truth", order=0)
    paths = {
        "t1": folder / "pre" / "T1.nii.gz",
        "flair": folder / "pre" / "FLAIR.nii.gz",
        "brain": folder / "brain.nii.gz",
    }
    nib.save(mask, paths["brain"])
    return paths, np.asanyarray(mask.dataobj) > 0


def test_nothing_is_predicted_outside_the_brain_mask(head):
    paths, brain = head
    seg = inference.Segmenter(FlairThreshold(), _config(), torch.device("cpu"), Path("stub.pt"))
    unmasked = np.asanyarray(inference.segment(seg, paths["t1"], paths["flair"])["mask"].dataobj) > 0
    assert unmasked[~brain].sum() > 100, "the bright scalp fools an unmasked threshold"
    out = inference.segment(seg, paths["t1"], paths["flair"], brain_mask=paths["brain"])
    mask, prob = (np.asanyarray(out[k].dataobj) for k in ("mask", "prob"))
    assert not mask[~brain].any() and not prob[~brain].any()
    assert mask[brain].any(), "lesions inside the brain are still found"
    regions = inference.Segmenter(
        FlairClasses(), _config(task="regions", inputs="flair"), torch.device("cpu"), Path("r.pt")
    )
    labels = np.asanyarray(
        inference.segment(regions, flair_path=paths["flair"], brain_mask=nib.load(paths["brain"]))["labels"].dataobj
    )
    assert not labels[~brain].any() and labels[brain].any()


def test_region_labels_kept_inside_a_wm_mask(tmp_path):
    """With a WM mask every WM voxel gets its most probable label 1..36 (never background), every other voxel 0."""
    paths, lesion, aff = _subject(tmp_path, (1.0, 1.0, 3.0), "LAS", (40, 36, 14))
    seg = inference.Segmenter(
        FlairClasses(), _config(task="regions", inputs="flair"), torch.device("cpu"), Path("r.pt")
    )
    plain = np.asanyarray(inference.segment(seg, flair_path=paths["flair"])["labels"].dataobj)
    wm = np.zeros(plain.shape, bool)
    wm[:, :, 4:10] = True  # a slab that crosses the brain's edge: background there in the plain output
    assert (plain[wm] == 0).any()
    nib.save(nib.Nifti1Image(wm.astype(np.uint8), aff), tmp_path / "wm.nii.gz")
    kept = np.asanyarray(
        inference.segment(seg, flair_path=paths["flair"], wm_mask=tmp_path / "wm.nii.gz")["labels"].dataobj
    )
    assert not kept[~wm].any() and (kept[wm] >= 1).all() and kept.max() <= 36
    inside = wm & (plain > 0)
    np.testing.assert_array_equal(kept[inside], plain[inside])  # where the network said a region, it stands
    nib.save(nib.Nifti1Image(np.zeros(plain.shape, np.uint8), aff), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="WM mask is empty"):
        inference.segment(seg, flair_path=paths["flair"], wm_mask=tmp_path / "empty.nii.gz")
    lesions = inference.Segmenter(FlairThreshold(), _config(), torch.device("cpu"), Path("l.pt"))
    with pytest.raises(InputError, match="l.pt: wm_mask= is for region networks"):
        inference.segment(lesions, paths["t1"], paths["flair"], wm_mask=tmp_path / "wm.nii.gz")


def test_brain_masked_network_needs_a_mask_on_the_flair_grid(tmp_path):
    paths, _, aff = _subject(tmp_path, (2.0, 2.0, 2.0), "RAS", (24, 28, 22))
    config = _config()
    config["training"]["brain_masked"] = True
    seg = inference.Segmenter(FlairThreshold(), config, torch.device("cpu"), Path("masked.pt"))
    with pytest.raises(InputError, match="masked.pt: this network was trained on brain-masked images"):
        inference.segment(seg, paths["t1"], paths["flair"])
    nib.save(nib.Nifti1Image(np.ones((24, 28, 20), np.uint8), aff), tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="brain mask is not on the grid of FLAIR"):
        inference.segment(seg, paths["t1"], paths["flair"], brain_mask=tmp_path / "small.nii.gz")


def test_min_lesion_size_removes_small_components(tmp_path):
    paths, lesion, aff = _subject(tmp_path, (2.0, 2.0, 2.0), "RAS", (24, 28, 22))
    flair = nib.load(paths["flair"])
    data = np.asanyarray(flair.dataobj).copy()
    data[18:20, 20:22, 16:18] += 2.0  # a second, tiny lesion of 8 voxels (0.064 mL)
    nib.save(nib.Nifti1Image(data, aff), paths["flair"])
    seg = inference.Segmenter(FlairThreshold(), _config(), torch.device("cpu"), Path("stub.pt"))
    n = [_n_lesions(inference.segment(seg, paths["t1"], paths["flair"], min_lesion_ml=ml)["mask"]) for ml in (0.0, 0.2)]
    assert n == [2, 1], n
    kept = np.asanyarray(inference.segment(seg, paths["t1"], paths["flair"], min_lesion_ml=0.2)["mask"].dataobj)
    assert 2 * (kept & lesion).sum() / (kept.sum() + lesion.sum()) > 0.8


def _n_lesions(img):
    """Number of 26-connected lesions of a predicted mask."""
    from wmloc_utils.metrics import lesions

    return lesions(np.asanyarray(img.dataobj) > 0)[1]


def test_unsafe_or_damaged_checkpoints_are_refused_before_any_subject(tmp_path):
    """predict_cohort loads each checkpoint with weights_only: a file holding code or cut short names itself."""
    config = _config(task="regions", inputs="flair")
    good = tmp_path / "regions.pt"
    torch.save({"config": config, "model": build_model("unet", 1, 37, **config["model_kwargs"]).state_dict()}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-100])
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"config": config, "model": {}, "hook": Path}, unsafe)  # a class: a Python object, not data
    table = pd.DataFrame({"subject": ["s1"], "flair": [str(tmp_path / "missing.nii.gz")]})
    with pytest.raises(InputError, match=rf"{cut}: not loaded: corrupt or truncated"):
        inference.predict_cohort(table, tmp_path / "out", region_checkpoint=cut, progress=False)
    with pytest.raises(InputError, match=rf"{unsafe}: not loaded: the file holds Python objects"):
        inference.predict_cohort(table, tmp_path / "out", region_checkpoint=unsafe, progress=False)
    assert inference.load_segmenter(good, "cpu").config == config


def test_predict_cohort_reuses_an_unchanged_subject_and_redoes_a_changed_one(tmp_path):
    import os

    from conftest import train_tiny_lesion_network

    from wmloc_utils import demo, subjects

    demo.generate(tmp_path / "d", n_subjects=1, progress=False)
    s = subjects.discover(tmp_path / "d")[0]
    table = pd.DataFrame({"subject": [s.id], "t1": [str(s.t1)], "flair": [str(s.flair)], "lesion": [str(s.lesion)]})
    best = train_tiny_lesion_network(table, tmp_path / "m")
    stamp = tmp_path / "p" / s.id / "lesion_prediction.json"
    inference.predict_cohort(table, tmp_path / "p", best, progress=False)
    written = stamp.stat().st_mtime_ns
    inference.predict_cohort(table, tmp_path / "p", best, progress=False)
    assert stamp.stat().st_mtime_ns == written  # unchanged: not predicted again
    os.utime(s.flair, ns=(written + 10**9, written + 10**9))
    inference.predict_cohort(table, tmp_path / "p", best, progress=False)
    assert stamp.stat().st_mtime_ns != written  # the FLAIR changed: predicted again


def test_checkpoints_default_to_notebooks_04_and_05(tmp_path):
    """The networks a notebook applies: those given, else notebook 04's (required) and 05's (when there)."""
    with pytest.raises(FileNotFoundError, match="run notebook 04_train_lesions.ipynb first"):
        inference.checkpoints(tmp_path)
    lesion = artefacts.folder(tmp_path, artefacts.LESION_MODEL) / artefacts.LESION_MODEL.path
    lesion.write_text("x")
    assert inference.checkpoints(tmp_path) == (lesion, None)
    region = artefacts.folder(tmp_path, artefacts.REGION_MODEL) / artefacts.REGION_MODEL.path
    region.write_text("x")
    assert inference.checkpoints(tmp_path) == (lesion, region)
    assert inference.checkpoints(tmp_path, region=False) == (lesion, None)
    assert inference.checkpoints(tmp_path / "other", lesion, region) == (lesion, region)
    with pytest.raises(FileNotFoundError, match="check the path given for the region network"):
        inference.checkpoints(tmp_path, region=tmp_path / "missing.pt")


def white_and_grey_matter(shape: tuple[int, int, int], grey_from: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A FLAIR of white matter (100 +- 2) with grey matter (120 +- 5, 90th percentile about 126) from x = ``grey_from``
    on, and that grey matter's mask: the setting of the hyperintensity filter and lesion growth tests."""
    rng = np.random.default_rng(seed)
    flair = rng.normal(100.0, 2.0, shape).astype(np.float32)
    gm = np.zeros(shape, bool)
    gm[grey_from:] = True
    flair[gm] = rng.normal(120.0, 5.0, gm.sum())
    return flair, gm


def test_lesions_no_brighter_than_grey_matter_are_dropped():
    """keep_hyperintense_lesions: a lesion brighter than grey matter stays; one as bright as cortex goes."""
    flair, gm = white_and_grey_matter((30, 20, 20), 20, seed=0)
    mask = np.zeros(flair.shape, bool)
    mask[6:9, 8:11, 8:11] = True
    flair[6:9, 8:11, 8:11] = 150.0  # a WMH: 1.19 x grey matter's 90th percentile
    mask[22:25, 8:11, 8:11] = True  # bright cortex: grey matter as it is, ~0.95 x
    mask[4:6, 2:4, 2:4] = True
    flair[4:6, 2:4, 2:4] = 132.0  # a faint lesion: 1.05 x
    kept = inference.keep_hyperintense_lesions(mask, flair, gm, 1.1)
    assert kept[7, 9, 9] and not kept[23, 9, 9] and not kept[4, 2, 2]
    assert inference.keep_hyperintense_lesions(mask, flair, gm, 1.0)[4, 2, 2]
    assert (inference.keep_hyperintense_lesions(mask, flair, gm, 0.0) == mask).all()
    assert not inference.keep_hyperintense_lesions(np.zeros_like(mask), flair, gm).any()
    with pytest.raises(InputError, match="not the same grid"):
        inference.keep_hyperintense_lesions(mask, flair[1:], gm[1:])
    with pytest.raises(InputError, match="no grey matter"):
        inference.keep_hyperintense_lesions(mask, flair, np.zeros_like(gm))


def test_a_lesion_with_a_halo_keeps_its_core_and_lesions_at_the_surface_must_be_brighter():
    """keep_hyperintense_lesions: a lesion that the network took in with a halo of normal WM (most of its voxels
    WM-dark) stays, trimmed to its hyperintense voxels; near the brain's surface (where cortex lies) a lesion needs
    min_gm_contrast + SURFACE_EXTRA."""
    flair, gm = white_and_grey_matter((30, 30, 30), 25, seed=1)
    mask = np.zeros(flair.shape, bool)
    mask[5:10, 5:10, 5:10] = True  # the network's lesion: 125 voxels, of them a 3x3x4 core of 36 (29 %)
    flair[6:9, 6:9, 6:10] = 160.0  # 1.27 x grey matter; the median of the whole component is WM's
    kept = inference.keep_hyperintense_lesions(mask, flair, gm, 1.15)
    assert (kept == (mask & (flair > 150))).all()  # the core, and nothing of the halo
    lesion = np.zeros(flair.shape, bool)
    lesion[14:17, 14:17, 14:17] = True
    flair[lesion] = 147.0  # 1.17 x grey matter: above 1.15, below 1.15 + 0.05
    deep = np.full(flair.shape, 20.0)
    assert inference.keep_hyperintense_lesions(lesion, flair, gm, 1.15, deep)[15, 15, 15]
    assert not inference.keep_hyperintense_lesions(lesion, flair, gm, 1.15, np.full(flair.shape, 3.0)).any()
    assert inference.keep_hyperintense_lesions(lesion, flair, gm, 1.15)[15, 15, 15]  # no depth map: no surface rule
    with pytest.raises(InputError, match="depth map"):
        inference.keep_hyperintense_lesions(lesion, flair, gm, 1.15, deep[1:])


def test_lesions_grow_along_hyperintense_voxels_the_network_doubts():
    """grow_lesions: a lesion's faint bright rim joins it; a doubtful bright voxel off any lesion, dark voxels of
    high probability, and a bright rim the network rules out (below min_prob) do not."""
    flair, gm = white_and_grey_matter((30, 20, 20), 25, seed=0)
    prob = np.zeros(flair.shape, np.float32)
    mask = np.zeros(flair.shape, bool)
    mask[8:11, 8:11, 8:11] = True  # the network's confident core
    flair[6:13, 8:11, 8:11], prob[6:13, 8:11, 8:11] = 150.0, 0.35  # a bright rim of low probability...
    prob[8:11, 8:11, 8:11] = 0.9
    flair[8:11, 11:13, 8:11], prob[8:11, 11:13, 8:11] = 150.0, 0.1  # ...and one the network rules out
    prob[8:11, 8:11, 11:14] = 0.45  # probable but as dark as white matter
    flair[18:20, 2:4, 2:4], prob[18:20, 2:4, 2:4] = 150.0, 0.4  # bright and doubtful, on no lesion
    grown = inference.grow_lesions(mask, prob, flair, gm, 0.3, 1.1)
    assert grown[6:13, 8:11, 8:11].all() and grown.sum() == 7 * 9  # the core and its rim, nothing else
    assert (inference.grow_lesions(mask, prob, flair, gm, 0.5, 1.1) == mask).all()  # rim below 0.5: no growth
    assert inference.grow_lesions(mask, prob, flair, gm, 0.05, 1.1)[8:11, 11:13, 8:11].all()
    assert not inference.grow_lesions(np.zeros_like(mask), prob, flair, gm).any()
    with pytest.raises(InputError, match="not the same grid"):
        inference.grow_lesions(mask, prob[1:], flair, gm)


def test_lesions_mostly_in_the_atlas_grey_matter_are_dropped():
    """outside_grey_matter: a lesion with 3/4 of its voxels in grey matter goes, one beside it with 1/4 inside (a
    juxtacortical lesion, or a periventricular one along the caudate) stays whole, as does one far off; another
    grid is an error."""
    grey = np.zeros((20, 20, 20), bool)
    grey[5:15, 5:15, 5:15] = True
    mask = np.zeros(grey.shape, bool)
    mask[2:6, 8:11, 8:11] = True  # rows 2..5: only row 5 inside (1/4)
    mask[12:16, 8:11, 8:11] = True  # rows 12..15: 12, 13, 14 inside (3/4)
    mask[0:2, 0:2, 0:2] = True  # far off
    kept = inference.outside_grey_matter(mask, grey)
    assert kept[2:6, 8:11, 8:11].all() and kept[0:2, 0:2, 0:2].all()
    assert not kept[12:16].any() and kept.sum() == 36 + 8
    assert (inference.outside_grey_matter(mask, np.zeros_like(grey)) == mask).all()
    with pytest.raises(InputError, match="not the same grid"):
        inference.outside_grey_matter(mask, grey[1:])


def test_the_grey_matter_rule_reads_notebook_03s_map_unless_switched_off(tmp_path, capsys):
    """Notebook 06's inputs: notebook 03's atlas grey matter reaches the lesion step, unless drop_grey_matter=False;
    results of notebook 03 made before it existed are named."""
    subjects = artefacts.path(tmp_path, artefacts.SUBJECTS)
    regions = artefacts.path(tmp_path, artefacts.REGIONS)
    for path in (subjects, regions):
        path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"subject": ["001"], "t1": ["t1.nii.gz"], "flair": ["flair.nii.gz"]}).to_csv(subjects, index=False)
    maps = {"subject": ["001"], "brain_mask": ["b.nii.gz"], "atlas_grey_matter": ["g.nii.gz"]}
    pd.DataFrame(maps).to_csv(regions, index=False)
    table, columns = inference._step_inputs(tmp_path)
    assert columns["grey_col"] == "atlas_grey_matter" and table["atlas_grey_matter"].tolist() == ["g.nii.gz"]
    assert columns["brain_col"] == "brain_mask" and columns["tissue_col"] is None
    assert inference._step_inputs(tmp_path, drop_grey_matter=False)[1]["grey_col"] is None
    assert "predate" not in capsys.readouterr().out
    pd.DataFrame({"subject": ["001"], "brain_mask": ["b.nii.gz"]}).to_csv(regions, index=False)  # an older notebook 03
    assert inference._step_inputs(tmp_path)[1]["grey_col"] is None
    assert "subject(s) 001: notebook 03's results predate the atlas grey matter" in capsys.readouterr().out


def test_dropped_lesion_volume_is_reported(tmp_path, capsys):
    """lesion_volumes: the final mask's mL and the network's mL the filters dropped; report_dropped names the
    subjects that lost most of what the network found (1 mL and half at least), not the others."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 uL voxels: 125 voxels = 1 mL
    prob = np.zeros((20, 20, 20), np.float32)
    prob[0:5, 0:5, 0:10] = 0.9  # 250 voxels found by the network
    mask = np.zeros(prob.shape, np.uint8)
    mask[0:5, 0:5, 0:2] = 1  # 50 kept
    mask[10:12, 10:12, 10:12] = 1  # 8 grown or added where the network said < 0.5: not dropped
    nib.save(nib.Nifti1Image(prob, aff), tmp_path / "prob.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), tmp_path / "mask.nii.gz")
    kept, dropped = inference.lesion_volumes(tmp_path / "mask.nii.gz", tmp_path / "prob.nii.gz")
    assert kept == pytest.approx(58 / 125) and dropped == pytest.approx(200 / 125)
    preds = pd.DataFrame(
        {
            "subject": ["lost", "kept", "small", "failed"],
            "pred_ml": [kept, 10.0, 0.1, np.nan],
            "dropped_ml": [dropped, 2.0, 0.5, np.nan],
        }
    )
    assert inference.report_dropped(preds) == ["lost"]
    assert "subject lost: the lesion filters dropped 1.6 mL, 78% of what the network found" in capsys.readouterr().out
    assert inference.report_dropped(preds.drop(columns="dropped_ml")) == []


def test_min_gm_contrast_filters_the_mask_not_the_probability(tmp_path):
    paths, lesion, aff = _subject(tmp_path, (2.0, 2.0, 2.0), "RAS", (24, 28, 22))  # brain 1.0, lesion 3.0
    seg = inference.Segmenter(FlairThreshold(), _config(), torch.device("cpu"), Path("stub.pt"))
    brain = np.asanyarray(nib.load(paths["flair"]).dataobj) > 0
    tissue = np.where(brain, 3, 0).astype(np.uint8)
    tissue[brain & (np.arange(24) > 18)[:, None, None]] = 2  # grey matter as bright as the rest of the brain
    nib.save(nib.Nifti1Image(tissue, aff), tmp_path / "tissue.nii.gz")
    with pytest.raises(InputError, match="stub.pt: min_gm_contrast=1.1 compares the FLAIR of lesions"):
        inference.segment(seg, paths["t1"], paths["flair"], min_gm_contrast=1.1)
    out_kept = inference.segment(
        seg, paths["t1"], paths["flair"], min_gm_contrast=1.1, tissue_map=tmp_path / "tissue.nii.gz"
    )
    assert np.asanyarray(out_kept["mask"].dataobj).sum() > 0.8 * lesion.sum()  # 3x grey matter: kept
    out = inference.segment(
        seg, paths["t1"], paths["flair"], min_gm_contrast=4.0, tissue_map=tmp_path / "tissue.nii.gz"
    )
    assert np.asanyarray(out["mask"].dataobj).sum() == 0
    assert np.asanyarray(out["prob"].dataobj)[lesion > 0].mean() > 0.5  # the network's probability is untouched
    nib.save(nib.Nifti1Image(tissue[:, :, 1:], aff), tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="tissue map is not on the grid of FLAIR"):
        inference.segment(seg, paths["t1"], paths["flair"], min_gm_contrast=1.1, tissue_map=tmp_path / "small.nii.gz")
    regions = inference.Segmenter(FlairThreshold(), _config("regions"), torch.device("cpu"), Path("regions.pt"))
    with pytest.raises(InputError, match="regions.pt: min_gm_contrast= is for lesion networks"):
        inference.segment(regions, paths["t1"], paths["flair"], min_gm_contrast=1.1)
    with pytest.raises(InputError, match="stub.pt: grow_to_prob=0.3 compares the FLAIR of lesions .* tissue_map="):
        inference.segment(seg, paths["t1"], paths["flair"], grow_to_prob=0.3)
    with pytest.raises(InputError, match="regions.pt: grow_to_prob= is for lesion networks"):
        inference.segment(regions, paths["t1"], paths["flair"], grow_to_prob=0.3)
    grown = inference.segment(
        seg, paths["t1"], paths["flair"], min_gm_contrast=1.1, tissue_map=tmp_path / "tissue.nii.gz", grow_to_prob=0.3
    )
    assert np.asanyarray(grown["mask"].dataobj).sum() >= np.asanyarray(out_kept["mask"].dataobj).sum()


def test_lesions_in_the_atlas_grey_matter_leave_the_mask_not_the_probability(tmp_path):
    """segment(grey_matter=...): a lesion lying in notebook 03's atlas grey matter goes from the mask (the probability
    stays the network's), one outside it stays; a map on another grid and a region network are clear errors."""
    paths, lesion, aff = _subject(tmp_path, (2.0, 2.0, 2.0), "RAS", (24, 28, 22))
    seg = inference.Segmenter(FlairThreshold(), _config(), torch.device("cpu"), Path("stub.pt"))
    for name, grey in (("on", lesion > 0), ("off", np.zeros(lesion.shape, bool)), ("small", lesion[:, :, 1:] > 0)):
        nib.save(nib.Nifti1Image(grey.astype(np.uint8), aff), tmp_path / f"grey_{name}.nii.gz")
    dropped = inference.segment(seg, paths["t1"], paths["flair"], grey_matter=tmp_path / "grey_on.nii.gz")
    kept = inference.segment(seg, paths["t1"], paths["flair"], grey_matter=tmp_path / "grey_off.nii.gz")
    assert not np.asanyarray(dropped["mask"].dataobj).any()
    assert np.asanyarray(dropped["prob"].dataobj)[lesion > 0].mean() > 0.5
    assert np.asanyarray(kept["mask"].dataobj).sum() > 0.8 * lesion.sum()
    with pytest.raises(InputError, match="atlas grey matter is not on the grid of FLAIR"):
        inference.segment(seg, paths["t1"], paths["flair"], grey_matter=tmp_path / "grey_small.nii.gz")
    regions = inference.Segmenter(FlairThreshold(), _config("regions"), torch.device("cpu"), Path("regions.pt"))
    with pytest.raises(InputError, match="regions.pt: grey_matter= is for lesion networks"):
        inference.segment(regions, paths["t1"], paths["flair"], grey_matter=tmp_path / "grey_on.nii.gz")


def test_a_tissue_input_network_reads_its_maps_from_channels(tmp_path):
    """inputs="tissue": the tissue classes and WM probability come by name (a subjects-table row), checked and used."""
    paths, lesion, aff = _subject(tmp_path, (2.0, 2.0, 2.0), "RAS", (24, 28, 22))
    seg = inference.Segmenter(FlairThreshold(), _config(inputs="tissue"), torch.device("cpu"), Path("tissue.pt"))
    with pytest.raises(InputError, match="tissue.pt: the network was trained on 'tissue' and needs TISSUE and PROB_WM"):
        inference.segment(seg, paths["t1"], paths["flair"])
    row = {"subject": "001", "lesion_ml": 1.5, "tissue": str(paths["t1"]), "prob_wm": str(paths["flair"])}
    mask = np.asanyarray(inference.segment(seg, paths["t1"], paths["flair"], channels=row)["mask"].dataobj)
    assert 2 * (mask & lesion).sum() / (mask.sum() + lesion.sum()) > 0.8  # the last channel (prob_wm) was read
    nib.save(nib.Nifti1Image(np.ones((24, 28, 20), np.float32), aff), tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="PROB_WM is not on the grid of FLAIR"):
        inference.segment(seg, paths["t1"], paths["flair"], channels={**row, "prob_wm": tmp_path / "small.nii.gz"})
    table = pd.DataFrame([{"subject": "001", "t1": str(paths["t1"]), "flair": str(paths["flair"])}])
    ckpt = tmp_path / "tissue.pt"
    torch.save(
        {"config": seg.config, "model": build_model("unet", 2, 2, **seg.config["model_kwargs"]).state_dict()}, ckpt
    )
    with pytest.raises(InputError, match="reads tissue, prob_wm, a column the subjects table lacks"):
        inference.predict_cohort(table, tmp_path / "out", ckpt, progress=False)
