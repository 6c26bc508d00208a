"""Screening moves the worker's metrics: studies done / failed by reason and every stage's histogram."""

from __future__ import annotations

from ops.metrics import sample_value
from store.db import session_scope
from tests.integration.helpers import CORRUPT_PNG
from tests.procs import sample_images
from tests.worker.conftest import seed
from tests.worker.test_screening import _settings
from worker.screening import ServingModel, model_version_id, screen_chunk


def _snapshot() -> dict[str, float]:
    values = {"done": sample_value("cxr_studies_done_total")}
    for reason in ("decode", "no_image", "internal"):
        values[f"failed:{reason}"] = sample_value("cxr_studies_failed_total", {"reason": reason})
    for stage in ("decode", "preprocess", "infer", "write"):
        values[stage] = sample_value("cxr_stage_seconds_count", {"stage": stage})
        values[stage + ":sum"] = sample_value("cxr_stage_seconds_sum", {"stage": stage})
    return values


def test_a_real_chunk_moves_the_counters_and_stage_histograms(sqlite_url: str, predictor) -> None:  # noqa: ANN001
    """3 X-rays, a corrupt PNG, an empty study: done +3, decode +1, no_image +1; each stage observed."""
    s = seed(sqlite_url, [*[d for _, d in sample_images(3)], CORRUPT_PNG, None])
    model = ServingModel(predictor, model_version_id(sqlite_url, predictor), predictor.version)
    before = _snapshot()
    with session_scope(sqlite_url) as session:
        screen_chunk(session, study_ids=s.study_ids, token="m1", model=model, settings=_settings(sqlite_url))
    after = _snapshot()
    moved = {k: after[k] - before[k] for k in before}
    assert moved["done"] == 3 and moved["failed:decode"] == 1 and moved["failed:no_image"] == 1, moved
    assert moved["failed:internal"] == 0, moved
    # decode: the 4 stored images (the corrupt one fails there); preprocess: the 3 decoded.
    assert (moved["decode"], moved["preprocess"], moved["infer"], moved["write"]) == (4, 3, 1, 1), moved
    assert moved["infer:sum"] > 0 and moved["decode:sum"] > 0, moved
