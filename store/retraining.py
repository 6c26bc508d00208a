"""Retraining runs: one at a time (SQL lock with a lease), progress, and the gate's recorded verdict."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.audit import record_event
from store.locks import acquire_lock
from store.tables import RetrainRun, RunStatus, utcnow

RETRAIN_LOCK = "retrain"


def start_run(
    session: Session,
    *,
    holder: str,
    trigger: str,
    lease_s: int,
    epochs_total: int,
    current_version_id: int | None,
) -> RetrainRun | None:
    """Take the retraining lock and open a run; None when another run holds the lock."""
    if not acquire_lock(session, name=RETRAIN_LOCK, holder=holder, lease_s=lease_s):
        return None
    # A run left RUNNING by a holder that crashed (its lease ran out, so we got the lock) is closed as FAILED.
    session.execute(
        update(RetrainRun)
        .where(RetrainRun.status == RunStatus.RUNNING)
        .values(
            status=RunStatus.FAILED,
            reasons="the run stopped without finishing (its lease ran out)",
            finished_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    run = RetrainRun(
        trigger=trigger,
        status=RunStatus.RUNNING,
        epochs_total=epochs_total,
        current_version_id=current_version_id,
    )
    session.add(run)
    session.flush()
    record_event(
        session,
        user_id=None,
        action="retrain.start",
        target=f"retrain:{run.id}",
        details={"trigger": trigger},
    )
    return run


def set_progress(session: Session, *, run_id: int, epoch: int, epochs_total: int) -> None:
    """Record that epoch `epoch` of `epochs_total` finished."""
    session.execute(
        update(RetrainRun)
        .where(RetrainRun.id == run_id)
        .values(epoch=epoch, epochs_total=epochs_total)
        .execution_options(synchronize_session=False)
    )


def finish_run(
    session: Session,
    *,
    run_id: int,
    status: RunStatus,
    reasons: str,
    gate: dict[str, Any] | None = None,
    candidate_version_id: int | None = None,
    n_reviewed: int | None = None,
) -> None:
    """Close a run with its verdict (PROMOTED, REJECTED or FAILED) and the reasons."""
    values: dict[str, Any] = {"status": status, "reasons": reasons[:4000], "finished_at": utcnow()}
    if gate is not None:
        values["gate"] = gate
    if candidate_version_id is not None:
        values["candidate_version_id"] = candidate_version_id
    if n_reviewed is not None:
        values["n_reviewed"] = n_reviewed
    session.execute(
        update(RetrainRun)
        .where(RetrainRun.id == run_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    record_event(
        session,
        user_id=None,
        action=f"retrain.{status.value.lower()}",
        target=f"retrain:{run_id}",
        details={"reasons": reasons[:500]},
    )


def list_runs(session: Session, *, limit: int = 50) -> list[RetrainRun]:
    """Recent retraining runs, newest first."""
    return list(session.scalars(select(RetrainRun).order_by(RetrainRun.id.desc()).limit(limit)))


def active_run(session: Session) -> RetrainRun | None:
    """The run in progress, if any (for the dashboard)."""
    return session.scalar(
        select(RetrainRun)
        .where(RetrainRun.status == RunStatus.RUNNING)
        .order_by(RetrainRun.id.desc())
        .limit(1)
    )


def retraining_progress(session: Session) -> dict[str, Any] | None:
    """The run in progress as {run_id, epoch, epochs_total, trigger, started_at}, or None."""
    run = active_run(session)
    if run is None:
        return None
    return {
        "run_id": run.id,
        "epoch": run.epoch,
        "epochs_total": run.epochs_total,
        "trigger": run.trigger,
        "started_at": run.started_at.isoformat() if run.started_at else None,
    }
