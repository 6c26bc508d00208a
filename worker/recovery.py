"""Recovery from outages: tasks retry transient database and broker errors; lost messages are sent again.

Transient errors (is_transient): the database or the broker could not be reached or dropped the
connection. A task that meets one is retried by Celery with the same task id, so it holds the same SQL claim
token and re-claims what it held; the studies stay QUEUED (or RUNNING under that token) in SQL meanwhile and
are never FAILED for it. Bad input (an image that does not decode, a refused image) is not transient: it still
fails its study with a readable reason, as before.

Lost messages (resend_lost): a broker that restarts without persistence, or is flushed, forgets the messages
of studies that SQL still has QUEUED. The reconciler compares SQL with the broker's ready-message count of the
inference queue, which both Redis (LLEN) and RabbitMQ (queue.declare passive) report without consuming
anything: every message carries at most chunk_size studies, so when more studies have been QUEUED for longer
than CXR_REQUEUE_LOST_AFTER_S than the queue's messages can hold, some messages are gone, and the stale
studies are sent again. A study that still had its message (or whose message a worker holds, e.g. a retry
waiting for its countdown) is then delivered twice: harmless, the SQL claim lets only one delivery run it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import kombu.exceptions
from sqlalchemy import exc as sa_exc

from config import Settings
from store.db import session_scope
from store.studies import count_stale_queued, touch_stale_queued
from store.tables import utcnow
from worker.screening import Enqueue

log = logging.getLogger("cxr.worker")

# SQLAlchemy's wrappers of "cannot connect / connection lost / pool exhausted", and the broker's.
_TRANSIENT: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    kombu.exceptions.OperationalError,
    ConnectionError,
)
try:  # psycopg's own errors, raised unwrapped by the raw binary cursor in store.studies.load_image_bytes
    import psycopg

    _TRANSIENT += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - psycopg is a dependency; SQLite-only installs still work
    pass


def is_transient(exc: BaseException) -> bool:
    """True for an outage of the database or the broker (retry later), False for anything else (bad input)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _TRANSIENT)


def describe(exc: BaseException) -> str:
    """One short line for the log: the error's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def retry_delay_s(retries: int, settings: Settings) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(max, base * 2**retries)] seconds."""
    ceiling = min(settings.task_retry_backoff_max_s, settings.task_retry_backoff_s * 2 ** min(retries, 30))
    return random.uniform(0.0, ceiling)


@contextmanager
def retry_transient(task: Any, settings: Settings) -> Iterator[None]:
    """Run a task body; on a transient error, retry the task (same id) after a back-off, at most N times.

    Anything else propagates unchanged. After the last retry Celery re-raises the error and the message is
    acknowledged; the studies are still QUEUED or RUNNING in SQL, where the reconciler finds them.
    """
    try:
        yield
    except Exception as exc:
        if not is_transient(exc):
            raise
        retries = int(getattr(task.request, "retries", 0) or 0)
        delay = retry_delay_s(retries, settings)
        log.warning(
            "%s: %s; retry %d of %d in %.1f s",
            task.name,
            describe(exc),
            retries + 1,
            settings.task_max_retries,
            delay,
        )
        raise task.retry(exc=exc, countdown=delay, max_retries=settings.task_max_retries) from exc


def resend_lost(settings: Settings, *, queue_depth: Callable[[], int], enqueue: Enqueue) -> list[int]:
    """Send again the QUEUED studies whose messages the broker lost; their ids (committed before sending).

    queue_depth() is the inference queue's ready-message count, asked of the broker; when it cannot be read
    (broker down) nothing is done this time.
    """
    before = utcnow() - timedelta(seconds=settings.requeue_lost_after_s)
    with session_scope(settings.database_url) as session:
        stale = count_stale_queued(session, before=before)
    if not stale:
        return []
    try:
        depth = int(queue_depth())
    except Exception as exc:  # noqa: BLE001 - the broker is down: nothing can be sent now anyway
        log.warning("lost-message check skipped: broker queue depth unknown (%s)", describe(exc))
        return []
    if stale <= depth * settings.chunk_size:
        return []  # the queue may still hold all of them
    # Compare-and-set on updated_at: of two reconcilers at once (two beats), only one gets each study.
    with session_scope(settings.database_url) as session:
        ids = touch_stale_queued(session, before=before, queued_lease_s=settings.queued_lease_s)
    if ids:
        enqueue(ids, settings.chunk_size)
        log.warning(
            "reconciler re-sent %d QUEUED studies the broker no longer held (%d messages waiting)",
            len(ids),
            depth,
        )
    return ids
