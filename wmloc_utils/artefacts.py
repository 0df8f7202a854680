"""Every file the notebooks hand on through the work directory, named once: which notebook writes it, where, what.

Notebook ``NN_name.ipynb`` writes into the folder ``NN_name/`` of the work directory. Whatever reads another
notebook's result asks :func:`require`, which names the notebook to run when the file is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Artefact:
    """A file or folder that ``notebook`` (the notebook's name, no ``.ipynb``) writes at ``path`` in its folder.

    ``about`` says what it holds; ``{subject}`` (or another ``{field}``) in ``path`` is filled by :func:`path`.
    """

    notebook: str
    path: str
    about: str

    @property
    def relpath(self) -> str:
        """Its place relative to the work directory, e.g. ``01_data/subjects.csv``."""
        return f"{self.notebook}/{self.path}"


# 01: the cohort
SUBJECTS = Artefact("01_data", "subjects.csv", "the validated subject table: T1, FLAIR, lesion mask, site, group, grid")
PARTICIPANTS = Artefact("01_data", "participants.tsv", "the participants' attributes: group, age, ...")
DEMO_COHORT = Artefact(
    "01_data", "demo_cohort", "the synthetic demo cohort, made when data_dir is None, with its truth"
)

# 02: the atlas
REFINED_ATLAS = Artefact("02_atlas", "refined_atlas.nii.gz", "the refined Eve atlas: 34 WM regions + 2 non-WM labels")
REFINED_LUT = Artefact("02_atlas", "refined_atlas_lut.tsv", "the refined atlas's label table: id, names, lobe, colour")
EVE_DEPTH_MAPS = Artefact("02_atlas", "eve_{map}.nii.gz", "Eve's ventricles, periventricular/deep WM and bullseye maps")

# 03: every subject's region labels
REGIONS = Artefact(
    "03_regions",
    "regions.csv",
    "one QC row per subject, with the paths of its region map, tissue classes, brain and WM masks",
)
SUBJECT_REGIONS = Artefact(
    "03_regions",
    "{subject}",
    "a subject's brain mask, bias-corrected T1 and FLAIR (what the networks are applied to), tissues, WM mask and region map "
    "on its FLAIR grid, and qc.json",
)
SYN_REGIONS = Artefact(
    "03_regions", "syn/{subject}", "demo only: a subject's regions by SyN, to compare with the affine"
)
REGION_DICE = Artefact("03_regions", "region_dice.csv", "demo only: each region's Dice against the true regions")
TEMPLATE_TRUTH = Artefact("03_regions", "template_truth", "demo only: the true regions in the template's space, cached")

# 04, 05: the networks
SPLIT = Artefact("04_train_lesions", "split.csv", "the subjects' split into train, val and test, made once and reused")
LESION_MODEL = Artefact("04_train_lesions", "best.pt", "the lesion network's best checkpoint, with its configuration")
REGION_MODEL = Artefact("05_train_regions", "best.pt", "the region network's best checkpoint, with its configuration")

# 06: predictions and scores
PREDICTIONS = Artefact(
    "06_evaluate",
    "predictions.csv",
    "every subject's predicted lesions, regions when there is a region network, and split",
)
SUBJECT_PREDICTIONS = Artefact("06_evaluate", "{subject}", "a subject's predicted lesion mask, probability and regions")
COMPARED_PREDICTIONS = Artefact(
    "06_evaluate", "compare/model{number}", "the test subjects' lesions by the compare_checkpoints networks"
)
LESION_SCORES = Artefact(
    "06_evaluate", "lesion_scores.csv", "the challenge's lesion metrics per network and test subject"
)
REGION_SCORES = Artefact("06_evaluate", "region_scores.csv", "the region network's Dice per region and test subject")

# 07: regional lesion loads
REGIONAL_LOADS = Artefact(
    "07_localization",
    "regional_loads.csv",
    "lesion mL per subject, region and pairing, with the class, depth and bullseye loads",
)
REGIONAL_LOADS_WIDE = Artefact(
    "07_localization", "regional_loads_wide.csv", "lesion mL per region, one row per pairing and subject"
)
LESION_QC = Artefact("07_localization", "lesion_qc.csv", "per subject and pairing: lesion mL, in a region and in none")
LESIONS = Artefact("07_localization", "lesions.csv", "one row per lesion: its location class and volume")
LESION_CLASS_MAPS = Artefact(
    "07_localization", "{subject}_lesion_classes.nii.gz", "a subject's lesion voxels labelled by location class"
)
DEPTH_MAPS = Artefact("07_localization", "{subject}_{map}.nii.gz", "a subject's periventricular/deep and bullseye maps")

# 08: clusters
CLUSTERS = Artefact("08_clustering", "clusters.csv", "each subject's cluster, with the pairing, method and k")
K_SELECTION = Artefact("08_clustering", "k_selection.csv", "the scores of every candidate number of clusters")
CLUSTER_AGREEMENT = Artefact("08_clustering", "agreement.csv", "the clusters' agreement with the known groups, as ARI")

# 09: a new cohort through wmloc-apply
COHORT_LOADS = "cohort_loads.csv"  # wmloc-apply's cohort table, at the top of its own work directory
NEW_COHORT = Artefact("09_new_cohort", "data", "the new demo cohort, made when data_dir is None, masks withheld")
WITHHELD_MASKS = Artefact("09_new_cohort", "withheld_masks", "the new demo cohort's lesion masks, kept apart to score")
APPLY_WORK = Artefact("09_new_cohort", "work", "the new cohort's wmloc-apply work directory, in the book's layout")
NEW_COHORT_LOADS = Artefact(
    "09_new_cohort",
    f"{APPLY_WORK.path}/{COHORT_LOADS}",
    "one row per new subject: status, lesion mL, mL in no region, mL per region",
)

# 10: the paper's tables
RESULT_LESIONS = Artefact("10_results", "lesions.csv", "the lesion segmentation table")
RESULT_REGIONS = Artefact("10_results", "regions.csv", "the region label table")
RESULT_LOADS = Artefact("10_results", "loads.csv", "the regional load agreement table")
RESULT_CLUSTERS = Artefact("10_results", "clusters.csv", "the clustering table")

# Written in the work directory by other code than the notebooks (relative paths).
BOOK_RUNS = "book_runs.json"  # book.run: what each notebook ran with, to skip unchanged ones
BOOK_TIMINGS = "book_timings.json"  # book.run: seconds per chapter
PREPARED = "prepared"  # book.prepare: executed copies of the chapters it ran for a chapter opened alone
ARCHITECTURES_TABLE = "bench_architectures/table.csv"  # benchmarks/bench_architectures.py, read by results

# Every artefact above, in the order of the notebooks, and the notebooks that write them.
ARTEFACTS: tuple[Artefact, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Artefact))
NOTEBOOKS: tuple[str, ...] = tuple(sorted({a.notebook for a in ARTEFACTS}))


def notebook(chapter: str | Artefact) -> str:
    """A notebook's name from its number, name or file name (``"07"``, ``"07_localization.ipynb"``) or an artefact."""
    if isinstance(chapter, Artefact):
        return chapter.notebook
    matches = [n for n in NOTEBOOKS if n[:2] == Path(str(chapter)).stem[:2]]
    if len(matches) != 1:
        raise ValueError(f"no chapter {chapter!r}: the chapters are {list(NOTEBOOKS)}")
    return matches[0]


def path(workdir: str | os.PathLike, artefact: Artefact, **fields) -> Path:
    """Where ``artefact`` lies in ``workdir`` (``fields`` fill its placeholders, e.g. ``subject="07"``); not checked."""
    return Path(workdir) / artefact.notebook / artefact.path.format(**fields)


def folder(workdir: str | os.PathLike, chapter: str | Artefact) -> Path:
    """A notebook's own folder in ``workdir`` (created), from its number, name or one of its artefacts."""
    out = Path(workdir) / notebook(chapter)
    out.mkdir(parents=True, exist_ok=True)
    return out


def must_exist(file: str | os.PathLike, remedy: str) -> Path:
    """``file`` if it exists, else FileNotFoundError "<file> is missing: <remedy>" (every missing input's wording)."""
    file = Path(file)
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: {remedy}")
    return file


def require(workdir: str | os.PathLike, artefact: Artefact, given: str | os.PathLike | None = None, **fields) -> Path:
    """``artefact``'s path in ``workdir`` if it exists, else FileNotFoundError naming the notebook that writes it.

    ``given``: a file given in its place (a parameter, such as a checkpoint trained elsewhere), checked instead.
    """
    if given:
        return must_exist(
            given,
            f"check the path given for {artefact.about}, or give None to use notebook {artefact.notebook}.ipynb's",
        )
    return must_exist(
        path(workdir, artefact, **fields),
        f"run notebook {artefact.notebook}.ipynb first, with the same work directory (it writes {artefact.about})",
    )
