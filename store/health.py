"""Readiness checks that need SQL: the database answers, migrations are at head, the serving model's artifact.

Each check returns (ok, detail); the caller (web /readyz, `cxr status`) puts them together.
"""

from __future__ import annotations

import json
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from store.db import session_scope
from store.migrate import alembic_config
from store.model_files import local_artifact, stored_files
from store.models_registry import serving_version

# A health probe must answer within the orchestrator's time-out, so it never waits long for a dead database.
CONNECT_TIMEOUT_S = 3


def _probe_engine(url: str) -> Engine:
    """A throwaway engine with a short connect time-out (never the process's pooled engine)."""
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": CONNECT_TIMEOUT_S})
    return create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def _short(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def check_database(url: str) -> tuple[bool, str]:
    """The database accepts a connection and answers SELECT 1."""
    engine = _probe_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True, f"{engine.dialect.name} answers"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the detail says which
        return False, f"database unreachable: {_short(exc)}"
    finally:
        engine.dispose()


def migration_heads(url: str) -> tuple[set[str], set[str]]:
    """(revisions the database is at, head revisions of migrations/)."""
    script = ScriptDirectory.from_config(alembic_config(url))
    engine = _probe_engine(url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()
    return current, set(script.get_heads())


def check_migrations(url: str) -> tuple[bool, str]:
    """The database is migrated to the head revision (`cxr db upgrade` otherwise)."""
    try:
        current, heads = migration_heads(url)
    except Exception as exc:  # noqa: BLE001
        return False, f"migration state unknown: {_short(exc)}"
    if current == heads:
        return True, f"at head {', '.join(sorted(heads))}"
    at = ", ".join(sorted(current)) or "an empty schema"
    return (
        False,
        f"migrations behind: database at {at}, head is {', '.join(sorted(heads))} (run `cxr db upgrade`)",
    )


def check_artifact(path: Path) -> tuple[bool, str]:
    """An artifact folder holds a readable meta.json (parsed) and a non-empty model.tflite."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        with open(path / "model.tflite", "rb") as fh:
            if not fh.read(16):
                return False, f"model artifact {path}: model.tflite is empty"
    except (OSError, ValueError) as exc:
        return False, f"model artifact {path} not readable: {_short(exc)}"
    return True, f"model {meta.get('version', '?')} readable at {path}"


def check_serving_model(
    url: str, *, fallback: Path, files_here: bool = True, cache_dir: Path | None = None
) -> tuple[bool, str]:
    """The serving version's artifact is readable here (none serves yet: the configured one).

    The folder is found as the workers find it (store.model_files.local_artifact): the registered one when it
    is here and matches its files in SQL, else those files written under cache_dir. `files_here=False` (the
    web, which never loads the model) writes nothing: a version whose files are in SQL is ready, and so is a
    version registered before files were kept in SQL whose folder is not on this host, said so; a folder that
    is here must still be readable. Workers and `cxr status` check the files strictly.
    """
    try:
        with session_scope(url) as session:
            mv = serving_version(session)
            if mv is None:
                ok, detail = check_artifact(fallback)
                return ok, detail + " (no version serves yet; the worker registers this one)"
            version, registered = mv.version, Path(mv.artifact_path)
            in_sql = bool(stored_files(session, model_version_id=mv.id))
            path = local_artifact(session, model_version=mv, cache_dir=cache_dir if files_here else None)
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written is a failed check, said why
        return False, f"serving model unknown: {_short(exc)}"
    if path is not None:
        return check_artifact(path)
    if not files_here and in_sql:
        return True, f"{version} serves (its files are in SQL; each worker host writes its own copy)"
    if not files_here and not registered.exists():
        return True, f"{version} serves (registered in SQL; its files are on the worker hosts, not this one)"
    return check_artifact(registered)


def serving_version_name(url: str) -> str | None:
    """The version string of the serving model, or None (the /metrics info gauge reads it per scrape)."""
    with session_scope(url) as session:
        mv = serving_version(session)
        return mv.version if mv is not None else None


def drift_counts(url: str) -> dict[str, int]:
    """Recent batches with each kind of drift warning (store.drift.recent_drift), in a session of its own."""
    from store.drift import recent_drift

    with session_scope(url) as session:
        return recent_drift(session)


def drift_this_week(url: str) -> dict[str, int]:
    """kind -> 1 when this calendar week's studies cross that drift bound (store.drift.this_week_drift)."""
    from store.drift import this_week_drift

    with session_scope(url) as session:
        return this_week_drift(session)
