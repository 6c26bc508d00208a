"""Engine and session handling: one engine per process, one session per unit of work."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sqlalchemy import Engine, Insert, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, tuple[int, Engine]] = {}
# Threads share the cache (the DICOM receiver's association threads, the web's request threads): one lock, so
# two threads never build two engines for one URL and dispose_all never iterates while another thread inserts.
_engines_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys so web and worker can share it."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, pool_pre_ping=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def get_engine(url: str) -> Engine:
    """Return this process's engine for url; a forked child never reuses its parent's connections."""
    pid = os.getpid()
    cached = _engines.get(url)
    if cached and cached[0] == pid:
        return cached[1]
    with _engines_lock:
        cached = _engines.get(url)
        if cached and cached[0] == pid:
            return cached[1]
        if cached:
            # Inherited across fork: drop the pool without closing the parent's sockets.
            cached[1].dispose(close=False)
        engine = make_engine(url)
        _engines[url] = (pid, engine)
        return engine


def dispose_all() -> None:
    """Dispose every cached engine (tests, shutdown)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for _pid, engine in engines:
        engine.dispose()


def session_factory(url: str) -> sessionmaker[Session]:
    """A sessionmaker bound to this process's engine for url."""
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str, *, hold_connection: bool = False) -> Iterator[Session]:
    """One session: commit on success, roll back on error, always close.

    hold_connection: keep one pooled connection for the whole scope, across the session's commits. By default
    every commit hands the connection back and the next statement checks one out again, with a ping (a round
    trip each); a worker task that commits three times per chunk saves those.
    """
    with ExitStack() as stack:
        if hold_connection:
            session = Session(bind=stack.enter_context(get_engine(url).connect()), expire_on_commit=False)
        else:
            session = session_factory(url)()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


def insert_ignore(session: Session, model: type) -> Insert:
    """An INSERT that the caller finishes with .on_conflict_do_nothing(); PostgreSQL and SQLite only."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(model)
    if name == "sqlite":
        return sqlite.insert(model)
    raise RuntimeError(f"unsupported database dialect {name}")
