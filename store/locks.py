"""Named locks with a lease in SQL: one holder at a time, and a crashed holder's lock expires."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.orm import Session

from store.db import insert_ignore
from store.tables import Lock, utcnow


def acquire_lock(session: Session, *, name: str, holder: str, lease_s: int) -> bool:
    """Take the lock if it is free, expired, or already ours (then the lease is renewed)."""
    now = utcnow()
    expires = now + timedelta(seconds=lease_s)
    taken = session.execute(
        update(Lock)
        .where(Lock.name == name, or_(Lock.expires_at < now, Lock.holder == holder))
        .values(holder=holder, expires_at=expires)
        .execution_options(synchronize_session=False)
    ).rowcount
    if taken == 1:
        return True
    # RETURNING, not rowcount: psycopg reports -1 for INSERT ... ON CONFLICT DO NOTHING.
    inserted = session.execute(
        insert_ignore(session, Lock)
        .values(name=name, holder=holder, expires_at=expires)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(Lock.name)
    ).scalar_one_or_none()
    return inserted is not None


def renew_lock(session: Session, *, name: str, holder: str, lease_s: int) -> bool:
    """Extend our lease; False if the lock is no longer ours."""
    return (
        session.execute(
            update(Lock)
            .where(Lock.name == name, Lock.holder == holder)
            .values(expires_at=utcnow() + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def release_lock(session: Session, *, name: str, holder: str) -> None:
    """Drop the lock if we hold it."""
    session.execute(delete(Lock).where(Lock.name == name, Lock.holder == holder))
