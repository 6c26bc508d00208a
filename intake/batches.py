"""Studies in: a batch from validated files, queued after the commit (web, API, CLI, DICOM receiver).

Every file becomes a study: a valid image is stored RECEIVED, anything else FAILED with a reason a person can
read. Starting a batch marks its RECEIVED studies QUEUED, commits, THEN enqueues (worker.app, Celery only).
Previews are made on first request (study_thumbnail), not at upload.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np
from sqlalchemy.orm import Session

from config import Settings
from intake.files import THUMBNAIL_SIDE, iter_checked
from intake.formats import ImageDecodeError, make_thumbnail
from ops.metrics import STUDIES_RECEIVED
from store.audit import record_event
from store.studies import add_studies, count_failed, create_batch, image_data, mark_queued, received_study_ids
from store.tables import Batch, Study, User
from worker import app as queue

log = logging.getLogger(__name__)


@dataclass
class StartResult:
    """What start_batch queued, and why enqueueing failed if it did."""

    queued: list[int] = field(default_factory=list)
    enqueue_error: str | None = None


@dataclass
class SubmitResult:
    """A new batch with its studies."""

    batch: Batch
    study_ids: list[int]
    failed: int
    start: StartResult


def _placeholder_png() -> bytes:
    # A plain grey square with a darker cross: "no preview", without a broken-image icon in the report.
    img = np.full((THUMBNAIL_SIDE, THUMBNAIL_SIDE), 200, dtype=np.uint8)
    cv2.line(img, (40, 40), (THUMBNAIL_SIDE - 41, THUMBNAIL_SIDE - 41), 120, 6)
    cv2.line(img, (40, THUMBNAIL_SIDE - 41), (THUMBNAIL_SIDE - 41, 40), 120, 6)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("the placeholder preview could not be encoded")
    return buf.tobytes()


PLACEHOLDER_PNG = _placeholder_png()


def study_thumbnail(session: Session, *, study: Study) -> bytes | None:
    """The study's preview PNG, made from its stored image on first use and committed; None with no image.

    An image that cannot be decoded gets PLACEHOLDER_PNG (stored too, so it is not decoded on every view).
    """
    if study.thumbnail_png:
        return study.thumbnail_png
    if study.image_sha256 is None:
        return None
    data = image_data(session, sha256=study.image_sha256)
    if not data:
        return None
    try:
        png = make_thumbnail(data, max_side=THUMBNAIL_SIDE)
    except ImageDecodeError:
        png = PLACEHOLDER_PNG
    except Exception as exc:  # noqa: BLE001 - a decoder crash must not become a 500; not stored, may be transient
        log.warning("preview of study %s failed: %r", study.id, exc)
        return PLACEHOLDER_PNG
    study.thumbnail_png = png
    try:
        session.commit()
    except Exception:  # noqa: BLE001 - e.g. a locked SQLite: serve the preview now, store it next time
        log.warning("preview of study %s not stored", study.id, exc_info=True)
        session.rollback()
    return png


def ingest_files(
    session: Session,
    *,
    batch: Batch,
    files: Iterable[tuple[str, bytes]],
    settings: Settings,
    patient_id: str | None = None,
) -> list[int]:
    """Store every file (zips expanded) as a study: RECEIVED if valid, FAILED with a reason if not.

    The whole upload goes to SQL in a few statements (store.studies.add_studies); returns the ids in order.
    """
    checked = iter_checked(files, settings, patient_id=patient_id)
    return add_studies(session, batch=batch, files=[f.as_study() for f in checked])


def start_batch(session: Session, *, batch: Batch, settings: Settings) -> StartResult:
    """RECEIVED -> QUEUED for the batch, commit, THEN enqueue: a worker must be able to see the rows."""
    received = received_study_ids(session, batch_id=batch.id)
    queued = mark_queued(session, study_ids=received, lease_s=settings.queued_lease_s)
    STUDIES_RECEIVED.labels(outcome="queued").inc(len(queued))
    # The batch is saved whatever happens next; when the broker is down the reconciler re-queues it.
    return StartResult(queued=queued, enqueue_error=queue.enqueue_after_commit(session, queued))


def submit_batch(
    session: Session,
    *,
    owner: User,
    name: str,
    notes: str,
    files: Iterable[tuple[str, bytes]],
    settings: Settings,
    patient_id: str | None = None,
    start: bool = True,
) -> SubmitResult:
    """Create a batch, ingest its files, commit, then (start=True) queue and enqueue its valid studies."""
    batch = create_batch(session, owner=owner, name=name, notes=notes)
    ids = ingest_files(session, batch=batch, files=files, settings=settings, patient_id=patient_id)
    n_failed = count_failed(session, batch_id=batch.id)
    STUDIES_RECEIVED.labels(outcome="rejected").inc(n_failed)
    record_event(
        session,
        user_id=owner.id,
        action="batch.upload",
        target=f"batch:{batch.id}",
        details={"studies": len(ids), "failed": n_failed},
    )
    # The studies are stored and (start=True) marked QUEUED in one transaction, committed before anything is
    # sent: nothing is lost if the broker is down or this process dies, and the reconciler (which only
    # touches QUEUED and RUNNING studies) re-sends them after their lease. Without start they stay RECEIVED.
    started = start_batch(session, batch=batch, settings=settings) if start else StartResult()
    session.commit()
    return SubmitResult(batch=batch, study_ids=ids, failed=n_failed, start=started)
