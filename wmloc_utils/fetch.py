"""Data directories, hashed file registries and download of third-party data files.

Third-party files are not shipped with wmloc. Each :class:`Collection` has a registry (package
data file: name, SHA-256, public URL) and a folder: the argument, else its environment variable,
else its subfolder of the data directory (argument > ``WMLOC_DATA`` > per-user cache). Files are
verified by SHA-256 and downloaded from their public URLs into that folder when missing.
Two collections: :data:`EVE` (the JHU "Eve" atlas, in the data directory itself) and
:data:`AUTHORS_LABELS` (the paper authors' 170 subject region maps, :mod:`wmloc_utils.authors_labels`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import pooch

from .errors import DataError

ENV_VAR = "WMLOC_DATA"


@dataclass(frozen=True)
class RegistryEntry:
    """One registered file: its name, expected SHA-256 and public URL."""

    file: str
    sha256: str
    url: str
    description: str


@dataclass(frozen=True)
class Collection:
    """A set of registered files: its registry (in ``wmloc_utils/data/``) and where its folder is."""

    registry: str
    env_var: str = ENV_VAR
    subfolder: str = ""  # under the data directory when ``env_var`` is not set ("": the data directory itself)
    example: str = "jhu-eve"  # folder name in messages (export VAR=/path/to/<example>)


EVE = Collection("registry.tsv")
AUTHORS_LABELS = Collection("authors_labels.tsv", "WMLOC_AUTHORS_LABELS", "authors-labels", "authors-labels")


def registry(collection: Collection = EVE) -> dict[str, RegistryEntry]:
    """The hashed registry of a collection's files, read from ``wmloc_utils/data/<collection.registry>``."""
    with resources.files("wmloc_utils").joinpath("data", collection.registry).open() as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str)
    return {row.file: RegistryEntry(row.file, row.sha256, row.url, row.description) for row in table.itertuples()}


def data_dir(path: str | os.PathLike | None = None, collection: Collection = EVE) -> Path:
    """A collection's folder: ``path`` if given, else its environment variable (``$WMLOC_DATA`` for the atlas),
    else its subfolder of the data directory (``$WMLOC_DATA``, else the per-user cache)."""
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get(collection.env_var, "")
    if env:
        return Path(env).expanduser()
    if collection.subfolder:
        return data_dir() / collection.subfolder
    return Path(pooch.os_cache("wmloc"))


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file."""
    return pooch.file_hash(str(path), alg="sha256")


def fetch(
    name: str, path: str | os.PathLike | None = None, download: bool = True, collection: Collection = EVE
) -> Path:
    """Return the local path of ``collection``'s registered file ``name``, verified; download it if missing.

    ``name`` may hold a subfolder (``Train/WMH_0.nii.gz``), kept under the collection's folder.
    Raises :class:`DataError` naming the file, the directory searched and how to provide
    the file when it is missing and cannot be downloaded, or when its hash is wrong.
    """
    entries = registry(collection)
    if name not in entries:
        shown = sorted(entries) if len(entries) <= 10 else f"{len(entries)} files listed in {collection.registry}"
        raise DataError(f"{name!r} is not a registered data file; known files: {shown}")
    entry = entries[name]
    folder = data_dir(path, collection)
    target = folder / name
    if target.exists():
        digest = sha256(target)
        if digest != entry.sha256:
            raise DataError(
                f"{target} is corrupt or a different version: its SHA-256 is {digest}, "
                f"expected {entry.sha256}. Delete it to download it again from {entry.url}."
            )
        return target
    var = collection.env_var
    how = (
        f"Download it from {entry.url} into {target.parent}, or set {var} to a folder that holds it "
        f"(e.g. export {var}=/path/to/{collection.example})."
    )
    if not download:
        raise DataError(f"Data file {name} not found in {folder}. {how}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fetched = pooch.retrieve(
            entry.url, known_hash=f"sha256:{entry.sha256}", fname=target.name, path=target.parent, progressbar=False
        )
    except Exception as err:  # network errors, read-only folders, hash mismatch of the download
        raise DataError(
            f"Data file {name} not found in {folder} and could not be downloaded ({type(err).__name__}: {err}). {how}"
        ) from err
    return Path(fetched)


def fetch_all(path: str | os.PathLike | None = None, collection: Collection = EVE) -> dict[str, Path]:
    """Fetch and verify every file of a collection; return name -> local path."""
    return {name: fetch(name, path, collection=collection) for name in registry(collection)}
