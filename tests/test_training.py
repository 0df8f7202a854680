"""Split, MONAI pipeline, one-step training on a tiny synthetic cohort, checkpoint round-trip and resume."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from wmloc_utils import training
from wmloc_utils.images import InputError


def make_subject(folder, name, rng, shape=(32, 32, 32), zooms=(2.0, 2.0, 2.0), orientation="RAS"):
    """A tiny brain-like ellipsoid with bright FLAIR blobs (label 1), one label-2 blob, on a RAS or LAS grid."""
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (ijk ** 2).sum(0) < 0.8
    lesion = np.zeros(shape, np.uint8)
    for _ in range(3):
        c = rng.integers([s // 4 for s in shape], [3 * s // 4 for s in shape])
        lesion[tuple(slice(ci - 2, ci + 2) for ci in c)] = 1
    lesion[shape[0] // 2 - 1:shape[0] // 2 + 1, 2 + shape[1] // 4:4 + shape[1] // 4, shape[2] // 2] = 2
    lesion[~brain] = 0
    flair = brain * (1.0 + 0.05 * rng.standard_normal(shape)) + 1.5 * (lesion == 1)
    t1 = brain * (1.0 + 0.05 * rng.standard_normal(shape)) - 0.4 * (lesion == 1)
    aff = np.diag([*zooms, 1.0])
    if orientation == "LAS":
        aff[0, 0] = -zooms[0]
    aff[:3, 3] = -aff[:3, :3] @ (np.array(shape) / 2)
    paths = {}
    for key, arr, dt in (("t1", t1, np.float32), ("flair", flair, np.float32), ("lesion", lesion, np.uint8)):
        paths[key] = str(folder / f"{name}_{key}.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(dt), aff), paths[key])
    return {"subject": name, **paths}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    rows = [make_subject(folder, f"s{i}", rng, orientation="LAS" if i % 2 else "RAS") for i in range(4)]
    table = pd.DataFrame(rows)
    table["group"] = ["a", "b", "a", "b"]
    return table


def tiny_cfg(**kw):
    base = dict(patch_size=(16, 16, 16), batch_size=2, samples_per_volume=2, epochs=1, iters_per_epoch=1,
                spacing=(4.0, 4.0, 4.0), model_overrides={"channels": (4, 8, 16, 32)})
    return training.TrainConfig(**{**base, **kw})


def test_split_is_deterministic_stratified_and_disjoint():
    table = pd.DataFrame({"subject": [f"s{i:02d}" for i in range(20)], "group": ["a"] * 10 + ["b"] * 10})
    s1 = training.make_split(table, val_fraction=0.2, test_fraction=0.2, seed=3)
    s2 = training.make_split(table, val_fraction=0.2, test_fraction=0.2, seed=3)
    s3 = training.make_split(table, val_fraction=0.2, test_fraction=0.2, seed=4)
    pd.testing.assert_frame_equal(s1, s2)
    assert not s1.equals(s3)
    assert s1["split"].value_counts().to_dict() == {"train": 12, "val": 4, "test": 4}
    assert (s1.groupby(["split", "group"]).size().loc["test"] == 2).all()
    assert sorted(s1["subject"]) == sorted(table["subject"])


def test_records_check_grids(cohort, tmp_path):
    recs = training.make_records(cohort, "t1+flair", "lesion")
    assert [len(r["image"]) for r in recs] == [2] * 4 and recs[0]["image"][1] == cohort["flair"][0]
    assert training.make_records(cohort, "flair", "lesion")[0]["image"] == [cohort["flair"][0]]
    bad = cohort.copy()
    bad.loc[0, "t1"] = make_subject(tmp_path, "odd", np.random.default_rng(1), shape=(30, 32, 32))["t1"]
    with pytest.raises(InputError, match="subject s0: t1 is not on the grid of FLAIR"):
        training.make_records(bad, "t1+flair", "lesion")


def test_pipeline_orientation_spacing_and_skeleton(cohort):
    cfg = tiny_cfg(spacing=(2.0, 2.0, 2.0))
    rec = training.make_records(cohort, "t1+flair", "lesion")[1]   # a LAS subject
    item = training.preprocessing(cfg.spacing, with_label=True)(rec)
    assert item["image"].shape == (2, 32, 32, 32)
    assert nib.aff2axcodes(item["image"].affine.numpy()) == ("R", "A", "S")
    # RAS flip of a LAS image: the label is mirrored along x
    lab = np.asanyarray(nib.load(rec["label"]).dataobj)
    assert np.array_equal(item["label"][0].numpy().astype(np.uint8), lab[::-1])
    brain = item["image"][1] != 0
    assert abs(float(item["image"][1][brain].mean())) < 1e-3 and abs(float(item["image"][1][brain].std()) - 1) < 1e-2
    patches = training.training_transforms(tiny_cfg())(rec)
    assert len(patches) == 2
    sample = patches[0]
    assert sample["image"].shape == (2, 16, 16, 16) and sample["skeleton"].shape == (1, 16, 16, 16)
    assert set(np.unique(sample["skeleton"].numpy())) <= {0, 1}


def test_one_step_training_checkpoint_roundtrip_and_resume(cohort, tmp_path):
    recs = training.make_records(cohort, "t1+flair", "lesion")
    cfg = tiny_cfg()
    out = training.train(cfg, recs[:3], recs[3:], tmp_path, progress=False)
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist["epoch"]) == [0] and np.isfinite(hist["loss"]).all() and 0 <= hist["val_dice"][0] <= 1
    model, config = training.load_checkpoint(out["best"], device="cpu")
    assert config["inputs"] == "t1+flair" and config["spacing"] == [4.0, 4.0, 4.0] and config["n_classes"] == 2
    assert config["training"]["epochs"] == 1 and config["versions"]["monai"] and config["val_subjects"] == ["s3"]
    saved = torch.load(out["best"], weights_only=False)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # resume: one more epoch continues from epoch 1 with the optimizer state
    out2 = training.train(tiny_cfg(epochs=2), recs[:3], recs[3:], tmp_path, resume=True, progress=False)
    assert list(out2["history"]["epoch"]) == [0, 1]
    assert torch.load(out2["last"], weights_only=False)["epoch"] == 1
    with pytest.raises(InputError, match="cannot resume"):
        training.train(tiny_cfg(epochs=3, inputs="flair"), recs[:3], recs[3:], tmp_path, resume=True, progress=False)


def test_region_mirroring_flips_left_right_and_swaps_labels():
    from monai.data import MetaTensor

    from wmloc_utils import atlas

    label = torch.zeros(1, 6, 4, 4)
    label[0, :3] = 1  # left half (RAS axis 0 runs left to right) is region 1, a left region
    label[0, 3:] = 19  # right half is region 19, a right region
    image = torch.arange(6.0)[None, :, None, None].expand(2, 6, 4, 4).clone()
    data = {"image": MetaTensor(image), "label": MetaTensor(label), "skeleton": MetaTensor(label.clone())}
    flipped = training.RandMirrord(["image", "label", "skeleton"], ["label", "skeleton"], atlas.mirror_labels(), prob=1.0)(data)
    np.testing.assert_array_equal(flipped["image"].numpy(), image.flip(1).numpy())
    out = flipped["label"][0].numpy()
    assert (out[:3] == 2).all() and (out[3:] == 18).all()  # left half now holds the mirror of region 19, and so on
    np.testing.assert_array_equal(flipped["skeleton"].numpy(), flipped["label"].numpy())
    kept = training.RandMirrord(["image", "label"], ["label"], atlas.mirror_labels(), prob=0.0)(data)
    assert torch.equal(kept["label"].as_tensor(), label)


def test_wrong_input_mode_is_refused():
    config = training.model_config(tiny_cfg(inputs="t1+flair"))
    training.check_inputs(config, "t1+flair")
    with pytest.raises(InputError, match="trained on inputs 't1\\+flair' \\(T1 \\+ FLAIR\\).*'flair'"):
        training.check_inputs(config, "flair")


def test_training_without_masks_says_how_to_apply_instead():
    import pandas as pd

    from wmloc_utils.images import InputError

    table = pd.DataFrame({"subject": ["a", "b", "c", "d"], "lesion": ["a.nii.gz", "", None, "d.nii.gz"]})
    with pytest.raises(InputError, match=r"2 of 4 subjects have a lesion mask.*lesion_checkpoint"):
        training.labelled_subjects(table)
    assert training.labelled_subjects(table, minimum=2)["subject"].tolist() == ["a", "d"]


# ----------------------------------------------------------------------------- robustness: brain masks, augmentation

@pytest.fixture(scope="module")
def headed(cohort, tmp_path_factory):
    """The tiny cohort with a bright 'scalp' shell around each brain, and each subject's brain mask."""
    folder = tmp_path_factory.mktemp("heads")
    rows = []
    for row in cohort.itertuples(index=False):
        flair = nib.load(row.flair)
        brain = np.asanyarray(flair.dataobj) > 0
        shell = ndimage.binary_dilation(brain, iterations=3) & ~ndimage.binary_dilation(brain, iterations=1)
        new = {"subject": row.subject, "lesion": row.lesion, "group": row.group}
        for key in ("t1", "flair"):
            img = nib.load(getattr(row, key))
            new[key] = str(folder / f"{row.subject}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) + 5.0 * shell, img.affine), new[key])
        new["brain"] = str(folder / f"{row.subject}_brain.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), flair.affine), new["brain"])
        rows.append(new)
    return pd.DataFrame(rows)


def test_brain_masked_preprocessing_ignores_the_scalp(headed):
    rec = training.make_records(headed, "t1+flair", "lesion", brain_col="brain")[0]
    assert rec["brain"] == headed["brain"][0]
    masked = training.preprocessing((2.0, 2.0, 2.0), with_label=True, brain=True)(rec)
    plain = training.preprocessing((2.0, 2.0, 2.0), with_label=True)(rec)
    inside = masked["brain"][0] > 0
    assert not masked["image"][:, ~inside].any(), "nothing outside the brain mask"
    flair = masked["image"][1][inside]
    assert abs(float(flair.mean())) < 0.05 and abs(float(flair.std()) - 1) < 0.05, "z-scored over brain voxels"
    assert plain["image"][:, ~inside].abs().max() > 1, "without the mask the scalp stays in"


def test_brain_masked_pipeline_needs_masks(headed, tmp_path):
    recs = training.make_records(headed, "t1+flair", "lesion")
    with pytest.raises(RuntimeError) as err:  # MONAI wraps a transform's error; the cause is ours
        training.training_transforms(tiny_cfg(brain_masked=True))(recs[0])
    assert isinstance(err.value.__cause__, InputError) and "subject s0: no brain mask" in str(err.value.__cause__)
    bad = headed.copy()
    other = tmp_path / "odd_brain.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((30, 32, 32), np.uint8), np.eye(4)), other)
    bad.loc[0, "brain"] = str(other)
    with pytest.raises(InputError, match="subject s0: brain is not on the grid of FLAIR"):
        training.make_records(bad, "t1+flair", "lesion", brain_col="brain")


def test_augment_sets(cohort):
    names = {aug: [type(t).__name__ for t in training.training_transforms(tiny_cfg(augment=aug)).transforms]
             for aug in training.AUGMENTATIONS}
    scanner = {"RandBiasFieldd", "RandAdjustContrastd", "RandHistogramShiftd", "RandGaussianNoised",
               "RandGaussianSmoothd", "RandSimulateLowResolutiond"}
    assert scanner <= set(names["scanner"]) and not scanner & set(names["basic"])
    assert names["basic"][-3:] == ["RandAffined", "RandScaleIntensityd", "RandShiftIntensityd"]
    assert training.TrainConfig().augment == "scanner"
    with pytest.raises(ValueError, match="augment must be one of"):
        tiny_cfg(augment="heavy")


def test_scanner_augmentation_keeps_background_zero_and_labels(cohort):
    rec = training.make_records(cohort, "t1+flair", "lesion")[0]
    cfg = tiny_cfg(augment="scanner", spacing=(2.0, 2.0, 2.0), samples_per_volume=4)
    transforms = training.training_transforms(cfg)
    transforms.set_random_state(0)
    for _ in range(3):
        for patch in transforms(rec):
            assert set(patch) >= {"image", "label", "skeleton"} and "foreground" not in patch
            assert patch["image"].shape == (2, 16, 16, 16)
            assert set(np.unique(patch["label"].numpy())) <= {0, 1, 2}
            background = patch["image"][0] == 0
            assert background.any() and not patch["image"][1][background].any(), "augmented noise off the brain"


def test_brain_masked_training_records_it_in_the_checkpoint(headed, tmp_path):
    recs = training.make_records(headed, "t1+flair", "lesion", brain_col="brain")
    out = training.train(tiny_cfg(brain_masked=True), recs[:3], recs[3:], tmp_path, progress=False)
    _, config = training.load_checkpoint(out["last"], "cpu")
    assert config["training"]["brain_masked"] is True and config["training"]["augment"] == "scanner"
