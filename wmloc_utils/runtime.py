"""Run-time set-up shared by all notebooks: seeds, device, work directory and printed config, in one call (start)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

WORKDIR_ENV = "WMLOC_WORKDIR"


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks the first CUDA GPU (or Apple MPS) when present, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but no CUDA GPU is available; use device='auto'")
    return dev


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (MONAI ``set_determinism``) for reproducible runs."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)


def resolve_workdir(workdir: str | os.PathLike | None = None) -> Path:
    """The shared work directory: ``workdir`` if given, else ``$WMLOC_WORKDIR``, else ``./wmloc-work``."""
    path = Path(workdir or os.environ.get(WORKDIR_ENV) or "wmloc-work").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_report(**params) -> str:
    """A printable block of versions, device, threads and the notebook's parameters."""
    import ants
    import monai
    import nibabel
    import nilearn
    import sklearn

    from . import __version__
    from .fetch import data_dir

    lines = [
        f"wmloc {__version__} | Python {platform.python_version()} | {platform.system()} {platform.machine()}",
        f"torch {torch.__version__} | monai {monai.__version__} | antspyx {ants.__version__} | "
        f"nibabel {nibabel.__version__} | nilearn {nilearn.__version__} | scikit-learn {sklearn.__version__}",
        f"device: {resolve_device('auto')} | CPU threads: {torch.get_num_threads()} | atlas data dir: {data_dir()}",
    ]
    lines += [f"  {k} = {v!r}" for k, v in params.items()]
    return "\n".join(lines)


def start(
    chapter: str,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    provided: tuple[str, ...] | list[str] = (),
    **params,
) -> Path:
    """A notebook's set-up in one call; returns its work directory (resolved, created).

    Runs the earlier chapters it needs that have not run there (:func:`wmloc_utils.book.prepare`; ``provided``:
    chapters whose results come from elsewhere), seeds everything and prints the configuration and ``params``.
    """
    from . import artefacts, book  # (book imports papermill: only here)

    workdir = resolve_workdir(workdir)
    name = artefacts.notebook(chapter)
    if book.NEEDS[name]:
        book.prepare(workdir, name, provided)
    set_seed(seed)
    print(config_report(workdir=str(workdir), seed=seed, **params))
    return workdir
