"""worker.recovery: which errors are transient, the back-off, task retries, and re-sending lost messages."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import create_engine, text, update
from sqlalchemy.exc import IntegrityError

from config import load_settings
from intake.formats import ImageDecodeError
from store.db import session_scope
from store.studies import claim_studies
from store.tables import Study, StudyStatus, utcnow
from tests.procs import free_port
from tests.worker.conftest import Seeded, seed
from worker.app import make_celery
from worker.recovery import is_transient, resend_lost, retry_delay_s, retry_transient


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Default settings with the data dir under tmp_path."""
    for key in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    return load_settings()


def _error(fn) -> BaseException:  # noqa: ANN001
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("expected an error")


def test_outages_are_transient_bad_input_is_not(tmp_path: Path) -> None:
    """Real errors: a database or broker that refuses connections is transient; bad data is not."""
    closed = free_port()
    pg_down = _error(lambda: create_engine(f"postgresql+psycopg://u@127.0.0.1:{closed}/x").connect())
    broker_down = _error(
        lambda: Connection(f"redis://127.0.0.1:{closed}/0", connect_timeout=1).ensure_connection(
            max_retries=1
        )
    )
    assert is_transient(pg_down), repr(pg_down)
    assert is_transient(broker_down), repr(broker_down)

    engine = create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))

    def insert_again() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))

    duplicate = _error(insert_again)
    assert isinstance(duplicate, IntegrityError) and not is_transient(duplicate)
    assert not is_transient(ImageDecodeError("PNG pixel data could not be decoded"))
    assert not is_transient(ValueError("bad"))


def test_backoff_is_exponential_with_full_jitter(settings) -> None:  # noqa: ANN001
    """Each delay lies in [0, min(max, base * 2**n)]; the spread reaches both ends (full jitter)."""
    base, cap = settings.task_retry_backoff_s, settings.task_retry_backoff_max_s
    for n in range(12):
        ceiling = min(cap, base * 2**n)
        delays = [retry_delay_s(n, settings) for _ in range(400)]
        assert all(0.0 <= d <= ceiling for d in delays), (n, max(delays))
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling, (n, min(delays), max(delays))
    assert retry_delay_s(10_000, settings) <= cap, "no overflow for a huge retry count"


def test_a_task_retries_transient_errors_a_bounded_number_of_times(settings) -> None:  # noqa: ANN001
    """Celery's own retry (eager apply, so every retry runs at once): N retries, then the error; bad input
    is raised at the first call, never retried."""
    app = make_celery(settings.with_overrides(task_max_retries=3), set_as_current=False)
    calls: list[int] = []
    closed = free_port()

    @app.task(bind=True, name="test.flaky")
    def flaky(self, kind: str) -> str:  # noqa: ANN001
        calls.append(self.request.retries)
        with retry_transient(self, app.settings):
            if kind == "outage":
                create_engine(f"postgresql+psycopg://u@127.0.0.1:{closed}/x").connect()
            if kind == "outage-then-ok" and self.request.retries < 2:
                raise ConnectionResetError("connection reset by peer")
            if kind == "bad":
                raise ImageDecodeError("not an image")
            return "ok"

    assert flaky.apply(args=["outage-then-ok"]).get() == "ok"
    assert calls == [0, 1, 2]
    calls.clear()
    with pytest.raises(Exception) as outage:
        flaky.apply(args=["outage"]).get()
    assert is_transient(outage.value) and calls == [0, 1, 2, 3]
    calls.clear()
    with pytest.raises(ImageDecodeError):
        flaky.apply(args=["bad"]).get()
    assert calls == [0]


def _age(url: str, ids: list[int], seconds: float) -> None:
    with session_scope(url) as s:
        s.execute(
            update(Study).where(Study.id.in_(ids)).values(updated_at=utcnow() - timedelta(seconds=seconds))
        )


def test_resend_lost_compares_sql_with_the_broker(seeded: Seeded, settings) -> None:  # noqa: ANN001
    """QUEUED longer than the grace with too few messages in the queue: re-sent once; otherwise left alone."""
    settings = settings.with_overrides(database_url=seeded.url, chunk_size=2, requeue_lost_after_s=30)
    old, old2, running, fresh = seeded.study_ids
    with session_scope(seeded.url) as s:
        claim_studies(s, study_ids=[running], token="live", lease_s=600, max_attempts=3)
    _age(seeded.url, [old, old2, running], 120)
    sent: list[list[int]] = []

    def enqueue(ids, size) -> int:  # noqa: ANN001
        sent.append(list(ids))
        return 1

    def broker_down() -> int:
        raise ConnectionRefusedError("broker down")

    # Two stale studies fit in one message of 2: the queue may still hold them.
    assert resend_lost(settings, queue_depth=lambda: 1, enqueue=enqueue) == []
    assert resend_lost(settings, queue_depth=broker_down, enqueue=enqueue) == []
    assert sent == []
    # An empty queue: the two stale QUEUED studies are gone from the broker; RUNNING and fresh ones are not.
    assert resend_lost(settings, queue_depth=lambda: 0, enqueue=enqueue) == [old, old2]
    assert sent == [[old, old2]]
    assert resend_lost(settings, queue_depth=lambda: 0, enqueue=enqueue) == [], "re-sent ones are fresh again"
    with session_scope(seeded.url) as s:
        states = {i: s.get(Study, i).status for i in seeded.study_ids}
    assert states == {
        old: StudyStatus.QUEUED,
        old2: StudyStatus.QUEUED,
        running: StudyStatus.RUNNING,
        fresh: StudyStatus.QUEUED,
    }


def test_resend_lost_ignores_batches_never_started(db_url: str, settings) -> None:  # noqa: ANN001
    """RECEIVED studies (a batch created without `start`) are never sent, however old."""
    s = seed(db_url, [b"a", b"b"], queued=False)
    _age(db_url, s.study_ids, 86_400)
    settings = settings.with_overrides(database_url=db_url)
    assert resend_lost(settings, queue_depth=lambda: 0, enqueue=lambda ids, size: 1) == []


def test_two_reconcilers_at_once_send_each_lost_study_once(pg_url: str, settings) -> None:  # noqa: ANN001
    """Two beats firing together: the compare-and-set on updated_at gives each study to one of them."""
    s = seed(pg_url, [f"img-{i}".encode() for i in range(40)])
    _age(pg_url, s.study_ids, 600)
    settings = settings.with_overrides(database_url=pg_url)
    got: list[list[int]] = [[], [], [], []]
    barrier = threading.Barrier(len(got))

    def run(slot: int) -> None:
        barrier.wait()
        resend_lost(settings, queue_depth=lambda: 0, enqueue=lambda ids, size: got[slot].extend(ids) or 1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    flat = [i for ids in got for i in ids]
    assert sorted(flat) == s.study_ids, "every lost study re-sent exactly once"
