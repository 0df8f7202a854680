"""The bring-your-own-cohort path: pairings chosen from what a cohort has, the command line's errors, withheld masks."""

from __future__ import annotations

import pandas as pd
import pytest

from wmloc_utils import apply, demo
from wmloc_utils.errors import InputError


def test_pairings_without_masks_are_automatic_only():
    recs = pd.DataFrame(
        {"subject": ["a"], "lesion": [""], "lesion_pred": ["p"], "regions": ["r"], "regions_pred": ["n"]}
    )
    assert apply.pairings(recs) == {"automatic": ("lesion_pred", "regions")}
    assert apply.pairings(recs, "network") == {"automatic": ("lesion_pred", "regions_pred")}
    recs["lesion"] = "m"
    assert set(apply.pairings(recs)) == {"automatic", "reference", "lesion_pred", "predicted"}
    with pytest.raises(InputError, match="needs the column 'regions_pred'"):
        apply.pairings(recs.drop(columns="regions_pred"), "network")
    with pytest.raises(InputError, match="region_source must be one of"):
        apply.pairings(recs, "both")


def test_command_line_names_the_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"wmloc-apply: .*nowhere: no such file or folder"):
        apply.main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--lesion-checkpoint", "x.pt"])
    with pytest.raises(SystemExit, match="region_source='network' needs a region checkpoint"):
        apply.main([str(tmp_path), str(tmp_path / "out"), "--lesion-checkpoint", "x.pt", "--region-source", "network"])


def test_withheld_masks_leave_a_cohort_without_masks(tmp_path):
    demo.generate(tmp_path / "data", n_subjects=2, progress=False)
    withheld = demo.withhold_masks(tmp_path / "data", tmp_path / "withheld")
    assert sorted(withheld) == sorted(p.name for p in (tmp_path / "data").glob("*/*") if p.is_dir())
    assert not list((tmp_path / "data").glob("*/*/wmh.nii.gz"))
    assert demo.withhold_masks(tmp_path / "data", tmp_path / "withheld") == withheld  # idempotent
