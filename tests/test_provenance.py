"""Fingerprints: what counts as a change (mtime, size, header, content, path, parameters, version), and writes
that only happen when the content changes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from wmloc_utils import provenance
from wmloc_utils.images import like


@pytest.fixture
def image(tmp_path):
    """A small 1x1x3 mm LAS image on disk."""
    aff = np.diag([-1.0, 1.0, 3.0, 1.0])
    img = like(nib.Nifti1Image(np.zeros((6, 7, 5), np.float32), aff), np.arange(210, dtype=np.float32).reshape(6, 7, 5))
    path = tmp_path / "flair.nii.gz"
    nib.save(img, path)
    return path


def _fp(path, **params):
    return provenance.fingerprint({"FLAIR": path}, params or {"method": "Affine"})


def test_unchanged_file_has_no_change(image):
    assert provenance.changes(_fp(image), _fp(image)) == []


def test_touch_is_a_change_unless_contents_are_hashed(image):
    before, before_full = _fp(image), provenance.fingerprint({"FLAIR": image}, {}, full_hash=True)
    _touch(image)
    assert provenance.changes(before, _fp(image)) == ["FLAIR changed (mtime)"]
    assert provenance.changes(before_full, provenance.fingerprint({"FLAIR": image}, {}, full_hash=True)) == []


def test_header_edit_with_same_size_and_mtime_is_seen(image):
    """A new affine written in place with the old mtime restored (e.g. ``touch -r``) still counts."""
    before = _fp(image)
    st = image.stat()
    img = nib.load(image)
    data = np.asanyarray(img.dataobj)
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(like(nib.Nifti1Image(data, shifted), data), image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "header" in provenance.changes(before, _fp(image))[0]


def test_replaced_file_and_other_path_and_params_and_version(image, tmp_path):
    before = _fp(image)
    nib.save(like(nib.load(image), np.ones((6, 7, 5), np.float32)), image)
    assert provenance.changes(before, _fp(image))[0].startswith("FLAIR changed (")
    other = tmp_path / "other.nii.gz"
    other.write_bytes(image.read_bytes())
    assert "another file" in provenance.changes(_fp(image), _fp(other))[0]
    assert provenance.changes(_fp(image, method="Affine"), _fp(image, method="SyN")) == [
        "method changed ('Affine' -> 'SyN')"
    ]
    old = dict(_fp(image), version="0.0.1")
    assert provenance.changes(old, _fp(image))[0].startswith("wmloc version changed (0.0.1 ->")
    assert provenance.changes(None, _fp(image)) == ["no fingerprint (made by an older wmloc or interrupted)"]


def test_upstream_artefacts_and_missing_files(image, tmp_path):
    atlas = tmp_path / "refined_atlas.nii.gz"

    def fp():
        return provenance.fingerprint({"FLAIR": image}, {}, provenance.upstream_fingerprints({"refined atlas": atlas}))

    before = fp()
    assert before["upstream"]["refined atlas"]["missing"]
    atlas.write_bytes(image.read_bytes())
    after = fp()
    assert provenance.changes(before, after) == ["refined atlas appeared"]
    assert provenance.changes(after, provenance.fingerprint({"FLAIR": image}, {})) == ["refined atlas no longer used"]
    # upstream artefacts are compared by content: rewritten with the same bytes, they change nothing
    atlas.unlink()
    atlas.write_bytes(image.read_bytes())
    _touch(atlas)
    assert provenance.changes(after, fp()) == []
    atlas.write_bytes(image.read_bytes() + b"\0")
    assert provenance.changes(after, fp()) == ["refined atlas changed (content)"]


def _touch(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_outputs_changed(image):
    recorded = {"flair.nii.gz": provenance.file_fingerprint(image)}
    assert provenance.outputs_changed(recorded) == []
    image.unlink()
    assert provenance.outputs_changed(recorded) == ["flair.nii.gz missing"]


def test_table_written_only_when_its_text_changes(tmp_path):
    path = tmp_path / "regions.csv"
    table = pd.DataFrame({"subject": ["001", "002"], "wm_dice": [0.71, 0.68]})
    assert provenance.write_table_if_changed(table, path, index=False)
    mtime = path.stat().st_mtime_ns
    assert not provenance.write_table_if_changed(table.copy(), path, index=False)
    assert path.stat().st_mtime_ns == mtime
    assert provenance.write_table_if_changed(table.assign(wm_dice=[0.71, 0.69]), path, index=False)
    assert pd.read_csv(path)["wm_dice"].tolist() == [0.71, 0.69]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions.csv"], "no temporary file left behind"
