"""The retraining task's wiring through a REAL training-queue worker (the training itself: tests/retrain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.db import session_scope
from store.locks import acquire_lock
from store.retraining import RETRAIN_LOCK, list_runs
from tests.procs import service_env, settings_from_env, start_worker, wait_for
from worker.app import make_celery, send_retrain

pytestmark = pytest.mark.slow


def test_send_retrain_reaches_the_training_worker_which_respects_the_lock(
    data_dir: Path, procs: list, sqlite_url: str
) -> None:
    """send_retrain -> training queue -> cxr.retrain on a -Q training worker; a held lock means skipped."""
    env = service_env(data_dir, database_url=sqlite_url)
    app = make_celery(settings_from_env(env), set_as_current=False)
    with session_scope(sqlite_url) as session:
        assert acquire_lock(session, name=RETRAIN_LOCK, holder="someone-else", lease_s=600)

    worker = start_worker(env, queues="training", wait_ready=False)
    procs.append(worker)
    task_id = send_retrain("test", app=app)
    log = worker.log_path  # type: ignore[attr-defined]
    line = wait_for(
        lambda: next(
            (ln for ln in log.read_text().splitlines() if task_id in ln and "succeeded" in ln), None
        ),
        120,
        message="the retraining task to run on the training worker",
    )
    assert "'status': 'skipped'" in line, line
    assert "cxr worker process ready" not in log.read_text(), "a training-only worker loads no serving model"
    with session_scope(sqlite_url) as session:
        assert list_runs(session) == [], "no run is opened while another holds the lock"
