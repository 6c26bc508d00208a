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
from worker.app import celery_app  # noqa: F401 - `celery -A` finds the app here

POISON_SHA256 = os.environ["TEST_POISON_SHA256"]
_real_get_predictor = screening.get_predictor


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


def _get_predictor(settings: Any) -> Any:
    return _DiesOnPoison(_real_get_predictor(settings))


screening.get_predictor = _get_predictor
