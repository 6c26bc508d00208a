"""What a batch report shows, read in a few queries: studies with their latest prediction and review, the
prediction history, and the JSON export's shape (web renders it as HTML, CSV and JSON; the API returns it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.studies import batch_progress, study_rows
from store.tables import Batch, ModelVersion, Prediction, Review, User

NOTICE = "Research and teaching tool — not a medical device; not for diagnosis."


def latest_reviews(session: Session, *, study_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The newest review of each of these studies (one query), with the reviewer's name."""
    out: dict[int, dict[str, Any]] = {}
    if not study_ids:
        return out
    rows = session.execute(
        select(Review, User.username)
        .outerjoin(User, User.id == Review.reviewer_id)
        .where(Review.study_id.in_(study_ids))
        .order_by(Review.id)
    ).all()
    for review, username in rows:
        out[review.study_id] = {
            "label": review.label,
            "agrees": review.agrees,
            "note": review.note,
            "reviewer": username,
            "at": review.created_at.isoformat(),
        }
    return out


def all_predictions(session: Session, *, study_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Every prediction of these studies, oldest first, each with its model version string."""
    out: dict[int, list[dict[str, Any]]] = {sid: [] for sid in study_ids}
    if not study_ids:
        return out
    rows = session.execute(
        select(Prediction, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .where(Prediction.study_id.in_(study_ids))
        .order_by(Prediction.id)
    ).all()
    for pred, version in rows:
        out[pred.study_id].append(
            {
                "model_version": version,
                "predicted_class": pred.label,
                "p_covid": pred.p_covid,
                "p_normal": pred.p_normal,
                "p_pneumonia": pred.p_pneumonia,
                "triage": pred.triage,
                "created_at": pred.created_at.isoformat(),
            }
        )
    return out


def study_dicts(session: Session, *, batch: Batch) -> list[dict[str, Any]]:
    """One plain dict per study of the batch, with its latest prediction (the shape of the JSON export)."""
    versions: dict[int, str] = {}
    out = []
    rows = study_rows(session, batch_id=batch.id)
    reviews = latest_reviews(session, study_ids=[study.id for study, _ in rows])
    for study, pred in rows:
        review = reviews.get(study.id)
        version = None
        if pred is not None:
            if pred.model_version_id not in versions:
                mv = session.get(ModelVersion, pred.model_version_id)  # identity map: one query per version
                versions[pred.model_version_id] = mv.version if mv else str(pred.model_version_id)
            version = versions[pred.model_version_id]
        out.append(
            {
                "study_id": study.id,
                "file_name": study.original_filename,
                "status": study.status.value,
                "format": study.format,
                "width": study.width,
                "height": study.height,
                "has_thumbnail": study.image_sha256 is not None,  # only validated images have a preview
                "predicted_class": pred.label if pred else None,
                "p_covid": pred.p_covid if pred else None,
                "p_normal": pred.p_normal if pred else None,
                "p_pneumonia": pred.p_pneumonia if pred else None,
                "triage": pred.triage if pred else None,
                "model_version": version,
                "error": study.error,
                "review_label": review["label"] if review else None,
                "review_note": review["note"] if review else None,
                "review_agrees": review["agrees"] if review else None,
                "reviewer": review["reviewer"] if review else None,
                "reviewed_at": review["at"] if review else None,
            }
        )
    return out


def batch_payload(session: Session, *, batch: Batch) -> dict[str, Any]:
    """The JSON export of a batch: notice, batch metadata, progress, one entry per study."""
    progress = batch_progress(session, batch_ids=[batch.id])[batch.id]
    studies = [
        {k: v for k, v in row.items() if k != "has_thumbnail"} for row in study_dicts(session, batch=batch)
    ]
    # Re-screening adds predictions and never overwrites: the export carries all of them, oldest first.
    history = all_predictions(session, study_ids=[row["study_id"] for row in studies])
    for row in studies:
        row["predictions"] = history.get(row["study_id"], [])
    return {
        "notice": NOTICE,
        "batch": {
            "id": batch.id,
            "name": batch.name,
            "notes": batch.notes,
            "owner": batch.owner.username,
            "created_at": batch.created_at.isoformat(),
        },
        "progress": progress.as_dict(),
        "studies": studies,
    }
