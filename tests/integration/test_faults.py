"""Faults with REAL worker processes: a worker SIGKILLed mid-batch, and a study that kills every worker."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from store.studies import out_of_attempts_reason
from store.tables import StudyStatus
from tests.integration.helpers import assert_done_exactly_once, finished, make_batch, outcome, progress
from tests.procs import (
    kill,
    log_tail,
    sample_images,
    service_env,
    settings_from_env,
    start_beat,
    start_worker,
    wait_for,
)
from worker.app import make_celery, send_screen_chunks

pytestmark = pytest.mark.slow


@pytest.fixture(
    params=[
        "sqlite+filesystem",
        pytest.param("postgresql+redis", marks=pytest.mark.services),
        pytest.param("postgresql+rabbitmq", marks=pytest.mark.services),
    ]
)
def stack(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(database URL, broker URL): the embedded stack, PostgreSQL + Redis, and PostgreSQL + RabbitMQ."""
    if request.param == "sqlite+filesystem":
        return request.getfixturevalue("sqlite_url"), None
    if request.param == "postgresql+rabbitmq":
        return request.getfixturevalue("pg_url"), request.getfixturevalue("rabbitmq_url")
    return request.getfixturevalue("pg_url"), request.getfixturevalue("redis_url")


def test_sigkill_mid_batch_then_new_worker_and_reconciler(
    data_dir: Path, procs: list, stack: tuple[str, str | None]
) -> None:
    """Kill -9 the worker while it runs a chunk; a new worker + beat's reconciler finish every study once."""
    url, broker = stack
    env = service_env(
        data_dir,
        database_url=url,
        broker_url=broker,
        chunk_size=8,
        # Short leases so the reconciler takes over the dead worker's studies within seconds.
        running_lease_s=5,
        queued_lease_s=10,
        reconcile_every_s=2,
    )
    app = make_celery(settings_from_env(env), set_as_current=False)
    images = sample_images(40)
    batch_id, ids = make_batch(url, images, lease_s=10)

    first = start_worker(env)
    procs.append(first)
    send_screen_chunks(ids, app=app)

    def mid_batch() -> bool:
        p = progress(url, batch_id)
        return p.done >= 8 and p.running > 0

    # Polled every 10 ms: the kill lands early in a chunk's run (tens of ms of inference), not after it.
    wait_for(mid_batch, 120, interval=0.01, message="the first worker to be in the middle of the batch")
    kill(first)
    at_kill = progress(url, batch_id)
    assert not at_kill.finished and at_kill.running > 0, at_kill

    procs.append(start_worker(env))
    procs.append(start_beat(env))
    done = wait_for(lambda: finished(url, batch_id), 180, message="the batch to finish after the kill")
    assert (done.done, done.failed) == (len(ids), 0), (outcome(url, batch_id), log_tail(procs[-2]))
    assert_done_exactly_once(url, ids)
    retried = [sid for sid, st in outcome(url, batch_id).items() if st[2] > 1]
    assert retried, "the studies the killed worker held were delivered again"


def test_poison_study_fails_after_max_deliveries_others_done(
    data_dir: Path, procs: list, stack: tuple[str, str | None]
) -> None:
    """A study whose worker process dies every time ends FAILED after N deliveries; its chunk-mates DONE."""
    url, broker = stack
    images = sample_images(4)
    poison = images[2][1]
    env = service_env(data_dir, database_url=url, broker_url=broker, chunk_size=4, max_attempts=2)
    env["TEST_POISON_SHA256"] = hashlib.sha256(poison).hexdigest()
    app = make_celery(settings_from_env(env), set_as_current=False)
    batch_id, ids = make_batch(url, images)

    worker = start_worker(env, app="tests.integration.poison_app")
    procs.append(worker)
    started = time.monotonic()
    send_screen_chunks(ids, app=app)
    result = wait_for(lambda: finished(url, batch_id), 180, message="the poisoned batch to finish")
    assert (result.done, result.failed) == (3, 1), log_tail(worker)

    states = outcome(url, batch_id)
    assert states[ids[2]][:3] == (StudyStatus.FAILED, out_of_attempts_reason(2), 2)
    assert_done_exactly_once(url, [i for i in ids if i != ids[2]])
    assert worker.poll() is None, "the worker itself survives its pool processes dying"
    assert time.monotonic() - started < 180
