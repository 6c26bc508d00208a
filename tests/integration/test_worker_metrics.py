"""A REAL prefork worker's exporter (CXR_WORKER_METRICS_PORT): pool counters summed by the parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import CORRUPT_PNG, finished, make_batch
from tests.procs import free_port, sample_images, service_env, settings_from_env, start_worker, wait_for
from worker.app import make_celery, send_screen_chunks

pytestmark = pytest.mark.slow


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_worker_exporter_counts_a_real_batch(data_dir: Path, procs: list, sqlite_url: str) -> None:
    """3 X-rays + 1 corrupt PNG through a prefork worker: done 3, failed{decode} 1, stages observed."""
    port = free_port()
    env = service_env(data_dir, database_url=sqlite_url, worker_metrics_port=port, log_format="json")
    app = make_celery(settings_from_env(env), set_as_current=False)
    batch_id, ids = make_batch(sqlite_url, sample_images(3), extra=[("broken.png", CORRUPT_PNG)])
    procs.append(start_worker(env))
    before = _samples(port)
    assert before.get(("cxr_studies_done_total", ()), 0) == 0
    send_screen_chunks(ids, app=app)
    wait_for(lambda: finished(sqlite_url, batch_id), 120, message="the batch to finish")
    # The chunk's counters are written after its commit: poll the exporter briefly.
    after = wait_for(
        lambda: (s := _samples(port)).get(("cxr_studies_done_total", ()), 0) >= 3 and s,
        20,
        message="the exporter to show the finished chunk",
    )
    assert after[("cxr_studies_done_total", ())] == 3
    assert after[("cxr_studies_failed_total", (("reason", "decode"),))] == 1
    for stage, n in (("decode", 4), ("preprocess", 3), ("infer", 1), ("write", 1)):
        assert after[("cxr_stage_seconds_count", (("stage", stage),))] == n, stage
    assert any(name == "cxr_worker_model_info" and v == 1 for (name, _), v in after.items())

    # CXR_LOG_FORMAT=json: the corrupt image is one JSON line with the task, its studies and the batch.
    worker_log = procs[0].log_path.read_text(errors="replace")  # type: ignore[attr-defined]
    records = [json.loads(ln) for ln in worker_log.splitlines() if ln.startswith("{")]
    failed = [r for r in records if r["message"].startswith("study failed")]
    assert len(failed) == 1 and failed[0]["study_id"] == ids[3] and failed[0]["batch_id"] == batch_id, failed
    assert failed[0]["study_ids"] == sorted(ids) and failed[0]["task_id"], failed
    assert any(r["message"].startswith("cxr worker process ready") for r in records)
    assert "Traceback" not in worker_log
