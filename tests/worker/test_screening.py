"""worker.screening called directly (no Celery): the real model on real images, and the failure paths."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from config import Settings, load_settings
from store.db import session_scope
from store.tables import Study, StudyStatus, utcnow
from tests.integration.helpers import CORRUPT_PNG, assert_done_exactly_once, outcome
from tests.procs import sample_images
from tests.worker.conftest import Seeded, seed
from worker.screening import (
    NO_IMAGE_REASON,
    ServingModel,
    model_version_id,
    reconcile_once,
    run_screen_task,
    screen_chunk,
    split_suspects,
)


def _settings(url: str) -> Settings:
    s = load_settings()
    return Settings(**{**s.__dict__, "database_url": url, "chunk_size": 4, "max_attempts": 3})


class _Raises:
    """A predictor that fails the way a time limit or a bug would (it never returns a prediction)."""

    version = "raises"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def predict_bytes(self, items: list[bytes], **_kw: object) -> list:
        raise self.exc


class _Recorder:
    """Stands in for send_screen_chunks: remembers what would have been enqueued."""

    def __init__(self) -> None:
        self.sent: list[list[int]] = []

    def __call__(self, ids: Sequence[int], chunk_size: int) -> int:
        chunks = [list(ids[i : i + chunk_size]) for i in range(0, len(ids), chunk_size)]
        self.sent += chunks
        return len(chunks)


def test_real_model_chunk_done_and_failed_with_reasons(db_url: str, predictor) -> None:  # noqa: ANN001
    """Three X-rays DONE with one prediction each; a corrupt PNG and an empty study FAILED with reasons."""
    images = [data for _, data in sample_images(3)]
    s = seed(db_url, [*images, CORRUPT_PNG, None])
    model = ServingModel(predictor, model_version_id(db_url, predictor), predictor.version)
    settings = _settings(db_url)
    with session_scope(db_url) as session:
        result = screen_chunk(session, study_ids=s.study_ids, token="t1", model=model, settings=settings)
    assert result.done == s.study_ids[:3]
    assert sorted(result.failed) == s.study_ids[3:]
    assert_done_exactly_once(db_url, s.study_ids[:3])
    states = outcome(db_url, s.batch_id)
    corrupt_status, corrupt_error, _, _ = states[s.study_ids[3]]
    assert corrupt_status == StudyStatus.FAILED and "could not be decoded" in corrupt_error
    assert states[s.study_ids[4]][:2] == (StudyStatus.FAILED, NO_IMAGE_REASON)

    # The same delivery again (e.g. a duplicate message): nothing is claimed, nothing written twice.
    with session_scope(db_url) as session:
        again = screen_chunk(session, study_ids=s.study_ids, token="t1", model=model, settings=settings)
    assert (again.done, again.failed, again.not_claimed) == ([], [], s.study_ids)
    assert_done_exactly_once(db_url, s.study_ids[:3])


def test_model_version_registered_once_and_serving(sqlite_url: str, predictor) -> None:  # noqa: ANN001
    """The worker's model version is registered (serving when none serves); later calls reuse it."""
    from store.models_registry import serving_version

    first = model_version_id(sqlite_url, predictor)
    assert model_version_id(sqlite_url, predictor) == first
    with session_scope(sqlite_url) as session:
        mv = serving_version(session)
        assert (mv.id, mv.version, mv.artifact_sha256) == (
            first,
            predictor.version,
            predictor.artifact_sha256,
        )


@pytest.mark.parametrize("exc", [SoftTimeLimitExceeded(), RuntimeError("out of memory")])
def test_time_limit_or_error_releases_the_chunk(seeded: Seeded, exc: BaseException) -> None:
    """A soft time limit or an error mid-inference hands the studies back QUEUED for a retry, one per task."""
    settings = _settings(seeded.url)
    model = ServingModel(_Raises(exc), seeded.model_version_id, "raises")
    with session_scope(seeded.url) as session:
        result = screen_chunk(session, study_ids=seeded.study_ids, token="t", model=model, settings=settings)
    assert result.requeued == seeded.study_ids and not result.done
    states = outcome(seeded.url, seeded.batch_id)
    assert {sid: st[:1] + st[2:] for sid, st in states.items()} == dict.fromkeys(
        seeded.study_ids, (StudyStatus.QUEUED, 1, 0)
    )


def test_redelivered_chunk_is_split_one_study_per_task(seeded: Seeded) -> None:
    """A chunk holding studies delivered before runs them one per task, so a poison one hurts only itself."""
    ids = seeded.study_ids
    settings = _settings(seeded.url)
    with session_scope(seeded.url) as session:
        session.execute(update(Study).where(Study.id.in_(ids[:2])).values(attempts=1))
        assert split_suspects(session, study_ids=ids, token="t", settings=settings) == [
            ids[2:],
            [ids[0]],
            [ids[1]],
        ]
        assert split_suspects(session, study_ids=ids[2:], token="t", settings=settings) is None
        assert split_suspects(session, study_ids=ids[:1], token="t", settings=settings) is None


def test_run_screen_task_splits_without_loading_work(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task entry point: a redelivered chunk (same token) is released and fanned out after the commit."""
    import worker.screening as screening

    settings = _settings(seeded.url)
    monkeypatch.setattr(
        screening, "serving_model", lambda _s, _session=None: ServingModel(None, seeded.model_version_id, "x")
    )
    with session_scope(seeded.url) as session:
        from store.studies import claim_studies

        claim_studies(session, study_ids=seeded.study_ids, token="t", lease_s=60, max_attempts=3)
    send = _Recorder()
    result = run_screen_task(seeded.study_ids, token="t", settings=settings, enqueue=send)
    assert result.split and send.sent == [[i] for i in seeded.study_ids]
    assert {st[0] for st in outcome(seeded.url, seeded.batch_id).values()} == {StudyStatus.QUEUED}


def test_reconcile_once_commits_then_enqueues(seeded: Seeded) -> None:
    """The reconciler requeues expired studies and enqueues them in chunks."""
    with session_scope(seeded.url) as session:
        session.execute(update(Study).values(lease_expires_at=utcnow()))
    send = _Recorder()
    assert reconcile_once(_settings(seeded.url), enqueue=send) == seeded.study_ids
    assert send.sent == [seeded.study_ids]


def test_worker_follows_a_promoted_version(sqlite_url: str, tmp_path, predictor) -> None:  # noqa: ANN001
    """After a promotion the next task uses the promoted artifact and records its version id."""
    import json
    import shutil

    from store.models_registry import promote, register_model_version
    from worker.screening import serving_model

    settings = _settings(sqlite_url)
    first = serving_model(settings)
    assert first.version == predictor.version
    # A second version: the same network under another name (a retraining run writes a folder like this).
    copy = tmp_path / "candidate"
    shutil.copytree(predictor.artifact_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["version"] = predictor.version + "-candidate"
    (copy / "meta.json").write_text(json.dumps(meta))
    with session_scope(sqlite_url) as session:
        mv = register_model_version(
            session,
            version=meta["version"],
            artifact_path=str(copy),
            artifact_sha256="1" * 64,
            serve_if_none=False,
        )
        promote(session, model_version=mv, user_id=None)
        candidate_id = mv.id
    second = serving_model(settings)
    assert (second.version, second.model_version_id) == (meta["version"], candidate_id)
    assert second.predictor.artifact_dir == copy
