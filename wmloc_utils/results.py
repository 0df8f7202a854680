"""The paper's result tables, made from what a book run left in its work directory.

Each function reads the tables the chapters wrote (nothing is recomputed but summaries) and returns
one paper-style table; a table whose chapter did not run, or ran without reference masks, is empty.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from . import artefacts, localization

LESION_METRICS = ("dice", "hd95", "avd", "recall", "f1")
# Pairings of lesions x regions compared with the reference loads (notebook 07), as the paper's stages.
LOAD_STAGES = {
    "lesion network (predicted lesions x atlas regions)": "lesion_pred",
    "both networks (predicted lesions x network regions)": "predicted",
    "fully automatic (the book's region source)": "automatic",
}


def _read(workdir: str | os.PathLike, artefact: artefacts.Artefact, **kwargs) -> pd.DataFrame | None:
    """A chapter's table, None when the chapter did not write it."""
    path = artefacts.path(workdir, artefact)
    return pd.read_csv(path, **kwargs) if path.exists() else None


def _test_subjects(workdir: Path) -> set[str]:
    split = _read(workdir, artefacts.SPLIT, dtype={"subject": str})
    return set(split.loc[split["split"] == "test", "subject"]) if split is not None else set()


def _mean_sd(table: pd.DataFrame, by: list[str], columns: tuple[str, ...]) -> pd.DataFrame:
    """ "mean (sd)" strings per group, with the number of subjects."""
    grouped = table.groupby(by)
    out = pd.DataFrame(
        {
            c: grouped[c].mean().map("{:.3f}".format) + " (" + grouped[c].std().map("{:.3f}".format) + ")"
            for c in columns
        }
    )
    out.insert(0, "subjects", grouped.size())
    return out


def lesion_table(workdir: str | os.PathLike) -> pd.DataFrame:
    """Lesion segmentation on the test subjects, mean (sd) per architecture x inputs (the challenge's metrics).

    The book's networks come from notebook 06 (:data:`artefacts.LESION_SCORES`); the other architectures and
    inputs from :data:`artefacts.ARCHITECTURES_TABLE` when that benchmark ran in ``workdir``.
    """
    workdir = Path(workdir)
    rows = []
    scores = _read(workdir, artefacts.LESION_SCORES, dtype={"subject": str})
    if scores is not None and len(scores):
        rows.append(_mean_sd(scores, ["architecture", "inputs"], LESION_METRICS).assign(source="notebook 06"))
    bench_table = workdir / artefacts.ARCHITECTURES_TABLE
    bench = pd.read_csv(bench_table) if bench_table.exists() else None
    if bench is not None:
        fmt = {
            k: bench[f"{k}_mean"].map("{:.3f}".format) + " (" + bench[f"{k}_sd"].map("{:.3f}".format) + ")"
            for k in LESION_METRICS
        }
        rows.append(
            pd.DataFrame(
                {
                    "architecture": bench["architecture"],
                    "inputs": bench["inputs"],
                    **fmt,
                    "source": "bench_architectures.py",
                }
            ).set_index(["architecture", "inputs"])
        )
    return pd.concat(rows) if rows else pd.DataFrame(columns=["subjects", *LESION_METRICS, "source"])


def region_table(workdir: str | os.PathLike) -> pd.DataFrame:
    """Region labels: mean Dice over the regions, per method (notebook 03 vs the demo's true regions; the
    region network of notebook 06 vs the registered atlas on the test subjects)."""
    workdir = Path(workdir)
    rows = []
    truth = _read(workdir, artefacts.REGION_DICE, dtype={"subject": str})
    if truth is not None and len(truth):
        per_subject = truth.groupby(["method", "subject"])["dice"].mean().reset_index()
        for method, t in per_subject.groupby("method"):
            rows.append(
                {
                    "regions": f"atlas registration ({method})",
                    "against": "true regions (demo)",
                    "subjects": len(t),
                    "mean Dice": t["dice"].mean(),
                    "min": t["dice"].min(),
                }
            )
    net = _read(workdir, artefacts.REGION_SCORES, index_col=0)
    if net is not None and "mean" in net:
        rows.append(
            {
                "regions": "region network (notebook 05)",
                "against": "registered atlas, test subjects",
                "subjects": len(net),
                "mean Dice": net["mean"].mean(),
                "min": net["mean"].min(),
            }
        )
    return pd.DataFrame(rows, columns=["regions", "against", "subjects", "mean Dice", "min"]).round(3)


def load_agreement_table(workdir: str | os.PathLike) -> pd.DataFrame:
    """Regional lesion loads against the reference loads, per stage: median relative error and Pearson r
    over the test subjects (notebook 07's ``regional_loads.csv``); empty without reference masks."""
    workdir = Path(workdir)
    tidy = _read(workdir, artefacts.REGIONAL_LOADS, dtype={"subject": str})
    if tidy is None or "reference" not in set(tidy["pairing"]):
        return pd.DataFrame(columns=["stage", "pairing", "subjects", "median rel. error", "median Pearson r"])
    test = _test_subjects(workdir)
    tidy = tidy[tidy["subject"].isin(test)] if test else tidy
    rows = []
    for stage, pairing in LOAD_STAGES.items():
        if pairing in set(tidy["pairing"]):
            agree = localization.load_agreement(tidy, pairing)
            rows.append(
                {
                    "stage": stage,
                    "pairing": pairing,
                    "subjects": len(agree),
                    "median rel. error": agree["rel_error"].median(),
                    "median Pearson r": agree["pearson_r"].median(),
                }
            )
    qc = _read(workdir, artefacts.LESION_QC, dtype={"subject": str})
    out = pd.DataFrame(rows)
    if qc is not None and len(out):
        out["median lesion volume in no region"] = out["pairing"].map(
            qc.groupby("pairing")["unassigned_fraction"].median()
        )
    return out.round(3)


def clustering_table(workdir: str | os.PathLike) -> pd.DataFrame:
    """How well clustering by regional pattern recovers the subjects' groups (notebook 08): ARI per pairing."""
    agreement = _read(workdir, artefacts.CLUSTER_AGREEMENT)
    clusters = _read(workdir, artefacts.CLUSTERS, dtype={"subject": str})
    if agreement is None:
        return pd.DataFrame(columns=["pairing", "ari_vs_group"])
    if clusters is not None and len(clusters):
        agreement = agreement.assign(method=clusters["method"].iloc[0], k=int(clusters["k"].iloc[0]))
    return agreement.round(3)


def run_times(workdir: str | os.PathLike) -> pd.Series:
    """Minutes per chapter in the work directory's last book run (:data:`artefacts.BOOK_TIMINGS`)."""
    path = Path(workdir) / artefacts.BOOK_TIMINGS
    seconds = json.loads(path.read_text()) if path.exists() else {}
    return (pd.Series(seconds, name="minutes", dtype=float) / 60).round(1)
