"""Thin Celery tasks over worker.screening. Imported only by worker processes (via the app's include)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from celery import current_app, shared_task
from celery.signals import worker_init, worker_process_init, worker_ready

from config import Settings
from ops.metrics import RETRAIN_RUNS
from worker.app import (
    DICOM_RESULTS_TASK,
    EXPLAIN_TASK,
    INFERENCE_QUEUE,
    RECONCILE_TASK,
    RETRAIN_TASK,
    SCREEN_TASK,
    CxrCelery,
    queue_depths,
    send_dicom_results,
    send_explain,
    send_screen_chunks,
    settings_of,
)
from worker.observability import model_loaded  # connects the metrics exporter and log context (issue 14)
from worker.recovery import describe, is_transient, resend_lost, retry_transient
from worker.screening import ServingModel, reconcile_once, run_screen_task, serving_model

log = logging.getLogger("cxr.worker")
READY_MARK = "cxr worker process ready"


def _app() -> CxrCelery:
    """The app this worker runs (built by `celery -A worker.main`, or a test's make_celery)."""
    app = current_app._get_current_object()
    if not isinstance(app, CxrCelery):
        raise TypeError(f"the current Celery app {app!r} was not made by worker.app.make_celery")
    return app


def _settings() -> Settings:
    return _app().settings


def _enqueue(study_ids: Sequence[int], chunk_size: int) -> int:
    return send_screen_chunks(study_ids, app=_app(), chunk_size=chunk_size)


@worker_init.connect
def _check_model_artifact(sender: object = None, **_kwargs: object) -> None:
    """In the parent, before any pool process: refuse to start without a model rather than eat tasks.

    Only a file check: the parent never loads the model (a model loaded before fork breaks the children).
    """
    from model.serve import DEFAULT_ARTIFACT_DIR

    settings = settings_of(getattr(sender, "app", None) or _app())
    artifact = settings.model_dir or DEFAULT_ARTIFACT_DIR
    if not (artifact / "meta.json").exists():
        raise RuntimeError(f"no model artifact at {artifact} (set CXR_MODEL_DIR or train one: see README)")


@worker_process_init.connect
def _load_model_in_child(**_kwargs: object) -> None:
    """In each forked pool process: load the model once (never in the parent, before the fork).

    Inherited DB connections are not reused: store.db.get_engine keys its engines by pid, so this process
    opens its own pool on first use (and does not close the parent's sockets).
    """
    _warm_up()


@worker_ready.connect
def _load_model_in_solo_worker(sender: object = None, **_kwargs: object) -> None:
    """The solo pool runs tasks in the main process (no fork, no worker_process_init): warm up there."""
    from celery.concurrency.solo import TaskPool as SoloPool

    if isinstance(getattr(sender, "pool", None), SoloPool):
        _warm_up()


def _warm_up() -> None:
    app = _app()
    if INFERENCE_QUEUE not in app.amqp.queues.consume_from:
        return  # a training-only worker (-Q training) has no use for the serving model
    try:
        model = serving_model(app.settings)
    except Exception:
        # E.g. the database is not up yet: the first task loads it again (and fails loudly if it still can't).
        log.exception("model warm-up failed; the first task will retry")
        return
    model_loaded(model.version)
    _store_drift_reference(app, model)
    # Tests and `cxr run` wait for this line: the process can now answer at full speed.
    log.warning(
        "%s (pid %d, model %s, model_version_id %d)",
        READY_MARK,
        os.getpid(),
        model.version,
        model.model_version_id,
    )


def _store_drift_reference(app: CxrCelery, model: ServingModel) -> None:
    """The serving model's training reference for the drift watch, stored once (worker.drift)."""
    from worker.drift import ensure_reference

    try:
        ensure_reference(
            app.settings.database_url,
            predictor=model.predictor,
            model_version_id=model.model_version_id,
        )
    except Exception as exc:  # noqa: BLE001 - screening works without it; the report says "no reference"
        log.warning("drift reference not stored: %s: %s", type(exc).__name__, exc)


@shared_task(name=SCREEN_TASK, bind=True)
def screen_chunk_task(self, study_ids: list[int]) -> dict[str, int]:  # noqa: ANN001
    """Screen one chunk of studies; the task id is the claim token, so a redelivery re-claims its own.

    A database or broker outage retries the task (same id, same claim) with back-off (worker.recovery).
    """
    settings = settings_of(self.app)
    with retry_transient(self, settings):
        outcome = run_screen_task(
            study_ids, token=self.request.id, settings=settings, enqueue=_enqueue, explain=_explain
        )
    if outcome.done and settings.dicom_results:
        # After the commit (run_screen_task has committed): the results task must see the DONE rows.
        _send_dicom_results(settings, outcome.done)
    return {"done": len(outcome.done), "failed": len(outcome.failed), "requeued": len(outcome.requeued)}


def _send_dicom_results(settings: Settings, done: Sequence[int]) -> None:
    """Ask for the DICOM results of the DONE studies; an outage now must not fail a chunk already stored."""
    from worker.dicom_results import dicom_study_ids

    try:
        ids = dicom_study_ids(settings, done)
    except Exception as exc:
        if not is_transient(exc):
            raise
        ids = list(done)  # the results task keeps the DICOM ones itself (and retries the database)
    try:
        send_dicom_results(ids, app=_app())
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("DICOM results of %d studies not queued: %s", len(ids), describe(exc))


def _explain(study_ids: Sequence[int], model_version_id: int) -> int:
    return send_explain(study_ids, model_version_id, app=_app())


@shared_task(name=EXPLAIN_TASK, bind=True)
def explain_task(self, study_ids: list[int], model_version_id: int) -> int:  # noqa: ANN001
    """Compute the missing Grad-CAM heat maps of these studies (the Keras model loads once per process)."""
    from worker.explain import run_explain_task

    settings = settings_of(self.app)
    with retry_transient(self, settings):  # idempotent: a retry computes only the maps still missing
        return run_explain_task(study_ids, model_version_id=model_version_id, settings=settings)


@shared_task(name=DICOM_RESULTS_TASK, bind=True)
def dicom_results_task(self, study_ids: list[int]) -> dict[str, int]:  # noqa: ANN001
    """Make (and send, when a destination is set) the SR and Grad-CAM SC of finished DICOM studies."""
    from worker.dicom_results import run_results_task

    settings = settings_of(self.app)
    with retry_transient(self, settings):  # idempotent: makes what is missing, sends what is unsent
        return run_results_task(study_ids, settings=settings)


@shared_task(name=RECONCILE_TASK)
def reconcile_task() -> int:
    """Requeue studies whose lease ran out, and re-send QUEUED studies whose message the broker lost.

    Not retried: beat sends the next one within CXR_RECONCILE_EVERY_S.
    """
    app = _app()
    try:
        requeued = reconcile_once(app.settings, enqueue=_enqueue)
        lost = resend_lost(
            app.settings, queue_depth=lambda: queue_depths(app)[INFERENCE_QUEUE], enqueue=_enqueue
        )
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("reconciler skipped (outage): %s", describe(exc))
        return 0
    return len(requeued) + len(lost)


# acks_late=False and the time limits of retraining come from the app's task_annotations (worker.app).
@shared_task(name=RETRAIN_TASK, bind=True)
def retrain_task(self, trigger: str = "schedule") -> dict[str, object]:  # noqa: ANN001
    """One retraining run (worker.retrain): train, gate against the serving model, promote or reject."""
    from worker.retrain import run_retraining

    outcome = run_retraining(settings_of(self.app), trigger=trigger, holder=self.request.id)
    RETRAIN_RUNS.labels(outcome.status.lower()).inc()
    return {"run_id": outcome.run_id, "status": outcome.status, "reasons": outcome.reasons}
