"""A worker host without the model's folder serves the registered version from its files in SQL (issue 14).

The trainer's folder is a copy of the committed default artifact, registered, then deleted; the worker's own
configured model points nowhere, so a silent fallback to it would fail instead of passing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from config import Settings, load_settings
from model.artifact import artifact_sha256, read_meta
from store.db import session_scope
from store.model_files import cache_root
from store.models_registry import register_model_version
from store.tables import Heatmap, Prediction
from tests.procs import sample_images
from tests.worker.conftest import mark_predicted_normal, seed
from worker.explain import run_explain_task
from worker.screening import screen_chunk, serving_model


@pytest.fixture
def remote_version(db_url: str, tmp_path: Path, predictor) -> tuple[str, int, Settings]:  # noqa: ANN001
    """(version, its id, a worker host's settings): registered from a trainer's folder that is now gone."""
    trainer = tmp_path / "trainer-host" / "models" / predictor.version
    shutil.copytree(predictor.artifact_dir, trainer)
    version = read_meta(trainer)["version"]
    with session_scope(db_url) as s:
        mv_id = register_model_version(
            s, version=version, artifact_path=str(trainer), artifact_sha256=artifact_sha256(trainer)
        ).id
    shutil.rmtree(tmp_path / "trainer-host")
    base = load_settings()
    settings = Settings(
        **{
            **base.__dict__,
            "database_url": db_url,
            "data_dir": tmp_path / "worker-host",
            "model_dir": tmp_path / "worker-host" / "no-model-here",
            "chunk_size": 4,
        }
    )
    return version, mv_id, settings


def test_screening_serves_the_version_from_sql_with_the_same_predictions(
    db_url: str,
    remote_version: tuple[str, int, Settings],
    predictor,  # noqa: ANN001
) -> None:
    """serving_model writes the files to $CXR_DATA_DIR/model-cache/<version> and loads them from there;
    screen_chunk records that version with the predictions the original folder gives."""
    version, mv_id, settings = remote_version
    images = [data for _, data in sample_images(3)]
    s = seed(db_url, images)
    model = serving_model(settings)
    cached = cache_root(settings.data_dir) / version
    assert (model.version, model.model_version_id) == (version, mv_id)
    assert Path(model.predictor.artifact_dir) == cached.resolve()
    assert artifact_sha256(cached) == artifact_sha256(predictor.artifact_dir)

    with session_scope(db_url) as session:
        outcome = screen_chunk(session, study_ids=s.study_ids, token="t-sql", model=model, settings=settings)
    assert outcome.done == s.study_ids
    expected = predictor.predict_bytes(images)
    with session_scope(db_url) as session:
        rows = session.scalars(
            select(Prediction).where(Prediction.study_id.in_(s.study_ids)).order_by(Prediction.study_id)
        ).all()
    assert [r.model_version_id for r in rows] == [mv_id] * len(images)
    for row, want in zip(rows, expected, strict=True):
        assert row.label == want.label and row.triage == want.triage
        assert row.p_covid == pytest.approx(want.p_covid, abs=1e-6)
        assert row.p_normal == pytest.approx(want.p_normal, abs=1e-6)
        assert row.p_pneumonia == pytest.approx(want.p_pneumonia, abs=1e-6)

    # A corrupted cached file is replaced at the next resolution (here: the next chunk's).
    tflite = cached / "model.tflite"
    data = bytearray(tflite.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tflite.write_bytes(bytes(data))
    assert serving_model(settings).version == version
    assert artifact_sha256(cached) == artifact_sha256(predictor.artifact_dir)


def test_heat_maps_come_from_the_files_in_sql(db_url: str, remote_version: tuple[str, int, Settings]) -> None:
    """The explain worker finds the prediction's version through the same resolution and stores a heat map."""
    _, mv_id, settings = remote_version
    s = seed(db_url, [data for _, data in sample_images(1)])
    mark_predicted_normal(db_url, s.study_ids[0], mv_id)
    assert run_explain_task(s.study_ids, model_version_id=mv_id, settings=settings) == 1
    with session_scope(db_url) as session:
        row = session.scalar(select(Heatmap).where(Heatmap.study_id == s.study_ids[0]))
        assert row.error is None and row.png, row.error
