"""Batches built through store/ as the web does it (commit, then enqueue), and checks on their outcome."""

from __future__ import annotations

import struct
import zlib

from sqlalchemy import func, select

from store.db import session_scope
from store.studies import add_studies, batch_progress, create_batch, mark_queued
from store.tables import Prediction, Study, StudyStatus, User
from store.users import create_user

_IHDR = b"IHDR" + struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
# A PNG with a valid 64x64 header whose pixel data is garbage: passes sniffing, fails decoding.
CORRUPT_PNG = (
    b"\x89PNG\r\n\x1a\n"
    + struct.pack(">I", 13)
    + _IHDR
    + struct.pack(">I", zlib.crc32(_IHDR))
    + b"\x00\x00\x00\x20IDAT"
    + b"garbage, not deflate data at all"
)


def make_batch(
    url: str,
    images: list[tuple[str, bytes]],
    *,
    extra: list[tuple[str, bytes | None]] = (),
    lease_s: int = 3600,
) -> tuple[int, list[int]]:
    """A batch of these images (+ extra raw entries), all QUEUED and committed; (batch id, study ids)."""
    with session_scope(url) as session:
        user = session.scalar(select(User).where(User.username == "tester"))
        if user is None:
            user = create_user(session, username="tester", password="correct horse battery")
        batch = create_batch(session, owner=user, name="integration")
        files = [{"filename": n, "data": d} for n, d in [*images, *extra]]
        ids = add_studies(session, batch=batch, files=files)
        mark_queued(session, study_ids=ids, lease_s=lease_s)
        return batch.id, ids


def progress(url: str, batch_id: int):  # noqa: ANN201
    """store.studies.Progress of one batch."""
    with session_scope(url) as session:
        return batch_progress(session, batch_ids=[batch_id])[batch_id]


def finished(url: str, batch_id: int):  # noqa: ANN201
    """The batch's Progress once no study is left to run, else None (for wait_for)."""
    p = progress(url, batch_id)
    return p if p.finished else None


def outcome(url: str, batch_id: int) -> dict[int, tuple[StudyStatus, str | None, int, int]]:
    """study id -> (status, error, attempts, number of predictions)."""
    with session_scope(url) as session:
        counts = dict(
            session.execute(
                select(Prediction.study_id, func.count(Prediction.id)).group_by(Prediction.study_id)
            ).all()
        )
        rows = session.execute(
            select(Study.id, Study.status, Study.error, Study.attempts).where(Study.batch_id == batch_id)
        ).all()
        return {sid: (status, error, attempts, counts.get(sid, 0)) for sid, status, error, attempts in rows}


def assert_done_exactly_once(url: str, study_ids: list[int]) -> None:
    """Every study DONE with exactly one prediction, well formed and tied to a registered model version."""
    with session_scope(url) as session:
        studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(study_ids)))}
        preds = list(session.scalars(select(Prediction).where(Prediction.study_id.in_(study_ids))))
        bad = {i: (s.status, s.error) for i, s in studies.items() if s.status != StudyStatus.DONE}
        assert not bad, f"studies not DONE: {bad}"
        per_study: dict[int, int] = {}
        for p in preds:
            per_study[p.study_id] = per_study.get(p.study_id, 0) + 1
            assert p.label in {"covid", "normal", "pneumonia"}
            assert abs(p.p_covid + p.p_normal + p.p_pneumonia - 1.0) < 1e-3
            assert p.elapsed_ms > 0
            assert p.model_version.version
        assert per_study == dict.fromkeys(study_ids, 1), "each study must have exactly one prediction"
