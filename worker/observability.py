"""A worker's metrics exporter and log context (Celery signals; worker.tasks imports this module).

Logs: each task's id and study ids are bound to the log context while it runs (ops.logs), so every line,
JSON or text, carries them; worker.screening adds the batch id once it has claimed the chunk.

Metrics: one HTTP port per worker (CXR_WORKER_METRICS_PORT), served by the Celery parent.

Why this pattern (prometheus-client's multiprocess mode, as documented for gunicorn): a prefork pool runs
tasks in forked children that are replaced when they die or hit a limit, so a port per child would change
with every restart and collide. Instead `worker.main` sets PROMETHEUS_MULTIPROC_DIR (one fresh directory per
worker parent) before anything imports prometheus_client; every pool child writes its counters there; the
parent, which lives as long as the worker, serves their sum. A child that exits is marked dead so its live
gauges go. Each worker host has its own directory and port: nothing is shared between hosts.
"""

from __future__ import annotations

import logging
import os

from celery.signals import task_postrun, task_prerun, worker_init, worker_process_shutdown

from ops import logs
from ops.metrics import WORKER_MODEL, mark_process_dead, start_exporter
from ops.multiproc import multiprocess_dir

log = logging.getLogger("cxr.worker")


@worker_init.connect
def _start_exporter(sender: object = None, **_kwargs: object) -> None:
    """In the worker's parent, before the pool forks: serve /metrics when a port is set."""
    from worker.app import settings_of

    app = getattr(sender, "app", None)
    if app is None:
        return
    port = settings_of(app).worker_metrics_port
    if not port:
        return
    if multiprocess_dir() is None:
        # The pool's children would each count alone and the parent would serve zeros: refuse to mislead.
        log.warning("worker metrics off: PROMETHEUS_MULTIPROC_DIR was not set before start (use worker.main)")
        return
    start_exporter(port)
    log.info("worker metrics at http://0.0.0.0:%d/metrics (pid %d)", port, os.getpid())


@worker_process_shutdown.connect
def _forget_process(pid: int | None = None, **_kwargs: object) -> None:
    """A pool child exits: drop its live gauges (multiprocess files stay for the counters)."""
    mark_process_dead(pid or os.getpid())


def model_loaded(version: str) -> None:
    """This process now serves this model version (cxr_worker_model_info)."""
    WORKER_MODEL.labels(version).set(1)


@task_prerun.connect
def _bind_task(task_id: str | None = None, args: tuple | None = None, **_kwargs: object) -> None:
    """Bind the task id (and a screening chunk's study ids) to every log line the task writes."""
    first = (args or (None,))[0]
    study_ids = first if isinstance(first, list) and all(isinstance(i, int) for i in first) else None
    logs.clear()
    logs.bind(task_id=task_id, study_ids=study_ids)


@task_postrun.connect
def _unbind_task(**_kwargs: object) -> None:
    """Nothing of a finished task leaks into the next one's lines."""
    logs.clear()
