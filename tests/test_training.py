"""Split, MONAI pipeline, one-step training on a tiny synthetic cohort, checkpoint round-trip and resume."""

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from wmloc_utils import checkpoints, training
from wmloc_utils.errors import InputError
from wmloc_utils.networks import ARCHITECTURES


def make_subject(folder, name, rng, shape=(32, 32, 32), zooms=(2.0, 2.0, 2.0), orientation="RAS"):
    """A tiny brain-like ellipsoid with bright FLAIR blobs (label 1), one label-2 blob, on a RAS or LAS grid."""
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (ijk**2).sum(0) < 0.8
    lesion = np.zeros(shape, np.uint8)
    for _ in range(3):
        c = rng.integers([s // 4 for s in shape], [3 * s // 4 for s in shape])
        lesion[tuple(slice(ci - 2, ci + 2) for ci in c)] = 1
    lesion[shape[0] // 2 - 1 : shape[0] // 2 + 1, 2 + shape[1] // 4 : 4 + shape[1] // 4, shape[2] // 2] = 2
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
    base = dict(
        patch_size=(16, 16, 16),
        batch_size=2,
        samples_per_volume=2,
        epochs=1,
        iters_per_epoch=1,
        spacing=(4.0, 4.0, 4.0),
        model_overrides={"channels": (4, 8, 16, 32)},
    )
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
    maps = cohort.assign(tissue=cohort["t1"], prob_wm=cohort["flair"])  # inputs="tissue": notebook 03's maps
    assert training.make_records(maps, "tissue", "lesion")[0]["image"] == [cohort["t1"][0], cohort["flair"][0]]
    with pytest.raises(InputError, match="subject s0: prob_wm image missing"):
        training.make_records(cohort.assign(tissue=cohort["t1"]), "tissue", "lesion")
    bad = cohort.copy()
    bad.loc[0, "t1"] = make_subject(tmp_path, "odd", np.random.default_rng(1), shape=(30, 32, 32))["t1"]
    with pytest.raises(InputError, match="subject s0: t1 is not on the grid of FLAIR"):
        training.make_records(bad, "t1+flair", "lesion")


def test_pipeline_orientation_spacing_and_skeleton(cohort):
    cfg = tiny_cfg(spacing=(2.0, 2.0, 2.0))
    rec = training.make_records(cohort, "t1+flair", "lesion")[1]  # a LAS subject
    item = checkpoints.preprocessing(cfg.spacing, with_label=True)(rec)
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
    model, config = checkpoints.load_checkpoint(out["best"], device="cpu")
    assert config["inputs"] == "t1+flair" and config["spacing"] == [4.0, 4.0, 4.0] and config["n_classes"] == 2
    assert config["training"]["epochs"] == 1 and config["versions"]["monai"] and config["val_subjects"] == ["s3"]
    saved = torch.load(out["best"], weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # resume: one more epoch continues from epoch 1 with the optimizer state
    out2 = training.train(tiny_cfg(epochs=2), recs[:3], recs[3:], tmp_path, resume=True, progress=False)
    assert list(out2["history"]["epoch"]) == [0, 1]
    assert torch.load(out2["last"], weights_only=True)["epoch"] == 1
    with pytest.raises(InputError, match="cannot resume"):
        training.train(tiny_cfg(epochs=3, inputs="flair"), recs[:3], recs[3:], tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_trains_and_reloads_from_its_checkpoint(cohort, tmp_path, name):
    if name == "unetr":
        pytest.importorskip("einops", reason="UNETR needs einops")
    recs = training.make_records(cohort, "t1+flair", "lesion")
    cfg = tiny_cfg(architecture=name, patch_size=(32, 32, 32), spacing=(2.0, 2.0, 2.0), model_overrides={})
    out = training.train(cfg, recs[:2], recs[3:], tmp_path, progress=False)
    model, config = checkpoints.load_checkpoint(out["best"], device="cpu")
    assert config["architecture"] == name and np.isfinite(out["history"]["loss"]).all()
    saved = torch.load(out["best"], weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_paper_presets_make_valid_configs_of_full_size_networks():
    assert set(training.PAPER_PRESETS) == set(ARCHITECTURES)
    for name, tasks in training.PAPER_PRESETS.items():
        assert set(tasks) == set(training.TASKS)
        for task, preset in tasks.items():
            cfg = training.TrainConfig(**preset)
            assert cfg.spacing == (1.0,) * 3 and cfg.patch_size == (128,) * 3 and cfg.epochs >= 100
            config = training.model_config(cfg)  # checks every override against the network's signature
            with torch.device("meta"):  # the full network, without allocating its weights
                model = training.build_model(name, config["in_channels"], config["n_classes"], **config["model_kwargs"])
            assert sum(p.numel() for p in model.parameters()) > 5e6, (name, task)


def test_region_mirroring_flips_left_right_and_swaps_labels():
    from monai.data import MetaTensor

    from wmloc_utils import atlas

    label = torch.zeros(1, 6, 4, 4)
    label[0, :3] = 1  # left half (RAS axis 0 runs left to right) is region 1, a left region
    label[0, 3:] = 19  # right half is region 19, a right region
    image = torch.arange(6.0)[None, :, None, None].expand(2, 6, 4, 4).clone()
    data = {"image": MetaTensor(image), "label": MetaTensor(label), "skeleton": MetaTensor(label.clone())}
    flipped = training.RandMirrord(
        ["image", "label", "skeleton"], ["label", "skeleton"], atlas.mirror_labels(), prob=1.0
    )(data)
    np.testing.assert_array_equal(flipped["image"].numpy(), image.flip(1).numpy())
    out = flipped["label"][0].numpy()
    assert (out[:3] == 2).all() and (out[3:] == 18).all()  # left half now holds the mirror of region 19, and so on
    np.testing.assert_array_equal(flipped["skeleton"].numpy(), flipped["label"].numpy())
    kept = training.RandMirrord(["image", "label"], ["label"], atlas.mirror_labels(), prob=0.0)(data)
    assert torch.equal(kept["label"].as_tensor(), label)


def test_wrong_input_mode_is_refused():
    config = training.model_config(tiny_cfg(inputs="t1+flair"))
    checkpoints.check_inputs(config, "t1+flair")
    with pytest.raises(InputError, match="trained on inputs 't1\\+flair' \\(T1 \\+ FLAIR\\).*'flair'"):
        checkpoints.check_inputs(config, "flair")


def test_training_without_masks_says_how_to_apply_instead():
    import pandas as pd

    from wmloc_utils.errors import InputError

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
    masked = checkpoints.preprocessing((2.0, 2.0, 2.0), with_label=True, brain=True)(rec)
    plain = checkpoints.preprocessing((2.0, 2.0, 2.0), with_label=True)(rec)
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
    names = {
        aug: [type(t).__name__ for t in training.training_transforms(tiny_cfg(augment=aug)).transforms]
        for aug in training.AUGMENTATIONS
    }
    scanner = {
        "RandBiasFieldd",
        "RandAdjustContrastd",
        "RandHistogramShiftd",
        "RandGaussianNoised",
        "RandGaussianSmoothd",
        "RandSimulateLowResolutiond",
    }
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


def test_tissue_contrast_shifts_each_class_of_each_channel_by_its_own_offset():
    """Inside each tissue class the shift is one constant per channel; the background stays zero."""
    tissue = torch.zeros((1, 24, 24, 24), dtype=torch.int16)
    tissue[0, 2:22, 2:22, 2:22] = 1
    tissue[0, 4:20, 4:20, 4:20] = 2
    tissue[0, 8:16, 8:16, 8:16] = 3
    image = torch.where(tissue > 0, 1.0, 0.0).repeat(2, 1, 1, 1)
    aug = training.RandTissueContrastd("image", max_offset=1.0, prob=1.0)
    aug.set_random_state(3)
    out = aug({"image": image.clone(), "tissue": tissue})
    assert "tissue" not in out
    shift = out["image"] - image
    assert not out["image"][:, tissue[0] == 0].any(), "the background stays zero"
    cores = {
        1: (slice(2, 3), slice(2, 22), slice(2, 22)),
        2: (slice(5, 6), slice(5, 19), slice(5, 19)),
        3: (slice(11, 13), slice(11, 13), slice(11, 13)),
    }  # a voxel or more from other classes
    offsets = np.array([[float(shift[c][cores[k]].mean()) for k in (1, 2, 3)] for c in range(2)])
    assert np.abs(offsets).max() <= 1.0 and len(np.unique(offsets.round(3))) == 6, offsets
    assert float(shift[0][cores[3]].std()) < 1e-4, "one offset for the class, smooth only at its borders"
    unchanged = training.RandTissueContrastd("image", prob=0.0)({"image": image.clone(), "tissue": tissue})
    assert torch.equal(unchanged["image"], image)


def test_tissue_augmentation_needs_tissue_maps(headed, tmp_path):
    table = headed.copy()
    table["tissue"] = table["brain"]  # any label map on the FLAIR grid will do here: one tissue class
    rec = training.make_records(table, "t1+flair", "lesion", brain_col="brain", tissue_col="tissue")[0]
    assert rec["tissue"] == table["tissue"][0]
    cfg = tiny_cfg(augment="tissue", brain_masked=True, spacing=(2.0, 2.0, 2.0), samples_per_volume=2)
    transforms = training.training_transforms(cfg)
    transforms.set_random_state(0)
    for patch in transforms(rec):
        assert "tissue" not in patch and patch["image"].shape == (2, 16, 16, 16)
    plain = training.make_records(table, "t1+flair", "lesion", brain_col="brain")[0]
    with pytest.raises(RuntimeError) as err:
        transforms(plain)
    assert isinstance(err.value.__cause__, InputError) and "subject s0: no tissue map" in str(err.value.__cause__)


def test_brain_masked_training_records_it_in_the_checkpoint(headed, tmp_path):
    recs = training.make_records(headed, "t1+flair", "lesion", brain_col="brain")
    out = training.train(tiny_cfg(brain_masked=True), recs[:3], recs[3:], tmp_path, progress=False)
    _, config = checkpoints.load_checkpoint(out["last"], "cpu")
    assert config["training"]["brain_masked"] is True and config["training"]["augment"] == "scanner"


# ----------------------------------------------------------------------------- safe checkpoints


def _types(obj):
    """Every container/scalar type in a nested structure (tensors excluded)."""
    if isinstance(obj, dict):
        return {dict}.union(*(_types(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return {type(obj)}.union(*(_types(v) for v in obj))
    return set() if isinstance(obj, torch.Tensor) else {type(obj)}


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """A one-epoch run: its folder holds best.pt, last.pt and history.csv."""
    out = tmp_path_factory.mktemp("trained")
    recs = training.make_records(cohort, "t1+flair", "lesion")
    training.train(tiny_cfg(), recs[:3], recs[3:], out, progress=False)
    return out


def test_checkpoints_are_plain_data_and_load_weights_only(trained):
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(trained / name, map_location="cpu", weights_only=True)  # no allow-listed globals
        assert _types(ckpt["config"]) <= {dict, list, str, int, float, bool, type(None)}, name
        assert type(ckpt["config"]["versions"]["torch"]) is str and ckpt["config"]["patch_size"] == [16, 16, 16]
    last = torch.load(trained / "last.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(last) and last["optimizer"]["state"]
    plain = checkpoints.plain_data({"x": (np.float32(0.5), np.int64(3), torch.__version__)})
    assert plain == {"x": [0.5, 3, torch.__version__]} and [type(v) for v in plain["x"]] == [float, int, str]
    with pytest.raises(TypeError, match=r"config\['a'\]\[1\]: object is not plain data"):
        checkpoints.plain_data({"a": [1, object()]})


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    path = tmp_path / "best.pt"
    torch.save({"config": {"architecture": "unet"}, "model": {}, "extra": Payload()}, path)
    with pytest.raises(
        InputError,
        match=r"best\.pt: not loaded: the file holds Python objects beyond tensors and "
        r"plain data \(GLOBAL .*exec\)",
    ):
        checkpoints.load_checkpoint(path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "zeroed"])
def test_corrupt_checkpoint_names_the_file(trained, tmp_path, damage):
    data = (trained / "last.pt").read_bytes()
    bad = {
        "truncated": data[: len(data) // 2],
        "garbage": b"not a checkpoint" * 8,
        "empty": b"",
        "zeroed": data[:200] + b"\0" * 60 + data[260:],
    }[damage]
    path = tmp_path / "last.pt"
    path.write_bytes(bad)
    with pytest.raises(InputError, match=rf"{path}: not loaded: corrupt"):
        checkpoints.load_checkpoint(path, device="cpu")
    with pytest.raises(InputError, match=rf"{path}: not loaded: corrupt"):
        training.train(tiny_cfg(), [{"subject": "s"}], [], tmp_path, resume=True, progress=False)


def test_checkpoint_of_older_versions_still_loads(tmp_path):
    """Before configs were plain data they held tuples and torch's TorchVersion string."""
    config = training.model_config(tiny_cfg())
    config["model_kwargs"]["channels"] = tuple(config["model_kwargs"]["channels"])
    config["versions"]["torch"] = torch.__version__
    assert type(config["versions"]["torch"]) is not str
    model = training.build_model("unet", 2, 2, **config["model_kwargs"])
    torch.save({"config": config, "model": model.state_dict()}, tmp_path / "old.pt")
    loaded, cfg = checkpoints.load_checkpoint(tmp_path / "old.pt", device="cpu")
    assert cfg["model_kwargs"]["channels"] == (4, 8, 16, 32)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- training that goes wrong


def test_nan_voxels_stop_training_naming_epoch_step_and_subject(cohort, tmp_path):
    rows = cohort.copy()
    img = nib.load(rows.loc[1, "flair"])
    data = np.asanyarray(img.dataobj).copy()
    data[16, 16, 16] = np.nan
    rows.loc[1, "flair"] = str(tmp_path / "nan_flair.nii.gz")
    nib.save(nib.Nifti1Image(data, img.affine), rows.loc[1, "flair"])
    recs = training.make_records(rows, "t1+flair", "lesion")
    with pytest.raises(InputError, match=r"epoch 0, step 1 of 1: the loss is nan .*subject\(s\) s1 hold non-finite"):
        training.train(tiny_cfg(), recs[1:2], [], tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_infinite_loss_blames_learning_rate(cohort, tmp_path, monkeypatch):
    recs = training.make_records(cohort, "t1+flair", "lesion")
    terms = training.SegLoss.terms
    monkeypatch.setattr(training.SegLoss, "terms", lambda self, *a: {**terms(self, *a), "dice": torch.tensor(np.inf)})
    with pytest.raises(InputError, match=r"epoch 0, step 1 of 1: the loss is inf .*lr=0.003 is likely too high"):
        training.train(tiny_cfg(), recs[:1], [], tmp_path, progress=False)
    assert not list(tmp_path.glob("*.pt"))


def test_non_finite_weights_are_never_saved(cohort, tmp_path, monkeypatch):
    recs = training.make_records(cohort, "t1+flair", "lesion")
    step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(np.nan)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(InputError, match=r"end of epoch 0: the weights hold non-finite values \(.*weight"):
        training.train(tiny_cfg(), recs[:2], recs[3:], tmp_path, progress=False)
    assert not list(tmp_path.glob("*.pt"))


# ----------------------------------------------------------------------------- resume


def test_resume_after_interruption_equals_a_straight_run(cohort, tmp_path, monkeypatch):
    """Killed in epoch 1, then resumed: the weights and history of a straight run (dropout uses torch's RNG)."""
    recs = training.make_records(cohort, "t1+flair", "lesion")
    cfg = tiny_cfg(epochs=3, iters_per_epoch=2, model_overrides={"channels": (4, 8, 16, 32), "dropout": 0.2})
    straight = training.train(cfg, recs[:3], recs[3:], tmp_path / "straight", progress=False)

    validate, calls = training.validate, []

    def killed_in_epoch_1(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*args)

    monkeypatch.setattr(training, "validate", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, recs[:3], recs[3:], tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(training, "validate", validate)
    resumed = training.train(cfg, recs[:3], recs[3:], tmp_path / "resumed", resume=True, progress=False)

    a, b = (torch.load(out["last"], weights_only=True) for out in (straight, resumed))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    cols = ["epoch", "loss", "ce", "dice", "skeleton", "val_dice", "lr"]
    pd.testing.assert_frame_equal(straight["history"][cols], resumed["history"][cols], check_exact=True)
    assert a["best_dice"] == b["best_dice"]
    for name in ("best.pt", "last.pt"):  # byte-identical files, interrupted or not (timings live in history.csv)
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert resumed["history"]["seconds"].notna().all()


# ----------------------------------------------------------------------------- disk errors


@pytest.mark.parametrize(
    "code, problem", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left on device")]
)
def test_disk_errors_name_the_path_and_leave_no_temp_files(cohort, tmp_path, monkeypatch, code, problem):
    recs = training.make_records(cohort, "t1+flair", "lesion")
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)  # half the work done, then the disk fails
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'best.pt'}: {problem}"):
        training.train(tiny_cfg(), recs[:3], recs[3:], tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # no half-written checkpoint, no temporary file
    monkeypatch.setattr(torch, "save", save)
    replace = os.replace
    monkeypatch.setattr(
        os,
        "replace",
        lambda src, dst: (
            (_ for _ in ()).throw(OSError(code, os.strerror(code)))
            if str(dst).endswith("history.csv")
            else replace(src, dst)
        ),
    )
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'history.csv'}: {problem}"):
        training.train(tiny_cfg(), recs[:3], recs[3:], tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_stale_temp_files_of_a_killed_run_are_removed(cohort, tmp_path):
    stale = [tmp_path / n for n in (".last-abc123.pt", ".best-x_1.pt", ".history-q9.csv")]
    keep = [tmp_path / n for n in (".other-abc.pt", "last-notes.txt", ".lastly.pt")]
    for p in stale + keep:
        p.write_bytes(b"half a checkpoint")
    recs = training.make_records(cohort, "t1+flair", "lesion")
    training.train(tiny_cfg(), recs[:3], recs[3:], tmp_path, progress=False)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert {"best.pt", "last.pt", "history.csv"} <= {p.name for p in tmp_path.iterdir()}


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    config = training.model_config(tiny_cfg())
    other = training.build_model("unet", 2, 2, channels=(4, 8, 16, 64))
    torch.save({"config": config, "model": other.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(InputError, match=r"best\.pt: its weights do not fit the unet network its config describes"):
        checkpoints.load_checkpoint(tmp_path / "best.pt", device="cpu")


def test_cached_images_keep_every_channel_with_workers(cohort):
    """Caching used to run in cfg.num_workers threads, where LoadImaged now and then dropped a channel."""
    recs = training.make_records(cohort, "t1+flair", "lesion")
    for _ in range(5):
        train_ds, val_ds = training.cached_datasets(tiny_cfg(num_workers=2), recs[:3], recs[3:])
        assert [item["image"].shape[0] for item in [*train_ds._cache, *val_ds._cache]] == [2] * 4


def test_a_finished_run_is_reused_and_writes_nothing_unless_its_configuration_changed(cohort, tmp_path):
    recs = training.make_records(cohort, "t1+flair", "lesion")
    first = training.train(tiny_cfg(), recs[:3], recs[3:], tmp_path, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = training.train(tiny_cfg(device="cpu", num_workers=0), recs[:3], recs[3:], tmp_path, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    assert again["best_dice"] == first["best_dice"] and again["history"].equals(first["history"])
    training.train(tiny_cfg(lr=1e-4), recs[:3], recs[3:], tmp_path, progress=False)  # another lr: trained again
    assert (tmp_path / "last.pt").stat().st_mtime_ns != stamps["last.pt"]
    training.train(tiny_cfg(lr=1e-4), recs[:2], recs[3:], tmp_path, progress=False)  # other subjects: again
    assert checkpoints.read_checkpoint(tmp_path / "last.pt")["config"]["train_subjects"] == ["s0", "s1"]
    # the same bytes under another path are the same data; other bytes (e.g. a bias-corrected FLAIR) are not
    flair = nib.load(recs[0]["image"][1])
    moved = [{**r, "image": list(r["image"])} for r in recs]
    moved[0]["image"][1] = str(tmp_path.parent / "copy.nii.gz")
    Path(moved[0]["image"][1]).write_bytes(Path(recs[0]["image"][1]).read_bytes())
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    training.train(tiny_cfg(lr=1e-4), moved[:2], moved[3:], tmp_path, progress=False)
    assert (tmp_path / "last.pt").stat().st_mtime_ns == stamp, "same bytes: reused"
    nib.save(nib.Nifti1Image(flair.get_fdata().astype(np.float32) * 1.01, flair.affine), moved[0]["image"][1])
    training.train(tiny_cfg(lr=1e-4), moved[:2], moved[3:], tmp_path, progress=False)
    assert (tmp_path / "last.pt").stat().st_mtime_ns != stamp, "another image: trained again"
