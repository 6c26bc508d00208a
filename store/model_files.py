"""A model version's artifact files kept in SQL (model_files), so no worker host needs a shared folder.

A version's folder (meta.json, model.tflite, model.keras, card.md, oof.csv: a few MB) is stored when the
version is registered. A host then reads the registered folder when it is here with the same hashes, else
writes the files from SQL under its own cache folder (`materialize`) and reads that (`local_artifact`).
Versions registered before migration 0009 have no rows: their registered folder is used when it is here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import insert_ignore
from store.tables import ModelFile, ModelVersion, utcnow

CACHE_FOLDER = "model-cache"
# Version strings and file names become path parts: one plain name each, never a path or a hidden name.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
_READ_CHUNK = 1 << 20

# sha256 of files hashed in this process, keyed by what a rewrite changes (device, inode, size, mtime). As in
# git's "racy clean" rule, a file modified less than this long before it was hashed is not remembered: the
# kernel's timestamps are coarse, so a rewrite within the same tick would otherwise keep the old hash.
_hash_cache: dict[tuple[str, int, int, int, int], str] = {}
_SETTLED_NS = 2_000_000_000


def cache_root(data_dir: Path) -> Path:
    """Where a host writes model versions taken from SQL: $CXR_DATA_DIR/model-cache."""
    return Path(data_dir) / CACHE_FOLDER


def _safe(name: str) -> str:
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"not usable as a file or folder name: {name!r}")
    return name


def file_sha256(path: Path) -> str:
    """sha256 of a file (hex), remembered while its inode, size and modification time stay the same."""
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _hash_cache.get(key)
    if found is None:
        hashed_at = time.time_ns()
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(_READ_CHUNK):
                h.update(block)
        found = h.hexdigest()
        if hashed_at - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
            _hash_cache[key] = found
    return found


def save_model_files(session: Session, *, model_version_id: int, folder: Path) -> int:
    """Store every regular file of folder as this version's files; how many were stored.

    Idempotent: a version that already has files keeps them (a version's files never change), and two
    processes storing the same version at once store each file once. A folder not on this host stores nothing.
    """
    folder = Path(folder)
    if not folder.is_dir() or stored_files(session, model_version_id=model_version_id):
        return 0
    stored = 0
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        session.execute(
            insert_ignore(session, ModelFile)
            .values(
                model_version_id=model_version_id,
                name=_safe(path.name),
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                data=data,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["model_version_id", "name"])
        )
        stored += 1
    return stored


def stored_files(session: Session, *, model_version_id: int) -> dict[str, tuple[str, int]]:
    """name -> (sha256, size in bytes) of a version's files in SQL (empty: none stored)."""
    rows = session.execute(
        select(ModelFile.name, ModelFile.sha256, ModelFile.size_bytes).where(
            ModelFile.model_version_id == model_version_id
        )
    ).all()
    return {name: (sha, int(size)) for name, sha, size in rows}


def folder_matches(folder: Path, files: dict[str, tuple[str, int]]) -> bool:
    """Every one of these files is in folder with its size and sha256 (other files there are ignored)."""
    if not files:
        return False
    try:
        for name, (sha, size) in files.items():
            path = Path(folder) / name
            if not path.is_file() or path.stat().st_size != size or file_sha256(path) != sha:
                return False
    except OSError:
        return False
    return True


def materialize(session: Session, version: str | ModelVersion, dest_root: Path) -> Path:
    """Write a version's files from SQL to dest_root/<version>/ and return that folder.

    A folder already there whose files match the stored hashes is reused; otherwise the files are written to
    a temporary folder beside it, each checked against its stored sha256, and renamed into place in one step
    (a corrupt or partial folder is replaced). Raises LookupError for a version with no files in SQL.
    """
    mv = (
        version
        if isinstance(version, ModelVersion)
        else session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    )
    if mv is None:
        raise LookupError(f"no model version {version!r}")
    files = stored_files(session, model_version_id=mv.id)
    if not files:
        raise LookupError(
            f"model version {mv.version} has no files in SQL (registered before migration 0009)"
        )
    dest_root = Path(dest_root)
    dest = dest_root / _safe(mv.version)
    if folder_matches(dest, files):
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest_root))
    try:
        for name, data in session.execute(
            select(ModelFile.name, ModelFile.data).where(ModelFile.model_version_id == mv.id)
        ):
            data = bytes(data)
            if hashlib.sha256(data).hexdigest() != files[name][0]:
                raise ValueError(f"model version {mv.version}: {name} in SQL does not match its sha256")
            (tmp / _safe(name)).write_bytes(data)
        tmp.chmod(0o755)
        _move_into_place(tmp, dest, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _move_into_place(tmp: Path, dest: Path, files: dict[str, tuple[str, int]]) -> None:
    """Rename tmp to dest; a dest already there is kept if complete (another process won), else replaced."""
    for _ in range(3):
        try:
            os.rename(tmp, dest)  # atomic; fails when dest is a non-empty folder
            return
        except OSError:
            if folder_matches(dest, files):
                return
        aside = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(dest, aside)
        except FileNotFoundError:
            continue  # another process moved it away at the same moment: try again
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not put the model files in place at {dest}")


def local_artifact(session: Session, *, model_version: ModelVersion, cache_dir: Path | None) -> Path | None:
    """The folder this host reads a model version from, or None when it has none.

    The registered folder (artifact_path) when it is here and its files match the hashes in SQL; else the
    files from SQL written under cache_dir (`materialize`; with cache_dir None nothing is written and the
    answer is None). A version registered before its files were kept in SQL: its registered folder if it
    holds a meta.json here, else None (the callers' fallback: the configured model, or "not on this host").
    """
    registered = Path(model_version.artifact_path)
    files = stored_files(session, model_version_id=model_version.id)
    if not files:
        return registered if (registered / "meta.json").is_file() else None
    if folder_matches(registered, files):
        return registered
    if cache_dir is None:
        return None
    return materialize(session, model_version, cache_dir)
