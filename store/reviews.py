"""Reviewer confirmations and corrections: the labels that retraining folds back in."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.audit import record_event
from store.tables import Prediction, Review, Role, Study, StudyStatus, User

LABELS = ("covid", "normal", "pneumonia")


class ReviewError(ValueError):
    """A review was refused; the message says why."""


@dataclass(frozen=True)
class ReviewedStudy:
    """One confirmed label ready for training."""

    study_id: int
    image_sha256: str
    patient_key: str
    label: str


def review_study(session: Session, *, study: Study, reviewer: User, label: str, note: str = "") -> Review:
    """Record a reviewer's label for a finished study (confirming or correcting the prediction)."""
    if reviewer.role not in (Role.REVIEWER, Role.ADMIN):
        raise ReviewError("only reviewers and admins may review studies")
    if label not in LABELS:
        raise ReviewError(f"label must be one of {', '.join(LABELS)}")
    if study.status != StudyStatus.DONE:
        raise ReviewError("only studies that finished screening can be reviewed")
    predicted = session.scalar(
        select(Prediction.label)
        .where(Prediction.study_id == study.id)
        .order_by(Prediction.id.desc())
        .limit(1)
    )
    review = Review(
        study_id=study.id, reviewer_id=reviewer.id, label=label, agrees=predicted == label, note=note[:2000]
    )
    session.add(review)
    session.flush()
    record_event(
        session,
        user_id=reviewer.id,
        action="study.review",
        target=f"study:{study.id}",
        details={"label": label, "agrees": review.agrees},
    )
    return review


def latest_review(session: Session, *, study_id: int) -> Review | None:
    """The review that counts for a study (the newest), if any."""
    return session.scalar(
        select(Review).where(Review.study_id == study_id).order_by(Review.id.desc()).limit(1)
    )


def reviewed_for_training(session: Session) -> list[ReviewedStudy]:
    """Each reviewed study's newest label, with its patient key (study id when no key was given)."""
    newest = select(Review.study_id, func.max(Review.id).label("rid")).group_by(Review.study_id).subquery()
    rows = session.execute(
        select(Study.id, Study.image_sha256, Study.patient_key, Review.label)
        .join(newest, newest.c.study_id == Study.id)
        .join(Review, Review.id == newest.c.rid)
        .where(Study.image_sha256.is_not(None))
        .order_by(Study.id)
    ).all()
    # Without a patient key each study is its own patient, so one image never lands in two sets.
    return [ReviewedStudy(sid, sha, pkey or f"study-{sid}", label) for sid, sha, pkey, label in rows]
