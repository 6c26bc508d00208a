"""The study state machine the worker relies on (store.studies), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from store.db import session_scope
from store.studies import (
    claim_studies,
    complete_studies,
    fail_study,
    mark_queued,
    out_of_attempts_reason,
    reconcile,
    release_studies,
)
from store.tables import Batch, Prediction, Study, StudyStatus, utcnow
from tests.worker.conftest import Seeded, seed

LEASE = 60


def _claim(url: str, ids: list[int], token: str, max_attempts: int = 3) -> list[int]:
    with session_scope(url) as s:
        return [
            st.id
            for st in claim_studies(s, study_ids=ids, token=token, lease_s=LEASE, max_attempts=max_attempts)
        ]


def _states(url: str, ids: list[int]) -> dict[int, tuple[StudyStatus, int, str | None]]:
    with session_scope(url) as s:
        rows = s.execute(
            select(Study.id, Study.status, Study.attempts, Study.claim_token).where(Study.id.in_(ids))
        )
        return {i: (st, a, tok) for i, st, a, tok in rows}


def _expire(url: str, ids: list[int]) -> None:
    with session_scope(url) as s:
        s.execute(
            update(Study).where(Study.id.in_(ids)).values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )


def _complete(url: str, sid: int, token: str, mv: int) -> bool:
    with session_scope(url) as s:
        return complete_studies(
            s,
            token=token,
            model_version_id=mv,
            results=[
                {
                    "study_id": sid,
                    "label": "normal",
                    "p_covid": 0.1,
                    "p_normal": 0.8,
                    "p_pneumonia": 0.1,
                    "triage": "routine",
                    "elapsed_ms": 12.0,
                }
            ],
        ) == [sid]


def _predictions(url: str, sid: int) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(Prediction).where(Prediction.study_id == sid))


def test_claim_is_compare_and_set(seeded: Seeded) -> None:
    """One token wins; another gets nothing while the lease holds; the holder may re-claim (redelivery)."""
    ids = seeded.study_ids
    assert _claim(seeded.url, ids, "task-a") == ids
    assert _claim(seeded.url, ids, "task-b") == []
    assert _claim(seeded.url, ids[:2], "task-a") == ids[:2]  # redelivered message: same task id
    states = _states(seeded.url, ids)
    assert [states[i] for i in ids[:2]] == [(StudyStatus.RUNNING, 2, "task-a")] * 2
    assert states[ids[2]] == (StudyStatus.RUNNING, 1, "task-a")


@pytest.mark.hardening("claim race: eight workers claim the same studies at once, each study goes to one")
def test_claim_race_gives_each_study_to_one_token(db_url: str) -> None:
    """Eight threads (as eight worker processes would) claim overlapping chunks at the same instant: all of
    the studies, and windows of 15 that overlap their neighbours' (duplicate and re-sent messages)."""
    s = seed(db_url, [f"race-{i}".encode() for i in range(40)])
    chunks = [s.study_ids] + [s.study_ids[i * 5 : i * 5 + 15] for i in range(7)]
    won: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(chunks))

    def claim(token: str, chunk: list[int]) -> None:
        barrier.wait()
        won[token] = _claim(db_url, chunk, token)

    threads = [threading.Thread(target=claim, args=(f"task-{i}", c)) for i, c in enumerate(chunks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    claimed = [sid for ids in won.values() for sid in ids]
    assert len(won) == len(chunks) and sorted(claimed) == s.study_ids, "every study claimed exactly once"
    states = _states(db_url, s.study_ids)
    assert all(states[sid] == (StudyStatus.RUNNING, 1, tok) for tok, ids in won.items() for sid in ids)


def test_expired_lease_can_be_claimed_by_another_task(seeded: Seeded) -> None:
    """A RUNNING study whose worker died is taken over once its lease ran out."""
    ids = seeded.study_ids
    _claim(seeded.url, ids, "dead-task")
    _expire(seeded.url, ids[:1])
    assert _claim(seeded.url, ids, "task-b") == ids[:1]
    assert not _complete(seeded.url, ids[0], "dead-task", seeded.model_version_id), "the old holder lost it"
    assert _complete(seeded.url, ids[0], "task-b", seeded.model_version_id)


def test_attempt_cap_fails_the_study_instead_of_running_it(seeded: Seeded) -> None:
    """A study delivered max_attempts times is FAILED with a readable reason, never claimed again."""
    sid = seeded.study_ids[0]
    for n in range(2):
        assert _claim(seeded.url, [sid], f"t{n}", max_attempts=2) == [sid]
        _expire(seeded.url, [sid])
    assert _claim(seeded.url, [sid], "t2", max_attempts=2) == []
    with session_scope(seeded.url) as s:
        study = s.get(Study, sid)
        assert (study.status, study.attempts, study.error) == (
            StudyStatus.FAILED,
            2,
            out_of_attempts_reason(2),
        )


def test_complete_is_idempotent_with_one_prediction(seeded: Seeded) -> None:
    """Completing twice (a duplicate delivery) changes nothing and writes no second prediction."""
    sid = seeded.study_ids[0]
    _claim(seeded.url, [sid], "t")
    assert _complete(seeded.url, sid, "t", seeded.model_version_id)
    assert not _complete(seeded.url, sid, "t", seeded.model_version_id)
    assert _claim(seeded.url, [sid], "t") == [], "a DONE study is never claimed again"
    assert _predictions(seeded.url, sid) == 1
    assert _states(seeded.url, [sid])[sid] == (StudyStatus.DONE, 1, None)


def test_fail_study_needs_the_claim(seeded: Seeded) -> None:
    """With a token, only the holder can fail a study; the reason is kept."""
    sid = seeded.study_ids[0]
    _claim(seeded.url, [sid], "holder")
    with session_scope(seeded.url) as s:
        assert not fail_study(s, study_id=sid, token="other", reason="nope")
        assert fail_study(s, study_id=sid, token="holder", reason="PNG pixel data could not be decoded")
    with session_scope(seeded.url) as s:
        assert s.get(Study, sid).error == "PNG pixel data could not be decoded"


def test_release_hands_studies_back_to_queued(seeded: Seeded) -> None:
    """On a soft time limit the holder releases its studies; someone else's stay untouched."""
    a, b = seeded.study_ids[:2]
    _claim(seeded.url, [a], "mine")
    _claim(seeded.url, [b], "theirs")
    with session_scope(seeded.url) as s:
        assert release_studies(s, study_ids=[a, b], token="mine", lease_s=LEASE) == [a]
    states = _states(seeded.url, [a, b])
    assert states[a] == (StudyStatus.QUEUED, 1, None)
    assert states[b] == (StudyStatus.RUNNING, 1, "theirs")


def test_reconcile_requeues_expired_and_fails_exhausted(seeded: Seeded) -> None:
    """Expired QUEUED/RUNNING come back QUEUED (ids returned); out of attempts: FAILED; live: untouched."""
    queued_expired, running_expired, exhausted, live = seeded.study_ids
    _claim(seeded.url, [running_expired, exhausted, live], "t")
    with session_scope(seeded.url) as s:
        s.execute(update(Study).where(Study.id == exhausted).values(attempts=2))
    _expire(seeded.url, [queued_expired, running_expired, exhausted])
    with session_scope(seeded.url) as s:
        assert reconcile(s, queued_lease_s=600, max_attempts=2) == sorted([queued_expired, running_expired])
    states = _states(seeded.url, seeded.study_ids)
    assert states[queued_expired] == (StudyStatus.QUEUED, 0, None)
    assert states[running_expired] == (StudyStatus.QUEUED, 1, None)
    assert states[exhausted][0] == StudyStatus.FAILED
    assert states[live] == (StudyStatus.RUNNING, 1, "t")
    with session_scope(seeded.url) as s:
        assert reconcile(s, queued_lease_s=600, max_attempts=2) == [], "requeued ones have a fresh lease"


def test_reconcile_leaves_studies_of_a_batch_never_started_alone(db_url: str) -> None:
    """RECEIVED studies (a batch created without `start`) are never queued by the reconciler, however old."""
    s = seed(db_url, [b"x", b"y"], queued=False)
    with session_scope(db_url) as session:
        for days in (0, 1, 30):
            later = utcnow() + timedelta(days=days, seconds=601)
            assert reconcile(session, queued_lease_s=600, max_attempts=3, now=later) == []
        session.commit()
    assert {st for st, *_ in _states(db_url, s.study_ids).values()} == {StudyStatus.RECEIVED}


def test_submit_with_start_commits_the_studies_already_queued(db_url: str) -> None:
    """submit_batch stores and queues in one transaction: a web process dying before the send leaves QUEUED
    studies (which the reconciler re-sends), never RECEIVED ones of a started batch."""
    from unittest import mock

    from config import load_settings
    from intake import batches
    from store.users import create_user
    from tests.web.conftest import png_bytes

    settings = load_settings()
    with session_scope(db_url) as session:
        owner = create_user(session, username="starter", password="correct horse battery")
        died = SystemExit("web died")
        with (
            mock.patch.object(batches.queue, "send_screen_chunks", side_effect=died),
            pytest.raises(SystemExit),
        ):
            batches.submit_batch(
                session,
                owner=owner,
                name="b",
                notes="",
                files=[("a.png", png_bytes())],
                settings=settings,
            )
        session.rollback()
        study = session.scalars(select(Study).join(Batch).where(Batch.owner_id == owner.id)).one()
        assert study.status == StudyStatus.QUEUED
        later = utcnow() + timedelta(seconds=settings.queued_lease_s + 1)
        assert reconcile(session, queued_lease_s=settings.queued_lease_s, max_attempts=3, now=later) == [
            study.id
        ]


def test_mark_queued_only_moves_received(db_url: str) -> None:
    """mark_queued is RECEIVED -> QUEUED only (a second call is a no-op)."""
    s = seed(db_url, [b"a", b"b"], queued=False)
    with session_scope(db_url) as session:
        assert mark_queued(session, study_ids=s.study_ids, lease_s=60) == s.study_ids
        assert mark_queued(session, study_ids=s.study_ids, lease_s=60) == []


def test_complete_studies_in_bulk_skips_lost_claims_and_duplicates(seeded: Seeded) -> None:
    """The chunk's bulk write: DONE + one prediction each, only for studies this token still holds."""
    a, b, c, _ = seeded.study_ids
    _claim(seeded.url, [a, b], "t")
    _claim(seeded.url, [c], "other")
    result = {
        "label": "covid",
        "p_covid": 0.7,
        "p_normal": 0.2,
        "p_pneumonia": 0.1,
        "triage": "x",
        "elapsed_ms": 3.0,
    }
    rows = [{"study_id": i, **result} for i in (a, b, c)]
    with session_scope(seeded.url) as s:
        assert complete_studies(s, token="t", model_version_id=seeded.model_version_id, results=rows) == [
            a,
            b,
        ]
    with session_scope(seeded.url) as s:
        assert complete_studies(s, token="t", model_version_id=seeded.model_version_id, results=rows) == []
    assert [_predictions(seeded.url, i) for i in (a, b, c)] == [1, 1, 0]
    assert _states(seeded.url, [c])[c] == (StudyStatus.RUNNING, 1, "other")
