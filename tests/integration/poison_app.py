"""A worker app (`celery -A tests.integration.poison_app worker`) whose pool process dies on one image.

It stands for a decoder that segfaults on a malformed file: the process is SIGKILLed by the kernel, the
Celery parent sees the child lost and requeues the task (task_reject_on_worker_lost). The real worker code
runs unchanged; only the loaded predictor is wrapped, and it never changes a prediction.
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

import worker.screening as screening
from worker.main import app as celery_app  # `celery -A` finds the app here

POISON_SHA256 = os.environ["TEST_POISON_SHA256"]
# How long the parent waits for a result from a child that died (default 10 s): nothing comes from a
# SIGKILLed child, so the test need not wait; the requeue path is the same.
celery_app.conf.worker_lost_wait = 1.0
_real_load_artifact = screening.load_artifact


class _DiesOnPoison:
    """Delegates to the real predictor; SIGKILLs its own process when the poison image is in the chunk."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def predict_bytes(self, items: list[bytes], **kwargs: Any) -> list:
        if any(hashlib.sha256(b).hexdigest() == POISON_SHA256 for b in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return self._inner.predict_bytes(items, **kwargs)


def _load_artifact(artifact_dir: Any) -> Any:
    return _DiesOnPoison(_real_load_artifact(artifact_dir))


screening.load_artifact = _load_artifact
