"""Grad-CAM heat maps per (study, model version): what still needs one, storing one, reading one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import insert_ignore
from store.tables import Batch, Heatmap, Image, Prediction, Study, StudyStatus, utcnow


@dataclass(frozen=True)
class HeatmapJob:
    """One heat map to compute: the image and the class to explain (the model version made the prediction)."""

    study_id: int
    model_version_id: int
    class_name: str
    data: bytes


def heatmap_jobs(session: Session, *, study_ids: Sequence[int], model_version_id: int) -> list[HeatmapJob]:
    """The heat maps still missing for these studies' predictions by this model version (reruns skip)."""
    if not study_ids:
        return []
    rows = session.execute(
        select(Study.id, Prediction.label, Image.data)
        .join(Prediction, Prediction.study_id == Study.id)
        .join(Image, Image.sha256 == Study.image_sha256)
        .join(Batch, Batch.id == Study.batch_id)
        .outerjoin(
            Heatmap,
            (Heatmap.study_id == Study.id) & (Heatmap.model_version_id == Prediction.model_version_id),
        )
        .where(
            Study.id.in_(list(study_ids)),
            Study.status == StudyStatus.DONE,
            Prediction.model_version_id == model_version_id,
            Heatmap.id.is_(None),
            Batch.deleted_at.is_(None),
        )
        .order_by(Study.id)
    ).all()
    return [HeatmapJob(sid, model_version_id, label, bytes(data)) for sid, label, data in rows]


def save_heatmap(
    session: Session,
    *,
    study_id: int,
    model_version_id: int,
    class_name: str,
    png: bytes | None,
    error: str | None = None,
    elapsed_ms: float = 0.0,
) -> None:
    """Store a heat map (or why there is none); a second one for the same prediction is ignored."""
    session.execute(
        insert_ignore(session, Heatmap)
        .values(
            study_id=study_id,
            model_version_id=model_version_id,
            class_name=class_name[:16],
            png=png,
            error=error[:2000] if error else None,
            elapsed_ms=elapsed_ms,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["study_id", "model_version_id"])
    )


def heatmap_status(session: Session, *, study_id: int, model_version_id: int) -> Heatmap | None:
    """The heat map row of one prediction (without its bytes), or None while it is pending."""
    return session.scalar(
        select(Heatmap).where(Heatmap.study_id == study_id, Heatmap.model_version_id == model_version_id)
    )


def heatmap_png(session: Session, *, study_id: int, model_version_id: int) -> bytes | None:
    """The PNG bytes of one prediction's heat map, or None."""
    return session.scalar(
        select(Heatmap.png).where(Heatmap.study_id == study_id, Heatmap.model_version_id == model_version_id)
    )
