"""Grad-CAM heat maps for screened studies, computed after their predictions are stored.

Measured on the 2-core development machine: about 30 ms per study with the Keras model loaded (4 s to load it
once per process), against about 5-7 ms per study for screening with LiteRT. Done inline it would slow
screening several-fold, so it runs as its own task on the `explain` queue, sent after the screening chunk
committed; the study page shows "heat map pending" until it is stored. Idempotent: a study that already has
the heat map of its prediction is skipped, so a redelivered task only finishes what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from config import Settings
from store.db import session_scope
from store.heatmaps import HeatmapJob, heatmap_jobs, save_heatmap
from store.models_registry import get_version
from worker.artifacts import artifact_dir

log = logging.getLogger("cxr.worker")

NO_ARTIFACT_REASON = "The model version's artifact is not on this worker host, nor its files in the database."


def explain_one(job: HeatmapJob, artifact: Path | None) -> tuple[bytes | None, str | None]:
    """(RGBA PNG, None) for one job with its model version's folder, or (None, why it could not be made)."""
    from model.explain import explain_bytes  # TensorFlow is imported here, in the worker process only
    from model.preprocess import ImageDecodeError

    if artifact is None or not (artifact / "meta.json").exists() or not (artifact / "model.keras").exists():
        return None, NO_ARTIFACT_REASON
    try:
        png, _ = explain_bytes(artifact, job.data, job.class_name)
    except ImageDecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad study must not stop the others; one log line, no traceback
        log.warning("heat map of study %s failed: %s: %s", job.study_id, type(exc).__name__, exc)
        return None, f"The heat map could not be computed ({type(exc).__name__})."
    return png, None


def run_explain_task(study_ids: Sequence[int], *, model_version_id: int, settings: Settings) -> int:
    """Compute and store the missing heat maps of these studies' predictions; how many were stored."""
    with session_scope(settings.database_url) as session:
        jobs = heatmap_jobs(
            session, study_ids=sorted({int(i) for i in study_ids}), model_version_id=model_version_id
        )
        mv = get_version(session, version_id=model_version_id) if jobs else None
        # The heat map must come from the model that made the prediction: its folder here, or its SQL files.
        artifact = artifact_dir(settings, session, mv) if mv is not None else None
    stored = 0
    # No transaction stays open while the network runs; each map is committed as soon as it exists.
    for job in jobs:
        started = time.perf_counter()
        png, error = explain_one(job, artifact)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        with session_scope(settings.database_url) as session:
            save_heatmap(
                session,
                study_id=job.study_id,
                model_version_id=job.model_version_id,
                class_name=job.class_name,
                png=png,
                error=error,
                elapsed_ms=elapsed_ms,
            )
        stored += 1
    return stored
