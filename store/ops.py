"""The admin operations page's data from SQL: throughput of the last minutes, failures, work in flight."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.tables import Study, StudyStatus, utcnow


@dataclass
class OpsSummary:
    """Studies per minute over recent windows, failures of the last hour by reason, studies in flight."""

    per_minute: dict[int, float] = field(default_factory=dict)  # window in minutes -> studies finished / min
    failed_last_hour: int = 0
    top_failures: list[tuple[str, int]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)  # QUEUED / RUNNING


def ops_summary(session: Session, *, windows: tuple[int, ...] = (1, 5, 15)) -> OpsSummary:
    """DONE studies per minute in each window, the last hour's failures, QUEUED and RUNNING counts."""
    now = utcnow()
    out = OpsSummary()
    for minutes in windows:
        n = session.scalar(
            select(func.count(Study.id)).where(
                Study.status == StudyStatus.DONE, Study.finished_at >= now - timedelta(minutes=minutes)
            )
        )
        out.per_minute[minutes] = round((n or 0) / minutes, 1)
    hour_ago = now - timedelta(hours=1)
    failed = (Study.status == StudyStatus.FAILED, Study.finished_at >= hour_ago)
    out.failed_last_hour = session.scalar(select(func.count(Study.id)).where(*failed)) or 0
    rows = session.execute(
        select(Study.error, func.count(Study.id))
        .where(*failed)
        .group_by(Study.error)
        .order_by(func.count(Study.id).desc())
        .limit(5)
    ).all()
    out.top_failures = [(error or "(no reason)", int(n)) for error, n in rows]
    rows = session.execute(
        select(Study.status, func.count(Study.id))
        .where(Study.status.in_((StudyStatus.QUEUED, StudyStatus.RUNNING)))
        .group_by(Study.status)
    ).all()
    out.in_flight = {str(StudyStatus.QUEUED): 0, str(StudyStatus.RUNNING): 0}
    out.in_flight.update({str(status): int(n) for status, n in rows})
    return out
