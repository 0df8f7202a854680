"""The bring-your-own-cohort path: pairings chosen from what a cohort has, the command line's errors, withheld masks."""

from __future__ import annotations

import pandas as pd
import pytest

from wmloc_utils import apply, demo, inference
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


def test_command_line_passes_the_lesion_filter_and_growth_on(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(apply, "run", lambda *a, **k: seen.update(k) or {})
    base = [str(tmp_path), str(tmp_path / "out"), "--lesion-checkpoint", "x.pt"]
    apply.main(base)
    assert seen["min_gm_contrast"] == inference.MIN_GM_CONTRAST and seen["grow_to_prob"] == inference.GROW_TO_PROB
    apply.main([*base, "--min-gm-contrast", "0", "--grow-to-prob", "off"])
    assert seen["min_gm_contrast"] == 0.0 and seen["grow_to_prob"] is None
    apply.main([*base, "--grow-to-prob", "0.4"])
    assert seen["grow_to_prob"] == 0.4


def test_cohort_table_carries_the_dropped_lesion_volume():
    """cohort_loads.csv: per subject, the QC columns and the mL the lesion filters dropped, before the regions."""
    tidy = pd.DataFrame(
        {
            "pairing": ["automatic"] * 3,
            "subject": ["a", "a", "b"],
            "region": [1, 2, 1],
            "lesion_ml": [1.0, 2.0, 0.5],
            "assigned_ml": [0.0, 0.0, 0.0],
            "short": ["CING_L", "SFG_L", "CING_L"],
        }
    )
    preds = pd.DataFrame({"subject": ["b", "a"], "dropped_ml": [9.0, 0.0]})
    table = apply.cohort_table(tidy, predictions=preds)
    assert table.columns[:6].tolist() == [
        "subject",
        "lesion_ml",
        "assigned_ml",
        "unassigned_ml",
        "unassigned_fraction",
        "dropped_ml",
    ]
    assert table.set_index("subject")["dropped_ml"].to_dict() == {"a": 0.0, "b": 9.0}
    assert table.columns[6:].tolist() == ["CING_L", "SFG_L"]
    assert "dropped_ml" not in apply.cohort_table(tidy)


def test_withheld_masks_leave_a_cohort_without_masks(tmp_path):
    demo.generate(tmp_path / "data", n_subjects=2, progress=False)
    withheld = demo.withhold_masks(tmp_path / "data", tmp_path / "withheld")
    assert sorted(withheld) == sorted(p.name for p in (tmp_path / "data").glob("*/*") if p.is_dir())
    assert not list((tmp_path / "data").glob("*/*/wmh.nii.gz"))
    assert demo.withhold_masks(tmp_path / "data", tmp_path / "withheld") == withheld  # idempotent
