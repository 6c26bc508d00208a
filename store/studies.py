"""Batches and studies: creation, the QUEUED -> RUNNING -> DONE/FAILED state machine, progress."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session

from store.audit import record_event
from store.db import insert_ignore
from store.tables import Batch, Heatmap, Image, Prediction, Role, Study, StudyStatus, User, utcnow

ACTIVE = (StudyStatus.RECEIVED, StudyStatus.QUEUED, StudyStatus.RUNNING)


def out_of_attempts_reason(max_attempts: int) -> str:
    """The readable error of a study that never finished in max_attempts deliveries."""
    return (
        f"Processing stopped {max_attempts} times without finishing (worker crash or time limit); "
        "the image may be too large or malformed. Re-upload it or contact the administrator."
    )


@dataclass(frozen=True)
class Progress:
    """Counts of a batch's studies by state."""

    total: int
    done: int
    failed: int
    running: int
    queued: int

    @property
    def finished(self) -> bool:
        """True when no study is left to run."""
        return self.done + self.failed == self.total

    def as_dict(self) -> dict[str, int | bool]:
        """JSON-friendly form for the polling endpoint."""
        return {
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "running": self.running,
            "queued": self.queued,
            "finished": self.finished,
        }


def create_batch(session: Session, *, owner: User, name: str, notes: str = "") -> Batch:
    """Create an empty batch owned by owner."""
    name = name.strip() or "Untitled batch"
    batch = Batch(owner_id=owner.id, name=name[:200], notes=notes[:10_000])
    session.add(batch)
    session.flush()
    record_event(session, user_id=owner.id, action="batch.create", target=f"batch:{batch.id}")
    return batch


def hash_patient_key(raw: str | None) -> str | None:
    """One-way key for a patient identifier: splits stay patient-level without keeping the identifier."""
    if not raw or not raw.strip():
        return None
    return hashlib.sha256(("cxr-patient:" + raw.strip()).encode()).hexdigest()


def add_studies(session: Session, *, batch: Batch, files: Sequence[dict[str, Any]]) -> list[int]:
    """Store uploaded files as studies in a few statements (not three per file); the new study ids, in order.

    A study is RECEIVED, or FAILED with its readable error if the file was rejected. Each dict has filename,
    data (None when rejected) and optionally fmt, width, height, thumbnail_png, patient_key, error and
    size_bytes (the size of a rejected file whose bytes are not kept).
    Image bytes go in with INSERT ... ON CONFLICT DO NOTHING: identical files, in this upload or a
    concurrent one, are stored once without a read first and without a unique-key race.
    """
    now = utcnow()
    images: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for f in files:
        data: bytes | None = f.get("data")
        sha = hashlib.sha256(data).hexdigest() if data else None
        if sha and sha not in images:
            images[sha] = {"sha256": sha, "size_bytes": len(data), "data": data, "created_at": now}
        error = f.get("error")
        rows.append(
            {
                "batch_id": batch.id,
                "image_sha256": sha,
                "original_filename": str(f["filename"])[:512],
                "size_bytes": f.get("size_bytes", len(data) if data else 0),
                "format": f.get("fmt", "unknown"),
                "width": f.get("width"),
                "height": f.get("height"),
                "thumbnail_png": f.get("thumbnail_png"),
                "patient_key": f.get("patient_key"),
                "status": StudyStatus.FAILED if error else StudyStatus.RECEIVED,
                "attempts": 0,
                "error": error,
                "created_at": now,
                "updated_at": now,
                "finished_at": now if error else None,
            }
        )
    if not rows:
        return []
    # Core executemany of cached statements (no ORM objects, no per-upload SQL compilation): the driver
    # batches the rows into multi-row INSERTs. Images sorted by key: concurrent uploads sharing images take
    # the row locks in one order (no deadlock).
    conn = session.connection()
    if images:
        image_rows = [images[k] for k in sorted(images)]
        conn.execute(insert_ignore(session, Image).on_conflict_do_nothing(), image_rows)
    result = conn.execute(insert(Study).returning(Study.id, sort_by_parameter_order=True), rows)
    return [int(i) for i in result.scalars()]


def mark_queued(session: Session, *, study_ids: Sequence[int], lease_s: int) -> list[int]:
    """RECEIVED -> QUEUED for these studies; returns those that changed. Commit before enqueueing them."""
    if not study_ids:
        return []
    now = utcnow()
    rows = session.execute(
        update(Study)
        .where(Study.id.in_(study_ids), Study.status == StudyStatus.RECEIVED)
        .values(status=StudyStatus.QUEUED, lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
        .returning(Study.id)
    ).scalars()
    return sorted(rows)


def _fail_out_of_attempts(session: Session, where: Any, max_attempts: int, now: datetime) -> None:
    """FAILED, with the readable reason, for the studies matching `where` that used up their deliveries."""
    session.execute(
        update(Study)
        .where(where, Study.attempts >= max_attempts)
        .values(
            status=StudyStatus.FAILED,
            error=out_of_attempts_reason(max_attempts),
            claim_token=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


def chunked(ids: Iterable[int], size: int) -> list[list[int]]:
    """Split ids into lists of at most size."""
    ids = list(ids)
    return [ids[i : i + size] for i in range(0, len(ids), max(1, size))]


def claim_studies(
    session: Session, *, study_ids: Sequence[int], token: str, lease_s: int, max_attempts: int
) -> list[Study]:
    """Compare-and-set QUEUED (or lease-expired RUNNING, or already ours) -> RUNNING; returns what we hold.

    Each claim counts one delivery. A study that has already been delivered max_attempts times is FAILED
    instead of run again, so a study that kills its worker cannot loop forever.
    """
    if not study_ids:
        return []
    now = utcnow()
    claimable = or_(
        Study.status == StudyStatus.QUEUED,
        and_(
            Study.status == StudyStatus.RUNNING,
            or_(Study.lease_expires_at < now, Study.claim_token == token),
        ),
    )
    _fail_out_of_attempts(session, and_(Study.id.in_(study_ids), claimable), max_attempts, now)
    # UPDATE ... RETURNING the claimed rows: one round trip, and exactly the rows this statement changed
    # (a study already ours, redelivered with the same token, is claimed again and counted).
    claimed = session.scalars(
        update(Study)
        .where(Study.id.in_(study_ids), claimable, Study.attempts < max_attempts)
        .values(
            status=StudyStatus.RUNNING,
            attempts=Study.attempts + 1,
            claim_token=token,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
        .returning(Study)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return sorted(claimed, key=lambda st: st.id)


def load_image_bytes(session: Session, *, studies: Sequence[Study]) -> dict[int, bytes | None]:
    """Image bytes for each study id (None when the study has no stored image)."""
    shas = sorted({s.image_sha256 for s in studies if s.image_sha256})
    if session.get_bind().dialect.name == "postgresql":
        # Binary result format: bytea arrives as raw bytes, not hex text twice its size that PostgreSQL
        # encodes and the driver decodes (measured: ~15% of a worker's CPU outside the model).
        driver = session.connection().connection.driver_connection
        with driver.cursor(binary=True) as cur:
            cur.execute(f"SELECT sha256, data FROM {Image.__tablename__} WHERE sha256 = ANY(%s)", (shas,))
            data = {sha: bytes(blob) for sha, blob in cur.fetchall()}
    else:
        data = dict(session.execute(select(Image.sha256, Image.data).where(Image.sha256.in_(shas))).all())
    return {s.id: data.get(s.image_sha256) if s.image_sha256 else None for s in studies}


def complete_studies(
    session: Session, *, token: str, model_version_id: int, results: Sequence[dict[str, Any]]
) -> list[int]:
    """RUNNING (held by token) -> DONE plus a prediction, for one chunk in two statements; the ids now DONE.

    Each result dict has study_id, label, p_covid, p_normal, p_pneumonia, triage, elapsed_ms. Studies whose
    claim was lost are skipped; a prediction that already exists for (study, model version) is kept.
    """
    if not results:
        return []
    now = utcnow()
    changed = sorted(
        session.execute(
            update(Study)
            .where(
                Study.id.in_([r["study_id"] for r in results]),
                Study.status == StudyStatus.RUNNING,
                Study.claim_token == token,
            )
            .values(
                status=StudyStatus.DONE,
                error=None,
                claim_token=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
            .returning(Study.id)
            .execution_options(synchronize_session=False)  # no in-session objects to evaluate the WHERE on
        ).scalars()
    )
    if changed:
        by_id = {int(r["study_id"]): r for r in results}
        rows = [
            {
                "study_id": sid,
                "model_version_id": model_version_id,
                "label": str(by_id[sid]["label"]),
                "p_covid": float(by_id[sid]["p_covid"]),
                "p_normal": float(by_id[sid]["p_normal"]),
                "p_pneumonia": float(by_id[sid]["p_pneumonia"]),
                "triage": str(by_id[sid]["triage"]),
                "elapsed_ms": float(by_id[sid]["elapsed_ms"]),
                "created_at": now,
            }
            for sid in changed
        ]
        # executemany of one cached statement: a multi-row .values(rows) is compiled anew for every chunk
        session.connection().execute(
            insert_ignore(session, Prediction).on_conflict_do_nothing(
                index_elements=["study_id", "model_version_id"]
            ),
            rows,
        )
    return changed


def fail_study(session: Session, *, study_id: int, token: str | None, reason: str) -> bool:
    """Mark a study FAILED with a readable reason (only if we hold it, when token is given)."""
    now = utcnow()
    cond = [Study.id == study_id, Study.status.in_(ACTIVE)]
    if token is not None:
        cond += [Study.status == StudyStatus.RUNNING, Study.claim_token == token]
    changed = session.execute(
        update(Study)
        .where(*cond)
        .values(
            status=StudyStatus.FAILED,
            error=reason[:2000],
            claim_token=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    return changed == 1


def release_studies(session: Session, *, study_ids: Sequence[int], token: str, lease_s: int) -> list[int]:
    """Hand studies we hold back to QUEUED (e.g. on a soft time limit) so they are retried."""
    now = utcnow()
    return sorted(
        session.execute(
            update(Study)
            .where(Study.id.in_(study_ids), Study.status == StudyStatus.RUNNING, Study.claim_token == token)
            .values(
                status=StudyStatus.QUEUED,
                claim_token=None,
                lease_expires_at=now + timedelta(seconds=lease_s),
                updated_at=now,
            )
            .returning(Study.id)
        ).scalars()
    )


def reconcile(
    session: Session, *, queued_lease_s: int, max_attempts: int, now: datetime | None = None
) -> list[int]:
    """Requeue studies whose lease ran out (QUEUED never picked up, RUNNING whose worker died).

    Only studies of started batches are QUEUED or RUNNING; a batch never started keeps its studies RECEIVED
    and the reconciler leaves them alone. Returns the ids to enqueue again; the caller commits first. Studies
    out of attempts are FAILED.
    """
    now = now or utcnow()
    expired = or_(
        and_(Study.status == StudyStatus.QUEUED, Study.lease_expires_at < now),
        and_(Study.status == StudyStatus.RUNNING, Study.lease_expires_at < now),
        # RECEIVED is never touched: it means the batch was not started (created through the API without
        # `start`). Starting marks studies QUEUED in the same transaction that stores them (submit_batch) or
        # in one of its own (start_batch), so a web process dying before the enqueue leaves them QUEUED.
    )
    _fail_out_of_attempts(session, expired, max_attempts, now)
    return sorted(
        session.execute(
            update(Study)
            .where(expired, Study.attempts < max_attempts)
            .values(
                status=StudyStatus.QUEUED,
                claim_token=None,
                lease_expires_at=now + timedelta(seconds=queued_lease_s),
                updated_at=now,
            )
            .returning(Study.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )


def count_stale_queued(session: Session, *, before: datetime) -> int:
    """How many studies have been QUEUED (sent, or re-sent) since before `before` and are still waiting."""
    stmt = select(func.count(Study.id)).where(Study.status == StudyStatus.QUEUED, Study.updated_at < before)
    return int(session.scalar(stmt) or 0)


def touch_stale_queued(
    session: Session, *, before: datetime, queued_lease_s: int, now: datetime | None = None
) -> list[int]:
    """Mark the studies QUEUED since before `before` as sent now (new lease); their ids, to enqueue again.

    A compare-and-set on updated_at: two reconcilers at once get disjoint sets. The caller commits first.
    """
    now = now or utcnow()
    return sorted(
        session.execute(
            update(Study)
            .where(Study.status == StudyStatus.QUEUED, Study.updated_at < before)
            .values(lease_expires_at=now + timedelta(seconds=queued_lease_s), updated_at=now)
            .returning(Study.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )


def received_study_ids(session: Session, *, batch_id: int) -> list[int]:
    """The batch's studies waiting to be started (RECEIVED)."""
    return list(
        session.scalars(
            select(Study.id).where(Study.batch_id == batch_id, Study.status == StudyStatus.RECEIVED)
        )
    )


def count_failed(session: Session, *, batch_id: int) -> int:
    """How many of the batch's studies are FAILED."""
    stmt = select(func.count(Study.id)).where(Study.batch_id == batch_id, Study.status == StudyStatus.FAILED)
    return int(session.scalar(stmt) or 0)


def image_data(session: Session, *, sha256: str) -> bytes | None:
    """The stored bytes of one image, or None."""
    return session.scalar(select(Image.data).where(Image.sha256 == sha256))


def batch_progress(session: Session, *, batch_ids: Sequence[int]) -> dict[int, Progress]:
    """Progress of each batch: one GROUP BY (batch, status), read from the (batch_id, status) index alone."""
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Study.batch_id, Study.status, func.count())
        .where(Study.batch_id.in_(batch_ids))
        .group_by(Study.batch_id, Study.status)
    ).all()
    tally: dict[int, dict[str, int]] = {bid: {} for bid in batch_ids}
    for bid, status, n in rows:
        tally[bid][str(status)] = int(n)
    out = {}
    for bid, by_status in tally.items():
        out[bid] = Progress(
            total=sum(by_status.values()),
            done=by_status.get(StudyStatus.DONE, 0),
            failed=by_status.get(StudyStatus.FAILED, 0),
            running=by_status.get(StudyStatus.RUNNING, 0),
            queued=by_status.get(StudyStatus.RECEIVED, 0) + by_status.get(StudyStatus.QUEUED, 0),
        )
    return out


def sees_all_batches(user: User) -> bool:
    """Admins, and reviewers (who confirm labels on every clinic's studies), see every batch."""
    return user.is_admin or user.role == Role.REVIEWER


def batches_visible_to(session: Session, *, user: User) -> list[Batch]:
    """A user's own batches, or every batch for an admin or reviewer; newest first."""
    stmt = select(Batch).where(Batch.deleted_at.is_(None)).order_by(Batch.id.desc())
    if not sees_all_batches(user):
        stmt = stmt.where(Batch.owner_id == user.id)
    return list(session.scalars(stmt))


def get_batch_for(session: Session, *, user: User, batch_id: int, manage: bool = False) -> Batch | None:
    """The batch if this user may see it (manage=True: change it, owner or admin only), else None -> 404."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.deleted_at is not None:
        return None
    if batch.owner_id == user.id:
        return batch
    allowed = user.is_admin if manage else sees_all_batches(user)
    return batch if allowed else None


def get_study_for(session: Session, *, user: User, study_id: int) -> Study | None:
    """The study if this user may see its batch (see get_batch_for), else None -> 404."""
    study = session.get(Study, study_id)
    if study is None or get_batch_for(session, user=user, batch_id=study.batch_id) is None:
        return None
    return study


def rescreen_batch(session: Session, *, batch_id: int, lease_s: int, user_id: int | None) -> list[int]:
    """Send a finished batch's images through the serving model again: DONE/FAILED -> QUEUED.

    Old predictions stay; the new model version adds its own (one per study and version). Studies that
    failed validation at upload (no stored image) stay FAILED. Commit, then enqueue the returned ids.
    """
    now = utcnow()
    ids = sorted(
        session.execute(
            update(Study)
            .where(
                Study.batch_id == batch_id,
                Study.status.in_((StudyStatus.DONE, StudyStatus.FAILED)),
                Study.image_sha256.is_not(None),
            )
            .values(
                status=StudyStatus.QUEUED,
                attempts=0,
                error=None,
                claim_token=None,
                finished_at=None,
                lease_expires_at=now + timedelta(seconds=lease_s),
                updated_at=now,
            )
            .returning(Study.id)
        ).scalars()
    )
    record_event(
        session,
        user_id=user_id,
        action="batch.rescreen",
        target=f"batch:{batch_id}",
        details={"studies": len(ids)},
    )
    return ids


BATCH_DELETED_REASON = "The batch was deleted before this study was screened."


def delete_batch(session: Session, *, batch: Batch, user_id: int | None) -> int:
    """Soft-delete a batch: hidden everywhere, rows kept for the audit trail; image bytes no study still
    refers to are removed (with previews and heat maps). Returns how many stored images were removed.

    Studies still waiting or running are FAILED so no worker screens a deleted batch.
    """
    now = utcnow()
    batch.deleted_at = now
    batch.deleted_by = user_id
    shas = set(
        session.scalars(
            select(Study.image_sha256).where(Study.batch_id == batch.id, Study.image_sha256.is_not(None))
        )
    )
    session.execute(
        update(Study)
        .where(Study.batch_id == batch.id, Study.status.in_(ACTIVE))
        .values(status=StudyStatus.FAILED, error=BATCH_DELETED_REASON, claim_token=None, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Study)
        .where(Study.batch_id == batch.id)
        .values(image_sha256=None, thumbnail_png=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(Heatmap)
        .where(Heatmap.study_id.in_(select(Study.id).where(Study.batch_id == batch.id)))
        .execution_options(synchronize_session=False)
    )
    removed = 0
    if shas:
        # Identical uploads share one image row: keep the bytes another (live) study still points at.
        removed = session.execute(
            delete(Image)
            .where(
                Image.sha256.in_(sorted(shas)),
                ~exists().where(Study.image_sha256 == Image.sha256),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
    record_event(
        session,
        user_id=user_id,
        action="batch.delete",
        target=f"batch:{batch.id}",
        details={"name": batch.name, "images_removed": int(removed or 0)},
    )
    return int(removed or 0)
