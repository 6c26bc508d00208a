"""Append-only audit trail."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from store.tables import AuditEvent


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
