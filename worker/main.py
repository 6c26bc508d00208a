"""What `celery -A worker.main worker|beat` imports: the app built from the environment, only here."""

from __future__ import annotations

from worker.app import make_celery

app = make_celery()
