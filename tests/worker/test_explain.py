"""Heat maps: sent after screening commits, computed by worker.explain with the real model, idempotent."""

from __future__ import annotations

import cv2
import numpy as np
from sqlalchemy import func, select

from store.db import session_scope
from store.heatmaps import heatmap_png, heatmap_status
from store.models_registry import band_legends
from store.tables import Heatmap, Prediction
from tests.procs import sample_images
from tests.worker.conftest import mark_predicted_normal, seed
from tests.worker.test_screening import _Recorder, _settings
from worker.explain import NO_ARTIFACT_REASON, run_explain_task
from worker.screening import model_version_id, run_screen_task


def test_screening_sends_done_studies_then_heat_maps_are_stored_once(db_url: str, predictor) -> None:  # noqa: ANN001
    """Studies DONE are sent for heat maps; each gets one RGBA map of its finding, shaped like the image."""
    images = [data for _, data in sample_images(2)]
    s = seed(db_url, images)
    settings = _settings(db_url)
    asked: list[tuple[list[int], int]] = []
    outcome = run_screen_task(
        s.study_ids,
        token="t-explain",
        settings=settings,
        enqueue=_Recorder(),
        explain=lambda ids, mv: asked.append((list(ids), mv)),
    )
    mv_id = model_version_id(db_url, predictor)
    assert asked == [(outcome.done, mv_id)] and outcome.done == s.study_ids

    assert run_explain_task(s.study_ids, model_version_id=mv_id, settings=settings) == 2
    # A redelivered task finds nothing left to do.
    assert run_explain_task(s.study_ids, model_version_id=mv_id, settings=settings) == 0
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count(Heatmap.id))) == 2
        for sid, data in zip(s.study_ids, images, strict=True):
            row = heatmap_status(session, study_id=sid, model_version_id=mv_id)
            label = session.scalar(select(Prediction.label).where(Prediction.study_id == sid))
            assert row is not None and row.error is None and row.class_name == label
            png = heatmap_png(session, study_id=sid, model_version_id=mv_id)
            heat = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
            orig = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            assert heat.ndim == 3 and heat.shape[2] == 4  # RGBA: alpha carries the strength
            assert heat[:, :, 3].max() > 0
            # Cropped to the content area: the same aspect ratio as the original image (within a pixel).
            assert abs(heat.shape[1] / heat.shape[0] - orig.shape[1] / orig.shape[0]) < 0.02
        # The default artifact's band legend (when it has one) is kept with its model version.
        legend = band_legends(session, version_ids=[mv_id])[mv_id]
        assert legend == (predictor.meta.get("band_legend") or None)


def test_missing_artifact_is_recorded_not_retried(db_url: str) -> None:
    """A version whose artifact is not on this host gets a row with the reason (the page says so)."""
    s = seed(db_url, [data for _, data in sample_images(1)])
    mark_predicted_normal(db_url, s.study_ids[0], s.model_version_id)
    settings = _settings(db_url)
    assert run_explain_task(s.study_ids, model_version_id=s.model_version_id, settings=settings) == 1
    with session_scope(db_url) as session:
        row = heatmap_status(session, study_id=s.study_ids[0], model_version_id=s.model_version_id)
        assert row.error == NO_ARTIFACT_REASON and row.png is None
    assert run_explain_task(s.study_ids, model_version_id=s.model_version_id, settings=settings) == 0
