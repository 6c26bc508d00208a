"""What `celery -A worker.main worker|beat` imports: the app built from the environment, only here."""

from __future__ import annotations

from config import load_settings
from ops.multiproc import use_worker_dir

_settings = load_settings()
if _settings.worker_metrics_port:
    # Before anything imports prometheus_client: the pool children then write where the exporter reads.
    use_worker_dir(_settings.data_dir / "metrics")

from worker.app import make_celery  # noqa: E402 - after the metrics directory is set

app = make_celery(_settings)
