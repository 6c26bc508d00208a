"""The Celery app's configuration, and that sending tasks never drags TensorFlow into the web process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from config import load_settings
from tests.procs import REPO_ROOT
from worker.app import (
    EXPLAIN_QUEUE,
    EXPLAIN_TASK,
    INFERENCE_QUEUE,
    RABBITMQ_CONSUMER_TIMEOUT_S,
    RECONCILE_TASK,
    RETRAIN_TASK,
    SCREEN_TASK,
    TRAINING_QUEUE,
    make_celery,
)


def test_reliability_settings(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Late acks, requeue on a lost worker, prefetch 1, JSON only, time limits, no result backend."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_RUNNING_LEASE_S", "300")
    settings = load_settings()
    conf = make_celery(settings, set_as_current=False).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_ignore_result
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit < settings.running_lease_s
    assert conf.task_routes[SCREEN_TASK]["queue"] == INFERENCE_QUEUE
    assert {q.name for q in conf.task_queues} == {INFERENCE_QUEUE, TRAINING_QUEUE, EXPLAIN_QUEUE}
    # Heat maps never wait in front of screening: they have a queue of their own.
    assert conf.task_routes[EXPLAIN_TASK]["queue"] == EXPLAIN_QUEUE
    schedule = conf.beat_schedule["reconcile-stuck-studies"]
    assert schedule["task"] == RECONCILE_TASK and schedule["schedule"] == settings.reconcile_every_s
    # Embedded broker: every folder under the data dir, created up front.
    options = conf.broker_transport_options
    for key in ("data_folder_in", "data_folder_out", "control_folder"):
        assert Path(options[key]).is_dir() and Path(options[key]).is_relative_to(tmp_path)


def test_redis_visibility_timeout_outlasts_any_task(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Redis re-delivers unacked messages after visibility_timeout: it must exceed the hard time limit."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("CXR_TASK_HARD_TIME_LIMIT_S", "3000")
    conf = make_celery(load_settings(), set_as_current=False).conf
    assert conf.broker_transport_options["visibility_timeout"] > 2 * conf.task_time_limit
    # Redis does not redeliver on connection loss: a cancelled chunk would wait for its lease (issue 13).
    assert not conf.worker_cancel_long_running_tasks_on_connection_loss


def test_rabbitmq_settings(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """AMQP: no visibility timeout (RabbitMQ redelivers on connection loss); a lost connection cancels."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    settings = load_settings()
    conf = make_celery(settings, set_as_current=False).conf
    assert "visibility_timeout" not in conf.broker_transport_options
    assert conf.task_acks_late and conf.worker_cancel_long_running_tasks_on_connection_loss
    assert settings.task_hard_time_limit_s < RABBITMQ_CONSUMER_TIMEOUT_S, "ack before RabbitMQ gives up"


def test_sending_tasks_imports_no_model_code(tmp_path: Path) -> None:
    """What the web imports to enqueue (worker.app) loads neither TensorFlow nor the model or tasks."""
    code = (
        "import sys, worker.app\n"
        "bad = [m for m in ('tensorflow', 'keras', 'ai_edge_litert', 'cv2', 'model', 'worker.tasks') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {"PATH": "/usr/bin:/bin", "CXR_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_retraining_is_scheduled_on_its_own_queue(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """CXR_RETRAIN_CRON drives beat's retraining entry on the training queue; "off" removes it."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_RETRAIN_CRON", "30 3 * * 1")
    conf = make_celery(load_settings(), set_as_current=False).conf
    entry = conf.beat_schedule["retrain"]
    assert entry["task"] == RETRAIN_TASK and entry["options"]["queue"] == TRAINING_QUEUE
    assert (entry["schedule"].minute, entry["schedule"].hour, entry["schedule"].day_of_week) == (
        {30},
        {3},
        {1},
    )
    assert conf.task_routes["cxr.retrain*"]["queue"] == TRAINING_QUEUE
    monkeypatch.setenv("CXR_RETRAIN_CRON", "off")
    assert "retrain" not in make_celery(load_settings(), set_as_current=False).conf.beat_schedule
