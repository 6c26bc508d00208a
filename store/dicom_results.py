"""DICOM results (Structured Report, Grad-CAM Secondary Capture) of finished studies: save, find, sent."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import insert_ignore
from store.studies import get_study_for
from store.tables import DicomResult, Image, Prediction, Study, StudyStatus, User, utcnow

KINDS = ("sr", "sc")


def dicom_studies_to_report(session: Session, *, study_ids: Sequence[int]) -> list[int]:
    """Of these studies, the DONE ones whose image is DICOM (the ones that get results back as DICOM)."""
    if not study_ids:
        return []
    rows = session.scalars(
        select(Study.id).where(
            Study.id.in_(list(study_ids)), Study.status == StudyStatus.DONE, Study.format == "dicom"
        )
    )
    return sorted(rows)


def latest_prediction(session: Session, *, study_id: int) -> Prediction | None:
    """The study's newest prediction (the one its report shows)."""
    return session.scalar(
        select(Prediction).where(Prediction.study_id == study_id).order_by(Prediction.id.desc()).limit(1)
    )


def study_image(session: Session, *, study_id: int) -> tuple[Study, bytes] | None:
    """The study and its stored (de-identified) image bytes, or None."""
    study = session.get(Study, study_id)
    if study is None or study.image_sha256 is None:
        return None
    data = session.scalar(select(Image.data).where(Image.sha256 == study.image_sha256))
    return (study, data) if data else None


def existing_kinds(session: Session, *, prediction_id: int) -> set[str]:
    """Which results (sr, sc) exist already for this prediction (tasks are idempotent)."""
    return set(session.scalars(select(DicomResult.kind).where(DicomResult.prediction_id == prediction_id)))


def save_dicom_result(
    session: Session, *, study_id: int, prediction_id: int, kind: str, sop_instance_uid: str, data: bytes
) -> None:
    """Store one result; a second one for the same (prediction, kind) is ignored (a redelivered task)."""
    if kind not in KINDS:
        raise ValueError(f"unknown DICOM result kind {kind!r}")
    session.execute(
        insert_ignore(session, DicomResult).on_conflict_do_nothing(),
        [
            {
                "study_id": study_id,
                "prediction_id": prediction_id,
                "kind": kind,
                "sop_instance_uid": sop_instance_uid,
                "data": data,
                "created_at": utcnow(),
            }
        ],
    )


def unsent_results(session: Session, *, study_ids: Sequence[int]) -> list[DicomResult]:
    """Results of these studies not yet delivered to the destination, oldest first."""
    return list(
        session.scalars(
            select(DicomResult)
            .where(DicomResult.study_id.in_(list(study_ids)), DicomResult.sent_at.is_(None))
            .order_by(DicomResult.id)
        )
    )


def mark_sent(session: Session, *, result: DicomResult, error: str | None) -> None:
    """Record a delivery (error None) or the reason it failed (kept unsent: a later run tries again)."""
    if error is None:
        result.sent_at = utcnow()
        result.send_error = None
    else:
        result.send_error = error[:2000]


def dicom_result_for(session: Session, *, user: User, study_id: int, kind: str) -> DicomResult | None:
    """The newest result of this kind for a study the user may see (owner or admin), else None."""
    if kind not in KINDS or get_study_for(session, user=user, study_id=study_id) is None:
        return None
    return session.scalar(
        select(DicomResult)
        .where(DicomResult.study_id == study_id, DicomResult.kind == kind)
        .order_by(DicomResult.id.desc())
        .limit(1)
    )
