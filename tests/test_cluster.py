"""Cohorts on Dask: a local cluster gives the serial bytes, a failing subject stops no other and is retried on a
rerun; the SLURM job script carries the documented options; the command line and cohort table pass them on."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from wmloc_utils import apply, artefacts, cluster
from wmloc_utils import registration as reg
from wmloc_utils.errors import InputError

pytest.importorskip("dask.distributed")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """subjects.csv of a 3-subject 2 mm demo cohort (discovered and validated while every file was good)."""
    from wmloc_utils import demo, subjects

    root = tmp_path_factory.mktemp("demo3")
    demo.generate(root / "data", n_subjects=3, grid="2mm", progress=False)
    table = subjects.validate(subjects.discover(root / "data"), progress=False)
    return subjects.write_manifest(
        table, subjects.read_participants(root / "data", table["subject"].tolist()), root / "01_data"
    )["subjects"]


@pytest.fixture
def corrupt_flair(cohort):
    """The last subject's FLAIR replaced by bytes that are no NIfTI (as a truncated copy would be); restored after."""
    path = Path(pd.read_csv(cohort, dtype={"subject": str})["flair"].iloc[-1])
    good = path.read_bytes()
    path.write_bytes(b"not a NIfTI file")
    yield path, good
    path.write_bytes(good)


def _subject(workdir: Path, subject: str) -> Path:
    """A subject's folder of the regions step."""
    return artefacts.path(workdir, artefacts.SUBJECT_REGIONS, subject=subject)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _outputs(folder: Path) -> dict:
    """Every file a subject's step wrote but its QC record (which holds timings), with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != reg.DONE}


def test_local_dask_cluster_with_a_failing_subject(cohort, corrupt_flair, tmp_path, capsys):
    from dask.distributed import Client, LocalCluster

    bad, good = corrupt_flair
    kw = dict(reg_spacing=4.0, progress=False, errors="record")
    serial = reg.run_cohort(cohort, tmp_path / "serial", n_jobs=1, **kw)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, env=dict(cluster.WORKER_ENV), dashboard_address=None
        ) as lc,
        Client(lc) as client,
    ):
        threads = client.run(
            lambda: (os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"], os.environ["OMP_NUM_THREADS"])
        )
        assert len(threads) == 2 and set(threads.values()) == {("1", "1")}, threads
        capsys.readouterr()
        qc = reg.run_cohort(cohort, tmp_path / "dask", scheduler=client, n_jobs=2, **kw)
    printed = capsys.readouterr().out
    ids = qc["subject"].tolist()
    assert ids == serial["subject"].tolist() and len(ids) == 3
    assert qc["status"].tolist() == ["ok", "ok", "failed"] == serial["status"].tolist()
    error = qc.set_index("subject").loc[ids[2], "error"]
    assert f"subject {ids[2]}" in error and "FLAIR is not a readable NIfTI file" in error
    assert "1 of 3 subjects FAILED" in printed and error in printed
    saved = pd.read_csv(
        artefacts.path(tmp_path / "dask", artefacts.REGIONS), dtype={"subject": str}, keep_default_na=False
    )
    assert saved["status"].tolist() == ["ok", "ok", "failed"]
    for subject in ids[:2]:  # the Dask workers wrote the bytes a serial run writes
        dask_out = _outputs(_subject(tmp_path / "dask", subject))
        assert "regions.nii.gz" in dask_out and dask_out == _outputs(_subject(tmp_path / "serial", subject))
    # later steps leave the failed subject out, and say so
    table = reg.subjects_on_flair_grid(tmp_path / "dask", pd.read_csv(cohort, dtype={"subject": str}))
    assert table["subject"].tolist() == ids[:2]
    assert f"skipping subject {ids[2]}: it failed" in capsys.readouterr().out
    # the input fixed, a rerun (a cluster made for it) processes only the failed subject
    bad.write_bytes(good)
    finished = {s: _tree(_subject(tmp_path / "dask", s)) for s in ids[:2]}
    again = reg.run_cohort(cohort, tmp_path / "dask", scheduler="local", n_jobs=2, **kw)
    assert again["status"].tolist() == ["ok"] * 3 and (again["error"] == "").all()
    assert {s: _tree(_subject(tmp_path / "dask", s)) for s in ids[:2]} == finished, "finished subjects were redone"
    assert (_subject(tmp_path / "dask", ids[2]) / "regions.nii.gz").exists()
    assert "FAILED" not in capsys.readouterr().out


def test_errors_raise_stops_at_the_failed_subject(cohort, corrupt_flair, tmp_path):
    one = tmp_path / "subjects.csv"
    pd.read_csv(cohort, dtype={"subject": str}).tail(1).to_csv(one, index=False)
    with pytest.raises(InputError, match="FLAIR is not a readable NIfTI file"):
        reg.run_cohort(one, tmp_path / "work", n_jobs=1, progress=False)
    with pytest.raises(InputError, match="errors='ignore'"):
        reg.run_cohort(one, tmp_path / "work", progress=False, errors="ignore")


def _documented_config() -> dict:
    """The example SLURM configuration of :mod:`wmloc_utils.cluster`'s docstring."""
    block = cluster.__doc__.split("::", 1)[1].split("\n\n", 2)[1]
    return yaml.safe_load(textwrap.dedent(block))


def test_slurm_job_script_carries_the_documented_options(tmp_path):
    """The documented YAML, as a file, builds a SLURM job script (nothing is submitted) with its options."""
    config = _documented_config()
    assert {"queue", "account", "cores", "memory", "walltime"} <= set(config)
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(config))
    slurm = cluster.slurm_cluster(path, account="other_project")  # an argument wins over the file
    try:
        script = slurm.job_script()
    finally:
        slurm.close()
    assert re.search(r"#SBATCH -p normal\b", script) and re.search(r"#SBATCH -A other_project\b", script)
    assert "#SBATCH -t 01:00:00" in script and "#SBATCH --qos=normal" in script and "#SBATCH --mem=" in script
    assert "#SBATCH -n 1" in script and "--nthreads 1" in script
    assert "export ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1" in script and "module load python" in script
    assert script.index("export ITK_GLOBAL") < script.index("module load python")
    with pytest.raises(InputError, match="does not exist"):
        cluster.slurm_settings(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="needs n_workers"):
        cluster.client(None, "slurm")


def test_command_line_passes_the_scheduler_on(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(apply, "run", lambda *a, **k: seen.update(args=a, **k) or {})
    apply.main(
        [
            str(tmp_path),
            str(tmp_path / "out"),
            "--lesion-checkpoint",
            "x.pt",
            "--scheduler",
            "slurm",
            "--n-workers",
            "64",
            "--cluster-config",
            "slurm.yaml",
        ]
    )
    assert seen["args"][-1] == 64 and seen["scheduler"] == "slurm" and seen["cluster_config"] == "slurm.yaml"
    apply.main([str(tmp_path), str(tmp_path / "out"), "--lesion-checkpoint", "x.pt", "--n-jobs", "2"])
    assert seen["args"][-1] == 2 and seen["scheduler"] == "processes"


def test_cohort_table_reports_failed_subjects():
    loads = pd.DataFrame({"subject": ["a", "c"], "lesion_ml": [1.0, 2.0], "1": [0.5, 0.0]})
    regions = pd.DataFrame(
        {
            "subject": ["a", "b", "c"],
            "status": ["ok", "failed", "ok"],
            "error": ["", "subject b: FLAIR is not a readable NIfTI file", ""],
        }
    )
    out = apply.with_status(loads, regions)
    assert out.columns.tolist() == ["subject", "status", "error", "lesion_ml", "1"]
    assert out["subject"].tolist() == ["a", "b", "c"] and out["status"].tolist() == ["ok", "failed", "ok"]
    assert out["lesion_ml"].isna().tolist() == [False, True, False]


@pytest.fixture(scope="module")
def lesion_checkpoint(cohort, tmp_path_factory):
    """A lesion network trained for one step on the cohort's first subject (enough to predict with)."""
    from conftest import train_tiny_lesion_network

    table = pd.read_csv(cohort, dtype={"subject": str}).head(1)
    return train_tiny_lesion_network(table, tmp_path_factory.mktemp("model"))


def test_segmentation_on_a_local_dask_cluster_with_a_failing_subject(
    cohort, lesion_checkpoint, corrupt_flair, tmp_path
):
    """One task per subject on 2 workers: the predictions of this process, and a bad FLAIR recorded, not raised."""
    import nibabel as nib
    import numpy as np

    from wmloc_utils import inference

    table = pd.read_csv(cohort, dtype={"subject": str})
    ids = table["subject"].tolist()
    with pytest.raises(InputError, match="FLAIR"):
        inference.predict_cohort(table, tmp_path / "here", lesion_checkpoint, progress=False)
    here = inference.predict_cohort(table.head(2), tmp_path / "here", lesion_checkpoint, progress=False)
    dask = inference.predict_cohort(
        table, tmp_path / "dask", lesion_checkpoint, progress=False, scheduler="local", n_jobs=2, errors="record"
    )
    assert dask["subject"].tolist() == ids and dask["status"].tolist() == ["ok", "ok", "failed"]
    assert "FLAIR" in dask["error"].iloc[2] and ids[2] in dask["error"].iloc[2]
    for a, b in zip(here.itertuples(), dask.head(2).itertuples()):
        prob_a, prob_b = (np.asanyarray(nib.load(p).dataobj) for p in (a.lesion_prob, b.lesion_prob))
        assert prob_a.shape == prob_b.shape and np.allclose(prob_a, prob_b, atol=1e-4)  # 2 threads here, 1 there


def test_a_changed_checkpoint_file_is_loaded_again(lesion_checkpoint):
    """Networks are loaded once per process, but a checkpoint rewritten in place (a retrained network) is reloaded."""
    from wmloc_utils import inference

    first = inference._loaded(str(lesion_checkpoint), "cpu")
    assert inference._loaded(str(lesion_checkpoint), "cpu") is first
    st = os.stat(lesion_checkpoint)
    os.utime(lesion_checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert inference._loaded(str(lesion_checkpoint), "cpu") is not first
