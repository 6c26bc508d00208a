"""The Celery app factory, its configuration, and the one way to the queue. No TensorFlow, no app at import.

Other packages use `enqueue_after_commit` (screening: commit, then send), `send_retrain` and the task names;
the worker process registers the tasks themselves through `include=["worker.tasks"]`. `celery -A worker.main`
builds the app a worker or beat runs (Flask's Celery pattern: a small module the command points at).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from celery.schedules import crontab
from kombu import Exchange, Queue
from sqlalchemy.orm import Session

from config import Settings, load_settings
from store.studies import chunked

log = logging.getLogger(__name__)

SCREEN_TASK = "cxr.screen_chunk"
RECONCILE_TASK = "cxr.reconcile"
RETRAIN_TASK = "cxr.retrain"
EXPLAIN_TASK = "cxr.explain"
DICOM_RESULTS_TASK = "cxr.dicom_results"
INFERENCE_QUEUE = "inference"
TRAINING_QUEUE = "training"
# Heat maps: a queue of their own so they never hold up screening (a worker consumes it beside inference).
EXPLAIN_QUEUE = "explain"


def broker_folders(settings: Settings) -> dict[str, Path]:
    """The embedded broker's folders under data_dir/broker (messages, consumed copies, exchange tables)."""
    root = settings.data_dir / "broker"
    return {"queue": root / "queue", "processed": root / "processed", "control": root / "control"}


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options: folders for the filesystem broker, a visibility timeout for Redis."""
    if settings.uses_filesystem_broker:
        folders = broker_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            # One folder both ways: producers and consumers on this machine share the same queue files.
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            # Consumed messages are deleted, not archived: the broker must not grow with every batch.
            "store_processed": False,
            "processed_folder": str(folders["processed"]),
            # The folder is polled, also between two tasks of a prefork worker: 20 ms took a 500-study batch
            # from 104 to 138 studies/s (vs 0.1 s) for ~1% of a core while idle.
            "polling_interval": 0.02,
        }
    if is_amqp(settings.broker_url):
        # RabbitMQ has no visibility timeout: it redelivers an unacked message when the consumer's connection
        # closes (a dead worker host: at once), and closes a channel whose delivery stays unacked longer than
        # the server's consumer_timeout (make_celery checks the hard time limit against it).
        return {}
    # Redis re-delivers an unacknowledged message after visibility_timeout: it must exceed the longest
    # late-acked task (the hard limit) plus the time a prefetched message may wait, or a task would run twice.
    # Retraining (hours) is acknowledged on receipt, so it does not count here.
    return {"visibility_timeout": max(3600, 2 * settings.task_hard_time_limit_s + 600)}


# RabbitMQ's default consumer_timeout (3.8.15 and later): a late-acked delivery must be acked before it.
RABBITMQ_CONSUMER_TIMEOUT_S = 1800


def is_amqp(broker_url: str) -> bool:
    """True for a RabbitMQ (AMQP) broker URL."""
    return broker_url.split("://", 1)[0] in {"amqp", "amqps", "pyamqp", "librabbitmq"}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every periodic job, declared in this one place: the reconciler and retraining (CXR_RETRAIN_CRON)."""
    schedule: dict[str, dict[str, Any]] = {
        "reconcile-stuck-studies": {
            "task": RECONCILE_TASK,
            "schedule": float(settings.reconcile_every_s),
            # A reconcile nobody ran in time is useless later; do not let them pile up while workers are down.
            "options": {"queue": INFERENCE_QUEUE, "expires": float(settings.reconcile_every_s)},
        },
    }
    if settings.retrain_cron != "off":
        minute, hour, day_of_month, month, day_of_week = settings.retrain_cron.split()
        schedule["retrain"] = {
            "task": RETRAIN_TASK,
            "schedule": crontab(
                minute=minute,
                hour=hour,
                day_of_week=day_of_week,
                day_of_month=day_of_month,
                month_of_year=month,
            ),
            "kwargs": {"trigger": "schedule"},
            # Two ticks at once (two beats, a restart) are harmless: the run takes a lock in SQL.
            "options": {"queue": TRAINING_QUEUE},
        }
    return schedule


class CxrCelery(Celery):
    """A Celery app that carries the settings it was built from (tasks read them as `app.settings`)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__("cxr", include=["worker.tasks"], **kwargs)
        self.settings = settings


def make_celery(settings: Settings | None = None, *, set_as_current: bool = True) -> CxrCelery:
    """Build a Celery app for these settings (tests build one per throwaway broker)."""
    settings = settings or load_settings()
    app = CxrCelery(settings, set_as_current=set_as_current)
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Results live in SQL; no result backend.
        task_ignore_result=True,
        result_backend=None,
        # At-least-once delivery: ack after the task ran, requeue when the child process died under it.
        # A study that kills its worker every time is capped by the attempt counter in SQL, not here.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # RabbitMQ redelivers a late-acked task at once when the worker's connection is lost: cancel the
        # running copy rather than finish it twice (Celery's advice with acks_late). Redis redelivers only
        # after the visibility timeout (an hour), or never when it restarted empty: cancelling there would
        # leave the chunk's studies RUNNING until their lease ends, so the running copy finishes in SQL.
        worker_cancel_long_running_tasks_on_connection_loss=is_amqp(settings.broker_url),
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_hard_time_limit_s,
        task_default_queue=INFERENCE_QUEUE,
        task_queues=(
            Queue(INFERENCE_QUEUE, Exchange(INFERENCE_QUEUE), routing_key=INFERENCE_QUEUE),
            Queue(TRAINING_QUEUE, Exchange(TRAINING_QUEUE), routing_key=TRAINING_QUEUE),
            Queue(EXPLAIN_QUEUE, Exchange(EXPLAIN_QUEUE), routing_key=EXPLAIN_QUEUE),
        ),
        task_routes={
            SCREEN_TASK: {"queue": INFERENCE_QUEUE},
            RECONCILE_TASK: {"queue": INFERENCE_QUEUE},
            EXPLAIN_TASK: {"queue": EXPLAIN_QUEUE},
            DICOM_RESULTS_TASK: {"queue": EXPLAIN_QUEUE},  # needs the Keras model, like heat maps
            "cxr.retrain*": {"queue": TRAINING_QUEUE},
        },
        task_annotations={
            # Acknowledged on receipt: a training run that kills its process is not redelivered in a loop;
            # its lock's lease runs out and the next scheduled (or requested) run starts afresh.
            RETRAIN_TASK: {
                "acks_late": False,
                "time_limit": settings.retrain_time_limit_s,
                "soft_time_limit": max(60, settings.retrain_time_limit_s - 60),
            }
        },
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
        enable_utc=True,
        # The model loads in worker_process_init (TensorFlow takes seconds); the default 4 s kills the child.
        worker_proc_alive_timeout=180,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    if is_amqp(settings.broker_url) and settings.task_hard_time_limit_s >= RABBITMQ_CONSUMER_TIMEOUT_S:
        log.warning(
            "task hard time limit %d s >= RabbitMQ's default consumer_timeout %d s: raise consumer_timeout "
            "on the broker or a long chunk is redelivered while it runs",
            settings.task_hard_time_limit_s,
            RABBITMQ_CONSUMER_TIMEOUT_S,
        )
    return app


_default: dict[str, CxrCelery] = {}
_default_lock = threading.Lock()


def default_app() -> CxrCelery:
    """This process's app from its environment, built on first use (never at import), then reused."""
    with _default_lock:
        if "app" not in _default:
            _default["app"] = make_celery(set_as_current=False)
        return _default["app"]


def settings_of(app: Celery) -> Settings:
    """The settings a CxrCelery app was built from."""
    if not isinstance(app, CxrCelery):
        raise TypeError(f"expected an app made by worker.app.make_celery, got {app!r}")
    return app.settings


def send_screen_chunks(
    study_ids: Sequence[int], *, app: CxrCelery | None = None, chunk_size: int | None = None
) -> int:
    """Enqueue screening tasks for these (committed, QUEUED) studies by task name; returns the task count."""
    app = app or default_app()
    size = chunk_size or app.settings.chunk_size
    chunks = chunked(sorted(set(int(i) for i in study_ids)), size)
    if not chunks:
        return 0
    queue = app.amqp.queues[INFERENCE_QUEUE]
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            # declare=[queue]: the embedded broker routes through its exchange table, which must exist even
            # when no worker has started yet, or the message would be dropped as undeliverable.
            app.send_task(SCREEN_TASK, args=[chunk], queue=queue, producer=producer, declare=[queue])
    return len(chunks)


def send_explain(study_ids: Sequence[int], model_version_id: int, *, app: CxrCelery | None = None) -> int:
    """Enqueue heat-map tasks for these studies' (committed) predictions by one model version."""
    app = app or default_app()
    chunks = chunked(sorted(set(int(i) for i in study_ids)), app.settings.chunk_size)
    queue = app.amqp.queues[EXPLAIN_QUEUE]
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(
                EXPLAIN_TASK,
                args=[chunk],
                kwargs={"model_version_id": int(model_version_id)},
                queue=queue,
                producer=producer,
                declare=[queue],
            )
    return len(chunks)


def send_dicom_results(study_ids: Sequence[int], *, app: CxrCelery | None = None) -> None:
    """Ask for the DICOM results (SR, Grad-CAM SC) of these committed, DONE studies; one task for them all."""
    ids = sorted(set(int(i) for i in study_ids))
    if not ids:
        return
    app = app or default_app()
    queue = app.amqp.queues[EXPLAIN_QUEUE]
    app.send_task(DICOM_RESULTS_TASK, args=[ids], queue=queue, declare=[queue])


def enqueue_after_commit(session: Session, study_ids: Sequence[int]) -> str | None:
    """Commit the session (the studies are QUEUED in it), THEN send their screening tasks.

    The one way web and intake reach the queue. Returns None when sent, else the reason it failed: the
    studies are saved QUEUED and the reconciler sends them again (worker.recovery.resend_lost).
    """
    session.commit()
    if not study_ids:
        return None
    try:
        send_screen_chunks(list(study_ids))
    except Exception as exc:  # noqa: BLE001 - the rows are committed; the caller tells the user
        log.exception("enqueueing %d studies failed", len(study_ids))
        return f"{type(exc).__name__}: {exc}"
    return None


def send_retrain(trigger: str, *, app: CxrCelery | None = None) -> str:
    """Ask for one retraining run on the training queue (admin button, CLI); returns the task id.

    Nothing is written here: the task takes the retraining lock in SQL itself, so extra requests are skipped.
    """
    app = app or default_app()
    queue = app.amqp.queues[TRAINING_QUEUE]
    return app.send_task(RETRAIN_TASK, kwargs={"trigger": trigger}, queue=queue).id


def broker_ping(app: CxrCelery | None = None, *, timeout_s: float = 3.0) -> tuple[bool, str]:
    """The broker accepts a connection within timeout_s (readiness); (ok, detail)."""
    app = app or default_app()
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
            transport = conn.transport_cls
        return True, f"{transport} broker reachable"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the detail says which
        return False, f"broker unreachable: {type(exc).__name__}: {exc}"[:300]


def queue_depths(app: CxrCelery | None = None, *, timeout_s: float = 3.0) -> dict[str, int]:
    """Messages waiting in each of our queues, asked of the broker now (a passive declare: nothing is made).

    Counts ready messages only (not those a worker holds unacknowledged). A queue the broker does not know
    yet counts 0. Raises when the broker is unreachable.
    """
    app = app or default_app()
    depths: dict[str, int] = {}
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout_s)
        for name in (INFERENCE_QUEUE, EXPLAIN_QUEUE, TRAINING_QUEUE):
            channel = conn.channel()
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                depths[name] = 0  # AMQP: NOT_FOUND closes the channel; nothing was ever sent there
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return depths
