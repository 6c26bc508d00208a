"""Thin Celery tasks over worker.screening. Imported only by worker processes (via the app's include)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from celery.signals import worker_init, worker_process_init

from store.db import dispose_all
from worker.app import RECONCILE_TASK, SCREEN_TASK, celery_app, send_screen_chunks
from worker.screening import reconcile_once, run_screen_task, serving_model

log = logging.getLogger("cxr.worker")
READY_MARK = "cxr worker process ready"


def _enqueue(study_ids: Sequence[int], chunk_size: int) -> int:
    return send_screen_chunks(study_ids, app=celery_app, chunk_size=chunk_size)


@worker_init.connect
def _check_model_artifact(**_kwargs: object) -> None:
    """In the parent, before any pool process: refuse to start without a model rather than eat tasks.

    Only a file check: the parent never loads the model (a model loaded before fork breaks the children).
    """
    from model.serve import DEFAULT_ARTIFACT_DIR

    settings = celery_app.cxr_settings  # type: ignore[attr-defined]
    artifact = settings.model_dir or DEFAULT_ARTIFACT_DIR
    if not (artifact / "meta.json").exists():
        raise RuntimeError(f"no model artifact at {artifact} (set CXR_MODEL_DIR or train one: see README)")


@worker_process_init.connect
def _load_model_in_child(**_kwargs: object) -> None:
    """In each forked pool process: drop inherited DB connections, then load the model once."""
    dispose_all()
    settings = celery_app.cxr_settings  # type: ignore[attr-defined]
    model = serving_model(settings)
    # Tests and `cxr run` wait for this line: the process can now answer at full speed.
    log.warning(
        "%s (pid %d, model %s, model_version_id %d)",
        READY_MARK,
        os.getpid(),
        model.version,
        model.model_version_id,
    )


@celery_app.task(name=SCREEN_TASK, bind=True)
def screen_chunk_task(self, study_ids: list[int]) -> dict[str, int]:  # noqa: ANN001
    """Screen one chunk of studies; the task id is the claim token, so a redelivery re-claims its own."""
    settings = celery_app.cxr_settings  # type: ignore[attr-defined]
    outcome = run_screen_task(study_ids, token=self.request.id, settings=settings, enqueue=_enqueue)
    return {"done": len(outcome.done), "failed": len(outcome.failed), "requeued": len(outcome.requeued)}


@celery_app.task(name=RECONCILE_TASK)
def reconcile_task() -> int:
    """Requeue studies left in QUEUED or RUNNING after their lease ran out."""
    return len(reconcile_once(celery_app.cxr_settings, enqueue=_enqueue))  # type: ignore[attr-defined]
