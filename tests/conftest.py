"""Shared fixtures: throwaway SQLite/PostgreSQL databases, Redis, and service availability rules.

PostgreSQL and Redis tests run for real under CI=true (a missing service is then a failure, not a skip);
elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from store import migrate
from store.db import dispose_all, session_scope
from store.tables import Role, User
from store.users import create_user
from tests.hardening_results import pytest_configure  # noqa: F401 - writes docs/hardening_results.md

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PG_ADMIN_URL = os.environ.get("CXR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, under CI=true, fail) when a service is not reachable."""
    if _port_open(host, port):
        return
    msg = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(msg + " and CI=true requires it")
    pytest.skip(msg + " (start it, or run in CI where it is required)")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database in a temporary folder."""
    url = f"sqlite:///{tmp_path / 'test.sqlite3'}"
    migrate.upgrade(url)
    yield url
    dispose_all()


def _fresh_pg_database() -> tuple[str, str]:
    name = "cxr_t_" + secrets.token_hex(6)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop_pg_database(name: str) -> None:
    dispose_all()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """An empty throwaway PostgreSQL database (dropped afterwards)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name, url = _fresh_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)


@pytest.fixture
def pg_url(pg_empty_url: str) -> str:
    """A migrated throwaway PostgreSQL database."""
    migrate.upgrade(pg_empty_url)
    return pg_empty_url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    db = secrets.randbelow(14) + 1
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ virtual host of its own (made and deleted with rabbitmqctl), guest/guest.

    Without rabbitmqctl on this machine: the default vhost, our queues purged before and after (a run beside
    another one on the same broker could then take its messages: the vhost is the isolation that matters).
    """
    require_service("RabbitMQ", RABBITMQ_HOST, RABBITMQ_PORT)
    import shutil
    import subprocess

    ctl = shutil.which("rabbitmqctl")
    base = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}"
    if ctl is None:
        url = base + "//"
        _purge_rabbitmq(url)
        yield url
        _purge_rabbitmq(url)
        return
    vhost = "cxr_t_" + secrets.token_hex(6)
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, timeout=60)
    try:
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, timeout=60
        )
        yield f"{base}/{vhost}"
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], check=False, timeout=60)


def _purge_rabbitmq(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        for name in ("inference", "explain", "training"):
            channel = conn.channel()
            try:
                channel.queue_purge(name)
            except conn.channel_errors:
                pass  # not declared yet
            finally:
                channel.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


def make_user(
    db_url: str, username: str, role: Role = Role.USER, password: str = "correct horse battery"
) -> int:
    """Create a user and return its id."""
    with session_scope(db_url) as session:
        user: User = create_user(session, username=username, password=password, role=role)
        return user.id


def require_shared_data() -> None:
    """Skip (or, under CI=true, fail) when ../shared/data is not beside this checkout."""
    if not (SHARED_DATA / "cxr" / "manifest.csv").exists():
        if IN_CI:
            pytest.fail(f"{SHARED_DATA} is missing and CI=true requires it")
        pytest.skip(f"{SHARED_DATA} is not present beside this checkout")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a skip when this checkout has no shared/ beside it."""
    require_shared_data()
    return SHARED_DATA


@pytest.fixture(scope="session")
def predictor():  # noqa: ANN201
    """The committed default model, loaded as the worker loads it, once per test session."""
    from model.serve import load_predictor

    try:
        return load_predictor()
    except FileNotFoundError as exc:
        if IN_CI:
            raise
        pytest.skip(f"no trained model artifact yet: {exc}")
