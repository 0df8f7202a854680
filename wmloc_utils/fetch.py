"""Data directory, hashed file registry and download of the third-party atlas files.

The JHU "Eve" atlas files are not shipped with wmloc. They are looked up in a data
directory (argument > ``WMLOC_DATA`` > per-user cache), verified by SHA-256, and
downloaded from their public URLs into that directory when missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import pooch

ENV_VAR = "WMLOC_DATA"


class DataError(RuntimeError):
    """A data file is missing, corrupt or cannot be fetched."""


@dataclass(frozen=True)
class RegistryEntry:
    """One registered file: its name, expected SHA-256 and public URL."""

    file: str
    sha256: str
    url: str
    description: str


def registry() -> dict[str, RegistryEntry]:
    """The hashed registry of fetchable files, read from ``wmloc_utils/data/registry.tsv``."""
    with resources.files("wmloc_utils").joinpath("data/registry.tsv").open() as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str)
    return {row.file: RegistryEntry(row.file, row.sha256, row.url, row.description) for row in table.itertuples()}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path`` if given, else ``$WMLOC_DATA``, else the per-user cache."""
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path(pooch.os_cache("wmloc"))


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file."""
    return pooch.file_hash(str(path), alg="sha256")


def fetch(name: str, path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the local path of registered file ``name``, verified; download it if missing.

    Raises :class:`DataError` naming the file, the directory searched and how to provide
    the file when it is missing and cannot be downloaded, or when its hash is wrong.
    """
    entries = registry()
    if name not in entries:
        raise DataError(f"{name!r} is not a registered data file; known files: {sorted(entries)}")
    entry = entries[name]
    folder = data_dir(path)
    target = folder / name
    if target.exists():
        digest = sha256(target)
        if digest != entry.sha256:
            raise DataError(
                f"{target} is corrupt or a different version: its SHA-256 is {digest}, "
                f"expected {entry.sha256}. Delete it to download it again from {entry.url}."
            )
        return target
    how = (
        f"Download it from {entry.url} into {folder}, or set {ENV_VAR} to a folder that holds it "
        f"(e.g. export {ENV_VAR}=/path/to/jhu-eve)."
    )
    if not download:
        raise DataError(f"Data file {name} not found in {folder}. {how}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fetched = pooch.retrieve(entry.url, known_hash=f"sha256:{entry.sha256}", fname=name, path=folder,
                                 progressbar=False)
    except Exception as err:  # network errors, read-only folders, hash mismatch of the download
        raise DataError(f"Data file {name} not found in {folder} and could not be downloaded "
                        f"({type(err).__name__}: {err}). {how}") from err
    return Path(fetched)


def fetch_all(path: str | os.PathLike | None = None) -> dict[str, Path]:
    """Fetch and verify every registered file; return name -> local path."""
    return {name: fetch(name, path) for name in registry()}
