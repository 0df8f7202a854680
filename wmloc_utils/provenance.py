"""Fingerprints of what made a result, so that steps which skip finished work notice when it went stale.

A fingerprint records, for each input file, its resolved path, size, ``mtime_ns`` and the SHA-256
of its NIfTI header (optionally of the whole file), plus the step's parameters, the package version
and the same record for upstream artefacts (e.g. notebook 02's refined atlas). Size + mtime + header
hash is the default: it costs one ``stat`` and one header read per file, while a full hash reads every
byte of each ~10-20 MB image on every rerun (cheap on a local SSD, slow on network or spinning disks;
see ``benchmarks/bench_fingerprint.py``). ``full_hash=True`` adds the full SHA-256; then a file
whose bytes are unchanged (touched, copied without ``-p``) counts as unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nib

from .images import atomic_path

NIFTI = (".nii", ".nii.gz")


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    return _sha256(Path(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header_sha256(path: Path) -> str | None:
    """SHA-256 of a NIfTI header (only the header is read, even from a .nii.gz); None for other or unreadable files."""
    if not path.name.endswith(NIFTI):
        return None
    try:
        return hashlib.sha256(nib.load(str(path)).header.binaryblock).hexdigest()
    except Exception:  # an unreadable file changes nothing here: the step itself reports it
        return None


def file_fingerprint(path: str | os.PathLike, full_hash: bool = False) -> dict:
    """Path, size, mtime_ns and header hash of one file (``sha256`` too with ``full_hash``); ``missing`` if absent."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        return {"path": str(p), "missing": True}
    st = p.stat()
    fp = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": _header_sha256(p)}
    if full_hash:
        fp["sha256"] = _sha256(p)
    return fp


def upstream_fingerprints(paths: dict[str, str | os.PathLike]) -> dict[str, dict]:
    """Fingerprints of upstream artefacts, always with the full SHA-256.

    They are few and shared by every subject, so they are hashed once per run; a notebook that rewrites
    the same bytes (02 rewrites its refined atlas on each run; nibabel's gzip output is reproducible)
    then leaves the results of later steps current.
    """
    return {name: file_fingerprint(p, full_hash=True) for name, p in paths.items()}


def fingerprint(
    inputs: dict[str, str | os.PathLike], params: dict, upstream: dict[str, dict] | None = None, full_hash: bool = False
) -> dict:
    """Fingerprint of one result: its input files, parameters, package version and upstream artefacts.

    ``upstream`` holds :func:`upstream_fingerprints` (computed once for all the results of a step).
    """
    from . import __version__

    return {
        "version": __version__,
        "params": dict(params),
        "inputs": {k: file_fingerprint(p, full_hash) for k, p in inputs.items()},
        "upstream": dict(upstream or {}),
    }


def _file_change(name: str, old: dict, new: dict) -> str | None:
    """Why file ``name`` differs between two file fingerprints, or None when it is the same file and content."""
    if old.get("path") != new.get("path"):
        return f"{name} is another file ({old.get('path')} -> {new.get('path')})"
    if old.get("missing") or new.get("missing"):
        return (
            None
            if old.get("missing") == new.get("missing")
            else f"{name} {'missing' if new.get('missing') else 'appeared'}"
        )
    if old.get("sha256") and new.get("sha256"):
        return None if old["sha256"] == new["sha256"] else f"{name} changed (content)"
    what = [
        label
        for key, label in (("mtime_ns", "mtime"), ("size", "size"), ("header", "header"))
        if old.get(key) != new.get(key)
    ]
    return f"{name} changed ({'/'.join(what)})" if what else None


def changes(old: dict | None, new: dict) -> list[str]:
    """Reasons (human-readable) why a result with fingerprint ``old`` is stale given ``new``; [] when it is current."""
    if not old:
        return ["no fingerprint (made by an older wmloc or interrupted)"]
    reasons = []
    if old.get("version") != new["version"]:
        reasons.append(f"wmloc version changed ({old.get('version')} -> {new['version']})")
    params_old = old.get("params", {})
    for key in sorted(set(params_old) | set(new["params"])):
        if params_old.get(key) != new["params"].get(key):
            reasons.append(f"{key} changed ({params_old.get(key)!r} -> {new['params'].get(key)!r})")
    for section in ("inputs", "upstream"):
        before, now = old.get(section, {}), new[section]
        for name in sorted(set(before) | set(now)):
            if name not in before or name not in now:
                reasons.append(f"{name} {'added' if name in now else 'no longer used'}")
            elif (why := _file_change(name, before[name], now[name])) is not None:
                reasons.append(why)
    return reasons


def outputs_changed(recorded: dict[str, dict]) -> list[str]:
    """Reasons why written outputs (name -> fingerprint when written) are no longer as written; [] when intact."""
    return [
        why
        for name, fp in recorded.items()
        if (why := _file_change(name, fp, file_fingerprint(fp["path"], full_hash="sha256" in fp))) is not None
    ]


def write_text_if_changed(path: str | os.PathLike, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it; True when written.

    An unchanged rerun then touches nothing (no new mtime for downstream steps, works on read-only folders).
    """
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def write_table_if_changed(df, path: str | os.PathLike, **kwargs) -> bool:
    """A pandas table as CSV (TSV for .tsv), written atomically only when its text would change; True when written."""
    path = Path(path)
    return write_text_if_changed(path, df.to_csv(sep="\t" if path.suffix == ".tsv" else ",", **kwargs))
