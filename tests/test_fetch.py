"""The data directory setting and the hashed fetcher of the JHU Eve atlas files."""

import shutil

import pooch
import pytest

from wmloc_utils import fetch

NAME = "JHU_MNI_SS_WMPM_Type-II_SlicerLUT.txt"


def test_registry_lists_the_eve_files_with_sha256_and_urls():
    reg = fetch.registry()
    assert len(reg) == 5
    for entry in reg.values():
        assert len(entry.sha256) == 64 and entry.url.startswith("https://github.com/muschellij2/Eve_Atlas/raw/master/")


def test_data_dir_argument_beats_env_beats_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WMLOC_DATA", str(tmp_path / "env"))
    assert fetch.data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert fetch.data_dir() == tmp_path / "env"
    monkeypatch.delenv("WMLOC_DATA")
    assert fetch.data_dir() == pooch.os_cache("wmloc")


def test_staged_files_verify(eve_dir):
    paths = fetch.fetch_all()
    assert all(p.parent == eve_dir and p.exists() for p in paths.values())


def test_hash_mismatch_is_refused_with_a_clear_message(eve_dir, tmp_path):
    shutil.copy(eve_dir / NAME, tmp_path / NAME)
    with open(tmp_path / NAME, "a") as fh:
        fh.write("tampered\n")
    with pytest.raises(fetch.DataError, match="corrupt or a different version.*SHA-256"):
        fetch.fetch(NAME, tmp_path)


def test_offline_error_names_file_folder_and_remedy(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(fetch.DataError) as err:
        fetch.fetch(NAME, tmp_path)
    msg = str(err.value)
    assert NAME in msg and str(tmp_path) in msg and "WMLOC_DATA" in msg and "https://github.com" in msg


def test_download_goes_through_pooch_with_the_registered_hash(tmp_path, fake_download):
    seen = fake_download
    out = fetch.fetch(NAME, tmp_path / "cache")
    assert out == tmp_path / "cache" / NAME
    assert seen["known_hash"] == "sha256:" + fetch.registry()[NAME].sha256


def test_unknown_name_is_refused():
    with pytest.raises(fetch.DataError, match="not a registered"):
        fetch.fetch("nope.nii.gz")
