"""Retraining end to end through REAL workers: a training worker promotes a candidate, and the running
screening worker serves it at its next chunk, without a restart and without the trainer's folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from store.db import session_scope
from store.model_files import cache_root
from store.models_registry import serving_version
from store.retraining import list_runs
from store.studies import add_studies, create_batch, mark_queued, rescreen_batch
from store.tables import Prediction, RunStatus, Study, StudyStatus, User
from tests.conftest import make_user
from tests.procs import kill, service_env, settings_from_env, start_worker, wait_for
from tests.retrain.test_retrain import _serve
from worker.app import make_celery, send_retrain, send_screen_chunks

pytestmark = pytest.mark.slow


def _all_done(url: str, ids: list[int]) -> bool:
    with session_scope(url) as s:
        states = s.scalars(select(Study.status).where(Study.id.in_(ids))).all()
    return len(states) == len(ids) and all(st == StudyStatus.DONE for st in states)


def test_promotion_through_workers_switches_what_is_served(
    tmp_path: Path, sqlite_url: str, small_data: Path, tiny_current
) -> None:
    """Screen with A; a real training worker retrains and promotes B; re-screening adds B's predictions."""
    artifact, split = tiny_current
    version_a = _serve(sqlite_url, artifact)
    env = service_env(
        tmp_path / "data",
        database_url=sqlite_url,
        MODEL_DIR=str(artifact),
        RETRAIN_BASE_DATA=str(small_data),
        RETRAIN_SPLIT=str(split),
        RETRAIN_EPOCHS="4",
        # The gate's own behaviour is tested in test_retrain.py; here the candidate must be promoted.
        GATE_F1_MARGIN="1",
        GATE_SENSITIVITY_MARGIN="1",
        GATE_ECE_MAX="1",
    )
    (tmp_path / "data").mkdir()
    app = make_celery(settings_from_env(env), set_as_current=False)
    owner = make_user(sqlite_url, "clinic")
    files = sorted((small_data / "pneumonia").glob("*.jpg"))[:3]
    with session_scope(sqlite_url) as s:
        batch = create_batch(s, owner=s.get(User, owner), name="before and after")
        ids = add_studies(
            s, batch=batch, files=[{"filename": f.name, "data": f.read_bytes(), "fmt": "jpeg"} for f in files]
        )
        batch_id = batch.id
        mark_queued(s, study_ids=ids, lease_s=600)
    procs = [start_worker(env, queues="inference"), start_worker(env, queues="training", wait_ready=False)]
    try:
        send_screen_chunks(ids, app=app)
        wait_for(lambda: _all_done(sqlite_url, ids), 120, message="screening with model A")

        send_retrain("test", app=app)

        def run_finished() -> bool:
            with session_scope(sqlite_url) as s:
                runs = list_runs(s)
                return bool(runs) and runs[0].status != RunStatus.RUNNING

        wait_for(run_finished, 300, interval=1.0, message="the retraining run on the training worker")
        with session_scope(sqlite_url) as s:
            run = list_runs(s)[0]
            assert run.status == RunStatus.PROMOTED, run.reasons
            version_b = serving_version(s).version
            assert version_b != version_a
            trainer_folder = Path(serving_version(s).artifact_path)
            again = rescreen_batch(s, batch_id=batch_id, lease_s=600, user_id=None)
        # As on a screening host that does not share the trainer's disk: B reaches it only through SQL.
        shutil.rmtree(trainer_folder)
        assert again == sorted(ids)
        send_screen_chunks(again, app=app)
        wait_for(lambda: _all_done(sqlite_url, ids), 120, message="re-screening with model B")
        with session_scope(sqlite_url) as s:
            rows = s.execute(
                select(Prediction.study_id, Prediction.model_version_id).order_by(Prediction.id)
            ).all()
            versions = {mv.id: mv.version for mv in [serving_version(s)]}
        assert len(rows) == 2 * len(ids), "re-screening adds predictions and keeps the old ones"
        newest = {sid: mv for sid, mv in rows}
        assert all(versions.get(mv) == version_b for mv in newest.values()), (
            "the worker serves B, unrestarted"
        )
        assert (cache_root(tmp_path / "data") / version_b / "model.tflite").is_file()
    finally:
        for proc in procs:
            kill(proc)
