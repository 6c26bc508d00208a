"""SQL locks with a lease: one holder at a time; an expired lease can be taken over."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import update

from store.db import session_scope
from store.locks import acquire_lock, release_lock, renew_lock
from store.tables import Lock, utcnow


def test_one_holder_then_takeover_after_lease(db_url: str) -> None:
    """A second holder is refused while the lease runs and wins once it has expired."""
    with session_scope(db_url) as s:
        assert acquire_lock(s, name="retrain", holder="a", lease_s=60)
    with session_scope(db_url) as s:
        assert not acquire_lock(s, name="retrain", holder="b", lease_s=60)
        assert acquire_lock(s, name="retrain", holder="a", lease_s=60), "the holder may renew by re-acquiring"
        assert renew_lock(s, name="retrain", holder="a", lease_s=60)
        assert not renew_lock(s, name="retrain", holder="b", lease_s=60)
    # Simulate a crashed holder: its lease ran out.
    with session_scope(db_url) as s:
        s.execute(update(Lock).values(expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope(db_url) as s:
        assert acquire_lock(s, name="retrain", holder="b", lease_s=60)
    with session_scope(db_url) as s:
        release_lock(s, name="retrain", holder="a")  # not a's any more: no effect
        assert not acquire_lock(s, name="retrain", holder="c", lease_s=60)
        release_lock(s, name="retrain", holder="b")
    with session_scope(db_url) as s:
        assert acquire_lock(s, name="retrain", holder="c", lease_s=60)


def test_simultaneous_acquire_has_one_winner(db_url: str) -> None:
    """Eight threads racing for a free lock: exactly one gets it."""
    barrier = threading.Barrier(8)
    wins: list[str] = []
    errors: list[BaseException] = []

    def contend(holder: str) -> None:
        try:
            barrier.wait()
            with session_scope(db_url) as s:
                if acquire_lock(s, name="race", holder=holder, lease_s=60):
                    wins.append(holder)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(f"h{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(wins) == 1, wins
