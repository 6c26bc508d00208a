"""Model files in SQL: stored when registered, written to a host's cache, checked, replaced if corrupt.

No TensorFlow here: a small folder of arbitrary files stands in for an artifact
(tests/worker/test_model_from_sql.py serves the real model from the cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from store.db import session_scope
from store.health import check_serving_model
from store.model_files import cache_root, local_artifact, materialize, stored_files
from store.models_registry import register_model_version, serving_version
from store.tables import ModelFile, ModelVersion

VERSION = "cnn-20261202-abcdef12"


def _artifact(folder: Path) -> dict[str, bytes]:
    """A folder shaped like an artifact (its bytes differ per file; model.tflite is the big one)."""
    files = {
        "meta.json": b'{"version": "%s"}\n' % VERSION.encode(),
        "model.tflite": os.urandom(300_000),
        "model.keras": os.urandom(50_000),
        "card.md": b"# card\n",
        "oof.csv": b"study,label\n1,normal\n",
    }
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "subdir").mkdir()  # not a regular file: not stored
    return files


def _register(url: str, folder: Path, *, sha: str = "a" * 64, version: str = VERSION) -> int:
    with session_scope(url) as s:
        return register_model_version(s, version=version, artifact_path=str(folder), artifact_sha256=sha).id


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_registration_stores_every_file_once(db_url: str, tmp_path: Path) -> None:
    """Every regular file of the folder is stored with its sha256 and size; registering again adds nothing."""
    files = _artifact(tmp_path / "trainer" / VERSION)
    mv_id = _register(db_url, tmp_path / "trainer" / VERSION)
    _register(db_url, tmp_path / "trainer" / VERSION)
    with session_scope(db_url) as s:
        stored = stored_files(s, model_version_id=mv_id)
        assert stored == {n: (hashlib.sha256(d).hexdigest(), len(d)) for n, d in files.items()}
        assert s.scalar(select(func.count(ModelFile.id))) == len(files)
        assert (
            bytes(s.scalar(select(ModelFile.data).where(ModelFile.name == "model.tflite")))
            == (files["model.tflite"])
        )


def test_a_version_registered_without_its_folder_gets_files_from_the_same_artifact_only(
    db_url: str, tmp_path: Path
) -> None:
    """No folder: no rows (the old fallback applies). Registered again from a folder: the files are stored
    when that folder's artifact_sha256 is the registered one, never from a different artifact."""
    mv_id = _register(db_url, tmp_path / "elsewhere", sha="a" * 64)
    _artifact(tmp_path / "other")
    _register(db_url, tmp_path / "other", sha="b" * 64)
    with session_scope(db_url) as s:
        assert stored_files(s, model_version_id=mv_id) == {}
    _register(db_url, tmp_path / "other", sha="a" * 64)
    with session_scope(db_url) as s:
        assert set(stored_files(s, model_version_id=mv_id)) == {
            "meta.json",
            "model.tflite",
            "model.keras",
            "card.md",
            "oof.csv",
        }


def test_materialize_writes_reuses_and_replaces_a_corrupt_copy(db_url: str, tmp_path: Path) -> None:
    """The folder is written from SQL with the same bytes; a complete one is reused as is; a corrupted file or
    a missing one gets the whole folder replaced; no temporary folder stays behind."""
    files = _artifact(tmp_path / "trainer" / VERSION)
    _register(db_url, tmp_path / "trainer" / VERSION)
    shutil.rmtree(tmp_path / "trainer")
    cache = cache_root(tmp_path / "worker-data")
    with session_scope(db_url) as s:
        dest = materialize(s, VERSION, cache)
    assert dest == cache / VERSION and _contents(dest) == files
    assert sorted(p.name for p in cache.iterdir()) == [VERSION]

    inode = (dest / "model.tflite").stat().st_ino
    with session_scope(db_url) as s:
        assert materialize(s, VERSION, cache) == dest
    assert (dest / "model.tflite").stat().st_ino == inode  # reused, not rewritten

    broken = bytearray(files["model.tflite"])
    broken[1000] ^= 0xFF  # same size, one byte flipped
    (dest / "model.tflite").write_bytes(bytes(broken))
    with session_scope(db_url) as s:
        assert materialize(s, VERSION, cache) == dest
    assert _contents(dest) == files

    (dest / "meta.json").unlink()
    with session_scope(db_url) as s:
        assert materialize(s, VERSION, cache) == dest
    assert _contents(dest) == files
    assert sorted(p.name for p in cache.iterdir()) == [VERSION]


def test_materialize_refuses_bytes_that_do_not_match_their_hash(db_url: str, tmp_path: Path) -> None:
    """A stored file whose bytes no longer match its sha256 is never written into place."""
    _artifact(tmp_path / "trainer" / VERSION)
    _register(db_url, tmp_path / "trainer" / VERSION)
    with session_scope(db_url) as s:
        s.execute(update(ModelFile).where(ModelFile.name == "model.tflite").values(data=b"not the model"))
    cache = tmp_path / "cache"
    with session_scope(db_url) as s, pytest.raises(ValueError, match="model.tflite"):
        materialize(s, VERSION, cache)
    assert not (cache / VERSION).exists() and list(cache.iterdir()) == []


def test_local_artifact_prefers_the_registered_folder_when_it_matches(db_url: str, tmp_path: Path) -> None:
    """Registered folder here and matching: used, nothing written. Changed here: the SQL copy is used. A
    version registered before files were kept in SQL: its folder if here, else None (callers fall back)."""
    registered = tmp_path / "trainer" / VERSION
    files = _artifact(registered)
    _register(db_url, registered)
    cache = tmp_path / "cache"
    with session_scope(db_url) as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.version == VERSION))
        assert local_artifact(s, model_version=mv, cache_dir=cache) == registered
        assert not cache.exists()
        (registered / "card.md").write_bytes(b"edited on this host\n")
        assert local_artifact(s, model_version=mv, cache_dir=None) is None
        assert local_artifact(s, model_version=mv, cache_dir=cache) == cache / VERSION
        assert _contents(cache / VERSION) == files

        legacy = ModelVersion(version="old-v", artifact_path=str(tmp_path / "old"), artifact_sha256="0" * 64)
        s.add(legacy)
        s.flush()
        assert local_artifact(s, model_version=legacy, cache_dir=cache) is None
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "meta.json").write_text("{}")
        assert local_artifact(s, model_version=legacy, cache_dir=cache) == tmp_path / "old"


def test_readiness_of_a_version_whose_files_are_only_in_sql(sqlite_url: str, tmp_path: Path) -> None:
    """The web (writes nothing) is ready and says the files are in SQL; the strict check (`cxr status` on a
    worker host) writes them to its cache and reads them there."""
    _artifact(tmp_path / "trainer" / VERSION)
    _register(sqlite_url, tmp_path / "trainer" / VERSION)
    shutil.rmtree(tmp_path / "trainer")
    with session_scope(sqlite_url) as s:
        assert serving_version(s).version == VERSION
    cache = tmp_path / "cache"
    ok, detail = check_serving_model(
        sqlite_url, fallback=tmp_path / "none", files_here=False, cache_dir=cache
    )
    assert ok and "files are in SQL" in detail and not cache.exists(), detail
    ok, detail = check_serving_model(sqlite_url, fallback=tmp_path / "none", cache_dir=cache)
    assert ok and str(cache / VERSION) in detail, detail
