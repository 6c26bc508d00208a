"""Faults with REAL worker processes: a worker SIGKILLed or SIGTERMed mid-batch, a study killing workers."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
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


def _mid_chunk(url: str, batch_id: int, chunk: int) -> bool:
    """One chunk is done (the model is warm) and another is RUNNING now."""
    p = progress(url, batch_id)
    return p.done >= chunk and p.running > 0


@pytest.mark.hardening("worker SIGKILLed mid-chunk: a new worker and the reconciler finish every study once")
def test_sigkill_mid_batch_then_new_worker_and_reconciler(
    data_dir: Path, procs: list, stack: tuple[str, str | None], record_property: Callable[[str, object], None]
) -> None:
    """Kill -9 the worker while it runs a chunk; a new worker + beat's reconciler finish every study once.

    Waits are on conditions with generous bounds (a loaded CI machine is slow, not wrong): the kill is retried
    with a fresh worker when the chunk happened to finish between the check and the kill.
    """
    url, broker = stack
    env = service_env(
        data_dir,
        database_url=url,
        broker_url=broker,
        chunk_size=8,
        # Short leases so the reconciler takes over the dead worker's studies within seconds, but long
        # enough that a chunk on a loaded machine finishes inside its lease (5 s was not).
        running_lease_s=15,
        queued_lease_s=20,
        reconcile_every_s=2,
    )
    app = make_celery(settings_from_env(env), set_as_current=False)
    images = sample_images(40)
    batch_id, ids = make_batch(url, images * 2, lease_s=20)
    send_screen_chunks(ids, app=app)

    for _ in range(3):
        worker = start_worker(env)
        procs.append(worker)
        # Polled every 10 ms: the kill lands early in a chunk's run, not after it.
        wait_for(
            lambda: _mid_chunk(url, batch_id, 8),
            240,
            interval=0.01,
            message="a worker in the middle of a chunk",
        )
        kill(worker)
        at_kill = progress(url, batch_id)
        if at_kill.running > 0:
            break
    else:
        pytest.fail(f"three kills all landed between chunks: {progress(url, batch_id)}")
    assert not at_kill.finished, at_kill

    procs.append(start_worker(env))
    procs.append(start_beat(env))
    done = wait_for(lambda: finished(url, batch_id), 300, message="the batch to finish after the kill")
    assert (done.done, done.failed) == (len(ids), 0), (outcome(url, batch_id), log_tail(procs[-2]))
    assert_done_exactly_once(url, ids)
    retried = [sid for sid, st in outcome(url, batch_id).items() if st[2] > 1]
    assert retried, "the studies the killed worker held were delivered again"
    record_property("measured", f"{at_kill.running} RUNNING at the kill; {len(ids)} DONE once")


@pytest.mark.hardening("worker SIGTERMed mid-chunk: warm shutdown finishes it, the next worker the rest")
def test_sigterm_mid_batch_is_a_warm_shutdown(
    data_dir: Path, procs: list, stack: tuple[str, str | None], record_property: Callable[[str, object], None]
) -> None:
    """SIGTERM (docker stop, a deploy): the running chunk finishes and is acknowledged, the waiting messages
    stay in the broker, and a new worker runs them; every study claimed exactly once."""
    url, broker = stack
    env = service_env(data_dir, database_url=url, broker_url=broker, chunk_size=8)
    app = make_celery(settings_from_env(env), set_as_current=False)
    batch_id, ids = make_batch(url, sample_images(40) * 2)
    first = start_worker(env)
    procs.append(first)
    send_screen_chunks(ids, app=app)
    wait_for(
        lambda: _mid_chunk(url, batch_id, 8),
        240,
        interval=0.01,
        message="the worker in the middle of a chunk",
    )
    stopping = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(120) == 0, log_tail(first)
    stopped_s = time.monotonic() - stopping
    at_stop = progress(url, batch_id)
    assert at_stop.running == 0 and not at_stop.finished, at_stop

    procs.append(start_worker(env))
    done = wait_for(lambda: finished(url, batch_id), 300, message="the batch to finish after the stop")
    assert (done.done, done.failed) == (len(ids), 0), outcome(url, batch_id)
    assert_done_exactly_once(url, ids)
    attempts = {sid: st[2] for sid, st in outcome(url, batch_id).items()}
    assert set(attempts.values()) == {1}, f"a warm shutdown wastes no delivery: {attempts}"
    record_property("measured", f"exit 0 after {stopped_s:.1f} s with {at_stop.done} DONE; all DONE once")


@pytest.mark.hardening("poison study (kills its worker every time): FAILED after N deliveries, others DONE")
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
    result = wait_for(lambda: finished(url, batch_id), 240, message="the poisoned batch to finish")
    assert (result.done, result.failed) == (3, 1), log_tail(worker)

    states = outcome(url, batch_id)
    assert states[ids[2]][:3] == (StudyStatus.FAILED, out_of_attempts_reason(2), 2)
    assert_done_exactly_once(url, [i for i in ids if i != ids[2]])
    assert worker.poll() is None, "the worker itself survives its pool processes dying"
    assert time.monotonic() - started < 240
