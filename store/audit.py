"""Append-only audit trail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.tables import AuditEvent, Study, User


def record_event(
    session: Session,
    *,
    user_id: int | None,
    action: str,
    target: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add one audit event to the current transaction."""
    event = AuditEvent(user_id=user_id, action=action, target=target, details=details or {})
    session.add(event)
    return event


@dataclass(frozen=True)
class EventRow:
    """One audit event as the audit page shows it."""

    id: int
    at: datetime
    username: str | None
    action: str
    target: str
    details: dict[str, Any]


def _targets_of_batch(session: Session, batch_id: int) -> list[str]:
    ids = session.scalars(select(Study.id).where(Study.batch_id == batch_id))
    return [f"batch:{batch_id}"] + [f"study:{sid}" for sid in ids]


def list_events(
    session: Session,
    *,
    user_id: int | None = None,
    batch_id: int | None = None,
    study_id: int | None = None,
    page: int = 1,
    per_page: int = 50,
) -> tuple[list[EventRow], int]:
    """Audit events newest first, filtered by who did it, by batch (the batch and its studies) or by study;
    one page of them and the total count."""
    cond = []
    if user_id is not None:
        cond.append(AuditEvent.user_id == user_id)
    if batch_id is not None:
        cond.append(AuditEvent.target.in_(_targets_of_batch(session, batch_id)))
    if study_id is not None:
        cond.append(AuditEvent.target == f"study:{study_id}")
    total = int(session.scalar(select(func.count(AuditEvent.id)).where(*cond)) or 0)
    rows = session.execute(
        select(AuditEvent, User.username)
        .outerjoin(User, User.id == AuditEvent.user_id)
        .where(*cond)
        .order_by(AuditEvent.id.desc())
        .limit(per_page)
        .offset((max(page, 1) - 1) * per_page)
    ).all()
    events = [EventRow(ev.id, ev.at, name, ev.action, ev.target, ev.details or {}) for ev, name in rows]
    return events, total
