"""The paper authors' subject region maps: registry, hashed fetch (offline, from ../shared), id matching, scores."""

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pooch
import pytest

from wmloc_utils import authors_labels, fetch, registration, subjects
from wmloc_utils.errors import InputError

STAGED = ("0", "21", "50", "61", "100", "137")  # the six maps staged in ../shared/data/authors-labels/Train


def test_registry_lists_the_170_maps_with_sha256_and_urls():
    reg = authors_labels.registry()
    assert len(reg) == 170
    assert sum(name.startswith("Train/") for name in reg) == 60
    for name, entry in reg.items():
        assert len(entry.sha256) == 64
        assert entry.url == f"https://github.com/juliamachnio/WMHLocalization/raw/main/WMH_refined_labels/{name}"
    ids = [name.split("WMH_")[1].removesuffix(".nii.gz") for name in reg]
    assert len(set(ids)) == 170  # one split per id: looking in both is unambiguous


def test_registry_agrees_with_the_published_sums(authors_dir):
    sums = dict(reversed(line.split()) for line in (authors_dir / "SHA256SUMS").read_text().splitlines())
    assert {name: entry.sha256 for name, entry in authors_labels.registry().items()} == sums


def test_the_registry_file_is_package_data():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*.tsv" in pyproject["tool"]["setuptools"]["package-data"]["wmloc_utils"]


def test_folder_is_argument_then_env_then_data_dir_subfolder(monkeypatch, tmp_path):
    monkeypatch.setenv("WMLOC_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WMLOC_AUTHORS_LABELS", str(tmp_path / "env"))
    assert fetch.data_dir(tmp_path / "arg", fetch.AUTHORS_LABELS) == tmp_path / "arg"
    assert fetch.data_dir(collection=fetch.AUTHORS_LABELS) == tmp_path / "env"
    monkeypatch.delenv("WMLOC_AUTHORS_LABELS")
    assert fetch.data_dir(collection=fetch.AUTHORS_LABELS) == tmp_path / "data" / "authors-labels"


def test_staged_maps_verify_by_id_in_either_split(authors_dir):
    for cid in STAGED:
        path = authors_labels.fetch_map(cid, download=False)
        assert path == authors_dir / "Train" / f"WMH_{cid}.nii.gz"
    assert authors_labels.fetch_map(21, split="Train", download=False) == authors_dir / "Train" / "WMH_21.nii.gz"


def test_corrupt_copy_is_refused_naming_the_file(authors_dir, tmp_path):
    (tmp_path / "Train").mkdir()
    copy = tmp_path / "Train" / "WMH_0.nii.gz"
    shutil.copy(authors_dir / "Train" / "WMH_0.nii.gz", copy)
    with open(copy, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(fetch.DataError, match=r"WMH_0\.nii\.gz is corrupt or a different version.*SHA-256"):
        authors_labels.fetch_map("0", path=tmp_path)


def test_unpublished_id_names_the_id_and_the_files_looked_for():
    with pytest.raises(
        fetch.DataError,
        match=r"no region map for challenge id 170 \(looked for "
        r"Train/WMH_170\.nii\.gz and Test/WMH_170\.nii\.gz",
    ):
        authors_labels.fetch_map("170")
    with pytest.raises(authors_labels.NotPublishedError, match=r"looked for Test/WMH_0\.nii\.gz among"):
        authors_labels.fetch_map("0", split="Test")
    with pytest.raises(authors_labels.NotPublishedError, match="'sub-01': not a WMH challenge subject id"):
        authors_labels.fetch_map("sub-01")
    with pytest.raises(InputError, match="split='Validation'"):
        authors_labels.fetch_map("0", split="Validation")


def test_missing_map_downloads_into_its_split_folder_or_says_how_to_provide_it(monkeypatch, tmp_path, fake_download):
    seen = fake_download
    out = authors_labels.fetch_map("1", path=tmp_path)  # a test-set subject
    assert out == tmp_path / "Test" / "WMH_1.nii.gz"
    assert seen == {
        "url": authors_labels.registry()["Test/WMH_1.nii.gz"].url,
        "known_hash": "sha256:" + authors_labels.registry()["Test/WMH_1.nii.gz"].sha256,
    }

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(fetch.DataError) as err:
        authors_labels.fetch_map("2", path=tmp_path)
    msg = str(err.value)
    assert "Train/WMH_2.nii.gz" in msg and "WMLOC_AUTHORS_LABELS" in msg and "WMHLocalization/raw/main" in msg


def _challenge_folder(root, layout):
    """A fake challenge layout: ``<root>/<site>/<id>/pre/{T1,FLAIR}.nii.gz`` (tiny images)."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    for site, cid in layout:
        pre = root / site / cid / "pre"
        pre.mkdir(parents=True)
        for name in ("T1", "FLAIR"):
            nib.save(img, pre / f"{name}.nii.gz")
    return root


def test_attach_matches_challenge_folders_by_id(authors_dir, tmp_path):
    root = _challenge_folder(tmp_path / "wmh", [("Utrecht", "0"), ("Singapore", "21")])
    for site_prefix, ids in ((False, ["21", "0"]), (True, ["Singapore_21", "Utrecht_0"])):
        found = subjects.discover(root, site_prefix=site_prefix)
        table = pd.DataFrame({"subject": [s.id for s in found], "site": [s.site for s in found]})
        out = authors_labels.attach(table, download=False)
        assert out["subject"].tolist() == ids
        assert out["authors_regions"].tolist() == [str(authors_dir / "Train" / f"WMH_{i}.nii.gz") for i in ("21", "0")]


def test_attach_refuses_or_leaves_empty_a_subject_without_a_map(authors_dir):
    table = pd.DataFrame({"subject": ["0", "Other_21", "999"], "site": ["Utrecht", "Singapore", ""]})
    with pytest.raises(authors_labels.NotPublishedError, match="'Other_21': not a WMH challenge subject id"):
        authors_labels.attach(table, download=False)
    out = authors_labels.attach(table, download=False, missing="empty")
    assert out["authors_regions"].tolist() == [str(authors_dir / "Train" / "WMH_0.nii.gz"), "", ""]


def test_challenge_id_strips_only_its_own_site_prefix():
    assert authors_labels.challenge_id("21") == "21"
    assert authors_labels.challenge_id(" 7 ") == "7"
    with pytest.raises(InputError, match="'001': not a WMH challenge subject id"):
        authors_labels.challenge_id("001")  # a demo cohort's id
    assert authors_labels.challenge_id("GE3T_100", site="GE3T") == "100"
    with pytest.raises(InputError, match="GE3T_<number>"):
        authors_labels.challenge_id("Utrecht_0", site="GE3T")


def _perturbed(img, shift=2):
    """The map with its labels moved ``shift`` voxels along the first axis."""
    data = np.roll(np.asanyarray(img.dataobj), shift, axis=0)
    return nib.Nifti1Image(data, img.affine, img.header)


def test_score_is_one_against_itself_and_less_against_a_perturbed_map(authors_dir):
    theirs = nib.load(authors_dir / "Train" / "WMH_0.nii.gz")
    same = authors_labels.score(theirs, theirs)
    assert same["mean"] == pytest.approx(1.0) and same["wm"] == pytest.approx(1.0)
    assert same.loc[list(range(1, 35))].dropna().eq(1.0).all()
    moved = authors_labels.score(_perturbed(theirs), theirs)
    assert 0.3 < moved["mean"] < 0.99 and moved["wm"] < 1.0
    other = nib.load(authors_dir / "Train" / "WMH_21.nii.gz")  # another scanner's grid
    with pytest.raises(
        InputError,
        match="subject 0: the registered region map is not on the grid of the authors'.*"
        "is this subject the WMH challenge subject of that id",
    ):
        authors_labels.score(other, theirs, subject="0")


def test_attach_authors_regions_scores_ours_and_switches_the_targets(authors_dir, tmp_path):
    theirs = authors_dir / "Train" / "WMH_0.nii.gz"
    ours = tmp_path / "regions.nii.gz"
    nib.save(_perturbed(nib.load(theirs)), ours)
    qc = pd.DataFrame(
        {
            "subject": ["0", "21"],
            "regions": [str(ours), str(authors_dir / "Train" / "WMH_21.nii.gz")],
            "wm_dice": [0.7, 0.7],
        }
    )
    cohort = pd.DataFrame({"subject": ["21", "0"], "site": ["Singapore", "Utrecht"]})
    kept = registration.attach_authors_regions(qc, cohort, targets="registered")
    assert kept["regions"].tolist() == qc["regions"].tolist()
    assert kept["authors_dice"].iloc[0] < 0.99 and kept["authors_dice"].iloc[1] == pytest.approx(1.0)
    assert kept["authors_wm_dice"].iloc[1] == pytest.approx(1.0)
    switched = registration.attach_authors_regions(kept, cohort, targets="authors")
    assert switched["regions"].tolist() == [str(theirs), str(authors_dir / "Train" / "WMH_21.nii.gz")]
    assert switched["registered_regions"].tolist() == qc["regions"].tolist()  # ours, even on a second pass
    assert switched["region_targets"].eq("authors").all()
    with pytest.raises(InputError, match="targets='atlas'"):
        registration.attach_authors_regions(qc, cohort, targets="atlas")


def test_run_cohort_refuses_an_unknown_region_target(tmp_path):
    with pytest.raises(InputError, match="region_targets='network'"):
        registration.run_cohort(tmp_path / "subjects.csv", tmp_path, region_targets="network")


def test_run_cohort_hands_on_the_authors_maps_with_their_dice(authors_dir, tmp_path, monkeypatch):
    """region_targets="authors": regions.csv names the authors' maps as ``regions``, ours as ``registered_regions``."""
    import json

    theirs = {cid: str(authors_dir / "Train" / f"WMH_{cid}.nii.gz") for cid in ("0", "21")}
    ours = {"0": tmp_path / "ours_0.nii.gz", "21": theirs["21"]}
    nib.save(_perturbed(nib.load(theirs["0"])), ours["0"])

    def fake(subject, t1, flair, outdir, atlas, fingerprint=None, **kw):
        qc = {"subject": subject, "regions": str(ours[subject]), "fingerprint": fingerprint}
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / registration.DONE).write_text(json.dumps(qc))
        return qc

    monkeypatch.setattr(registration, "process_subject", fake)
    monkeypatch.setattr(registration, "atlas_inputs", lambda workdir=None, data_dir=None: {})
    csv = tmp_path / "subjects.csv"
    pd.DataFrame(
        {
            "subject": ["0", "21"],
            "site": ["Utrecht", "Singapore"],
            "t1": ["a", "b"],
            "flair": ["c", "d"],
            "lesion": ["", ""],
            "truth_dir": ["", ""],
        }
    ).to_csv(csv, index=False)
    registration.run_cohort(csv, tmp_path, progress=False, n_jobs=1, region_targets="authors")
    saved = pd.read_csv(tmp_path / "03_regions" / "regions.csv", dtype={"subject": str})
    assert saved["regions"].tolist() == [theirs["0"], theirs["21"]]
    assert saved["registered_regions"].tolist() == [str(ours["0"]), theirs["21"]]
    assert saved["authors_dice"].iloc[0] < 0.99 and saved["authors_dice"].iloc[1] == pytest.approx(1.0)
    mine = registration.run_cohort(csv, tmp_path, progress=False, n_jobs=1)  # back to ours: the plain table
    assert mine["regions"].tolist() == [str(ours["0"]), theirs["21"]] and "authors_regions" not in mine
