"""What `celery -A worker.main worker|beat` imports: the app built from the environment, only here."""

from __future__ import annotations

import sys

from celery.signals import setup_logging

from config import load_settings
from ops.logs import setup_from_settings
from ops.multiproc import use_worker_dir

_settings = load_settings()
if _settings.worker_metrics_port:
    # Before anything imports prometheus_client: the pool children then write where the exporter reads.
    use_worker_dir(_settings.data_dir / "metrics")

from worker.app import make_celery  # noqa: E402 - after the metrics directory is set

app = make_celery(_settings)


@setup_logging.connect
def _one_logging_setup(**_kwargs: object) -> None:
    """Celery leaves logging alone when this signal has a receiver: ops.logs configures it instead."""
    setup_from_settings(_settings, process="beat" if "beat" in sys.argv else "worker")
