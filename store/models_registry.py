"""Model versions known to the system and which one serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.audit import record_event
from store.model_files import save_model_files
from store.tables import AuditEvent, ModelVersion, User, utcnow

PROMOTE_ACTION = "model.promote"


def register_model_version(
    session: Session,
    *,
    version: str,
    artifact_path: str,
    artifact_sha256: str,
    metrics: dict[str, Any] | None = None,
    card: str = "",
    band_legend: dict[str, str] | None = None,
    serve_if_none: bool = True,
) -> ModelVersion:
    """Insert the version if new (idempotent) with the files of its folder; make it serve when nothing serves.

    Every regular file in the folder artifact_path (when it is on this host) is stored in model_files, so
    worker hosts without that folder write their own copy (store.model_files). A version registered before
    its files were kept gets them from the first registration whose folder has the same artifact_sha256.
    band_legend is the artifact's meta["band_legend"] (band -> meaning), kept so every report can explain
    the bands of the version that made each prediction; a version registered without one gets it later.
    """
    mv = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if mv is None:
        mv = ModelVersion(
            version=version,
            artifact_path=artifact_path,
            artifact_sha256=artifact_sha256,
            metrics=metrics or {},
            card=card,
            band_legend=dict(band_legend) if band_legend else None,
        )
        session.add(mv)
        session.flush()
        save_model_files(session, model_version_id=mv.id, folder=Path(artifact_path))
    else:
        if band_legend and not mv.band_legend:
            mv.band_legend = dict(band_legend)
        if artifact_sha256 == mv.artifact_sha256:
            save_model_files(session, model_version_id=mv.id, folder=Path(artifact_path))
    if serve_if_none and serving_version(session) is None:
        promote(session, model_version=mv, user_id=None)
    return mv


def serving_version(session: Session) -> ModelVersion | None:
    """The model version that workers should use, if any."""
    return session.scalar(select(ModelVersion).where(ModelVersion.is_serving.is_(True)))


def promote(session: Session, *, model_version: ModelVersion, user_id: int | None) -> None:
    """Make model_version the only serving version."""
    session.execute(update(ModelVersion).where(ModelVersion.id != model_version.id).values(is_serving=False))
    model_version.is_serving = True
    model_version.promoted_at = utcnow()
    record_event(session, user_id=user_id, action=PROMOTE_ACTION, target=f"model:{model_version.version}")


def list_versions(session: Session) -> list[ModelVersion]:
    """All model versions, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def get_version(session: Session, *, version_id: int) -> ModelVersion | None:
    """One model version by id, or None."""
    return session.get(ModelVersion, version_id)


def promotion_history(session: Session, *, limit: int = 100) -> list[dict[str, Any]]:
    """Audit events of promotions (by hand or by a retraining run), newest first."""
    rows = session.execute(
        select(AuditEvent, User.username)
        .outerjoin(User, User.id == AuditEvent.user_id)
        .where(AuditEvent.action == PROMOTE_ACTION)
        .order_by(AuditEvent.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "at": ev.at,
            "version": ev.target.removeprefix("model:"),
            "by": username or "system (retraining or first start)",
        }
        for ev, username in rows
    ]


def band_legends(session: Session, *, version_ids: list[int]) -> dict[int, dict[str, str] | None]:
    """The stored band legend of each of these model versions (None where the artifact had none)."""
    if not version_ids:
        return {}
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.band_legend).where(ModelVersion.id.in_(version_ids))
    ).all()
    return {int(vid): legend for vid, legend in rows}
