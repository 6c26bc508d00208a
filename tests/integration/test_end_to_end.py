"""A batch end to end through a REAL `celery worker` process (not eager mode): SQL, broker, model, SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.db import session_scope
from store.models_registry import serving_version
from store.tables import StudyStatus
from tests.integration.helpers import CORRUPT_PNG, assert_done_exactly_once, finished, make_batch, outcome
from tests.procs import sample_images, service_env, settings_from_env, start_worker, wait_for
from worker.app import make_celery, send_screen_chunks

pytestmark = pytest.mark.slow
N_IMAGES = 10


def run_batch_end_to_end(data_dir: Path, procs: list, *, database_url: str, broker_url: str | None) -> None:
    """Enqueue a batch BEFORE any worker exists (the queue must keep it), start one, check every outcome."""
    env = service_env(data_dir, database_url=database_url, broker_url=broker_url, chunk_size=4)
    app = make_celery(settings_from_env(env), set_as_current=False)
    images = sample_images(N_IMAGES)
    batch_id, ids = make_batch(database_url, images, extra=[("broken.png", CORRUPT_PNG), ("empty.png", None)])
    assert send_screen_chunks(ids, app=app) == 3  # 12 studies in chunks of 4

    procs.append(start_worker(env))
    progress = wait_for(lambda: finished(database_url, batch_id), 120, message="the batch to finish")
    assert (progress.done, progress.failed, progress.total) == (N_IMAGES, 2, N_IMAGES + 2)

    assert_done_exactly_once(database_url, ids[:N_IMAGES])
    states = outcome(database_url, batch_id)
    broken, empty = states[ids[-2]], states[ids[-1]]
    assert broken[0] == StudyStatus.FAILED and broken[1] and "Traceback" not in broken[1], broken
    assert empty[0] == StudyStatus.FAILED and "No image data" in (empty[1] or ""), empty
    assert all(s[2] == 1 for s in states.values() if s[1] != empty[1]), "one delivery each, no retries"
    with session_scope(database_url) as session:
        assert serving_version(session) is not None, "the worker registers the version it serves"


def test_embedded_broker_and_sqlite(data_dir: Path, procs: list, sqlite_url: str) -> None:
    """`make run`'s stack: kombu filesystem broker + SQLite."""
    run_batch_end_to_end(data_dir, procs, database_url=sqlite_url, broker_url=None)


@pytest.mark.services
def test_redis_and_postgresql(data_dir: Path, procs: list, pg_url: str, redis_url: str) -> None:
    """Production's stack: Redis broker + PostgreSQL (runs for real under CI=true)."""
    run_batch_end_to_end(data_dir, procs, database_url=pg_url, broker_url=redis_url)


@pytest.mark.services
def test_rabbitmq_and_postgresql(data_dir: Path, procs: list, pg_url: str, rabbitmq_url: str) -> None:
    """Celery's recommended production broker: RabbitMQ + PostgreSQL (runs for real under CI=true)."""
    run_batch_end_to_end(data_dir, procs, database_url=pg_url, broker_url=rabbitmq_url)
