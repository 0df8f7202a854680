"""Where the per-subject work runs: local worker processes, a Dask cluster on this machine, or SLURM jobs.

Every subject is independent, so a cohort scales with the number of workers. Three schedulers:

- ``"processes"`` (default): a ``ProcessPoolExecutor`` on this machine, ``n_jobs`` processes;
- ``"local"``: a Dask ``LocalCluster`` on this machine, ``n_jobs`` worker processes of one thread each;
- ``"slurm"``: a ``dask_jobqueue.SLURMCluster``: each worker is a SLURM job (one core, one thread by
  default), submitted by this process and cancelled when the cohort is done.

ANTs runs single-threaded in every worker (:data:`wmloc_utils.ITK_THREADS`: the same result on any machine),
so one worker is one core. A failed subject does not stop the others: :func:`run_each` hands back its
exception and the caller records it (``registration.run_cohort(..., errors="record")``).

SLURM settings come, lowest priority first, from Dask's own configuration (``jobqueue.slurm`` in
``~/.config/dask/jobqueue.yaml``), from a YAML file given as ``config`` (``wmloc-apply --cluster-config``)
and from keyword arguments. An example file (one-core workers, one per job, as sbatch options)::

    # slurm.yaml: wmloc-apply DATA WORK --lesion-checkpoint best.pt --scheduler slurm --n-workers 64 \\
    #                           --cluster-config slurm.yaml
    queue: normal            # sbatch --partition
    account: my_project      # sbatch --account
    cores: 1                 # one subject at a time per job (ANTs is single-threaded)
    processes: 1
    memory: 4GB              # a 1 mm subject peaks near 2 GB
    walltime: "01:00:00"     # per job; a worker processes subjects until the cohort is done
    job_extra_directives: ["--qos=normal"]
    job_script_prologue: ["module load python"]   # what the job runs before the worker starts
    local_directory: /tmp    # the worker's scratch space, on the node

The work directory and the data must be on a file system the compute nodes share, and the nodes must
run the same Python environment (``python``, default: this interpreter).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

from . import ITK_THREADS
from .errors import InputError

if TYPE_CHECKING:
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

SCHEDULERS = ("processes", "local", "slurm")
#: SLURM defaults: one-core, one-thread workers (ANTs single-threaded); overridden by config and arguments.
SLURM_DEFAULTS = {"cores": 1, "processes": 1, "memory": "4GB", "walltime": "01:00:00"}
#: Environment of every Dask worker: ANTs (ITK) and the numerical libraries single-threaded.
WORKER_ENV = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": ITK_THREADS, "OMP_NUM_THREADS": "1"}


def slurm_settings(config: str | os.PathLike | dict | None = None, **kwargs) -> dict:
    """The ``SLURMCluster`` arguments: :data:`SLURM_DEFAULTS`, then ``config`` (YAML file or dict), then ``kwargs``.

    Keys Dask's ``jobqueue.slurm`` configuration sets are left to it unless given here.
    """
    import dask
    import yaml

    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.exists():
            raise InputError(f"{path}: cluster configuration file does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise InputError(f"{path}: a cluster configuration must be a mapping of SLURMCluster options")
    configured = dask.config.get("jobqueue.slurm", default={}) or {}
    out = {k: v for k, v in SLURM_DEFAULTS.items() if configured.get(k) is None}
    out.update(config or {})
    out.update(kwargs)
    prologue = [f"export {k}={v}" for k, v in WORKER_ENV.items()]
    out["job_script_prologue"] = prologue + list(out.get("job_script_prologue") or [])
    return out


def slurm_cluster(config: str | os.PathLike | dict | None = None, **kwargs) -> SLURMCluster:
    """A ``dask_jobqueue.SLURMCluster`` (no job submitted until it is scaled); see :func:`slurm_settings`."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**slurm_settings(config, **kwargs))


def client(
    n_workers: int | None = None, kind: str = "local", config: str | os.PathLike | dict | None = None, **jobqueue_kwargs
) -> Client:
    """A ``dask.distributed.Client`` on a new cluster of ``n_workers`` single-threaded worker processes.

    ``kind="local"``: a ``LocalCluster`` on this machine (None: one worker per CPU core); ``"slurm"``: a
    :func:`slurm_cluster` scaled to ``n_workers`` workers (required). Close the client and its cluster when
    done (``with client(...) as c:`` closes the client; ``c.cluster.close()`` the cluster).
    """
    from dask.distributed import Client, LocalCluster

    if kind == "local":
        cluster = LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            env=dict(WORKER_ENV),
            dashboard_address=None,
        )
    elif kind == "slurm":
        if not n_workers:
            raise InputError("a SLURM cluster needs n_workers (how many single-core worker jobs to submit)")
        cluster = slurm_cluster(config, **jobqueue_kwargs)
        cluster.scale(n=int(n_workers))
    else:
        raise InputError(f"cluster kind must be 'local' or 'slurm', got {kind!r}")
    return Client(cluster)


def worker_count(n_jobs: int | None, n_tasks: int) -> int:
    """Worker processes for ``n_tasks`` independent tasks: ``n_jobs``, None meaning one per CPU core."""
    return min(n_tasks, n_jobs or os.cpu_count() or 1)


def run_each(
    fn: Callable,
    jobs: Sequence,
    n_workers: int | None,
    scheduler: str | Client = "processes",
    names: Sequence[str] | None = None,
    config: str | os.PathLike | dict | None = None,
) -> Iterator[tuple[int, object]]:
    """Run ``fn(job)`` for every job on ``scheduler``; yield ``(index, result)`` as each finishes.

    A job that raises yields its exception as the result (the other jobs go on): the caller decides
    whether to record it or stop. ``scheduler`` is one of :data:`SCHEDULERS` or a
    ``dask.distributed.Client`` (used as is, not closed); a cluster made here is closed at the end.
    ``names`` (e.g. subject ids) name the Dask tasks; ``config``: SLURM settings (:func:`slurm_settings`).
    ``fn`` must be importable (a module-level function of wmloc_utils), so that every worker imports
    wmloc_utils, and with it the single ITK thread, before its first ANTs call.
    """
    if not jobs:
        return
    if scheduler in (None, "processes"):
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                yield futures[fut], _outcome(fut)
        return
    if isinstance(scheduler, str) and scheduler not in SCHEDULERS:
        raise InputError(f"scheduler must be one of {SCHEDULERS} or a dask.distributed.Client, got {scheduler!r}")
    from dask.distributed import as_completed as dask_completed

    own = isinstance(scheduler, str)
    dask_client = client(n_workers, scheduler, config) if own else scheduler
    try:
        names = list(names) if names is not None else [str(i) for i in range(len(jobs))]
        futures = {
            dask_client.submit(fn, job, key=f"wmloc-{name}-{os.urandom(4).hex()}", pure=False): i
            for i, (name, job) in enumerate(zip(names, jobs))
        }
        for fut in dask_completed(futures):
            yield futures[fut], _outcome(fut)
    finally:
        if own:
            cluster = dask_client.cluster
            dask_client.close()
            cluster.close()


def run_here(fn: Callable, jobs: Sequence) -> Iterator[tuple[int, object]]:
    """:func:`run_each` in this process, in order: ``(index, result)``, a job that raises yielding its exception."""
    for i, job in enumerate(jobs):
        try:
            result = fn(job)
        except Exception as err:  # noqa: BLE001 (one subject's failure: the caller raises it or records it)
            result = err
        yield i, result


def failure(subject: str, err: Exception) -> dict:
    """The table row of a subject whose job raised: ``status`` "failed" and the ``error``, naming the subject."""
    message = f"{type(err).__name__}: {err}"
    if f"subject {subject}" not in message:
        message = f"subject {subject}: {message}"
    return {"subject": subject, "status": "failed", "error": message}


def _outcome(future) -> object:
    """A finished future's result, or the exception it raised (a lost Dask worker: ``KilledWorker``)."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 (any failure of one subject is that subject's, recorded by the caller)
        return err
