"""/metrics on the web: the names an operator scrapes, latency labelled by URL rule, counters that move."""

from __future__ import annotations

from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from ops.metrics import sample_value
from store.db import session_scope
from store.models_registry import register_model_version
from tests.web.conftest import png_bytes
from tests.web.test_api import _files, _token


def _scrape(app: Flask) -> dict[str, list]:
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(resp.get_data(as_text=True))}


def test_metrics_names_labels_and_moving_values(app: Flask, users: dict[str, int], sent: list) -> None:
    """An upload moves received{queued,rejected}; latency by rule; queue depth and serving model at scrape."""
    queued0 = sample_value("cxr_studies_received_total", {"outcome": "queued"})
    rejected0 = sample_value("cxr_studies_received_total", {"outcome": "rejected"})
    client, auth = app.test_client(), _token(app, "bob")
    resp = client.post(
        "/api/v1/batches",
        data={"name": "m", "start": "true", "files": _files(("x.png", png_bytes()), ("y.txt", b"hello"))},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201
    batch_id = resp.get_json()["id"]
    assert client.get(f"/api/v1/batches/{batch_id}", headers=auth).status_code == 200
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        register_model_version(s, version="metrics-v1", artifact_path="/nowhere", artifact_sha256="0" * 64)

    families = _scrape(app)
    assert sample_value("cxr_studies_received_total", {"outcome": "queued"}) - queued0 == 1
    assert sample_value("cxr_studies_received_total", {"outcome": "rejected"}) - rejected0 == 1
    for name in ("cxr_studies_received", "cxr_studies_done", "cxr_studies_failed", "cxr_stage_seconds"):
        assert name in families, sorted(families)
    depths = {s.labels["queue"]: s.value for s in families["cxr_queue_depth"]}
    assert set(depths) == {"inference", "explain", "training"}
    assert [s.labels["version"] for s in families["cxr_serving_model_info"]] == ["metrics-v1"]
    endpoints = {s.labels["endpoint"] for s in families["cxr_http_request_seconds"]}
    assert "/api/v1/batches/<int:batch_id>" in endpoints, endpoints
    assert f"/api/v1/batches/{batch_id}" not in endpoints, "raw paths must not become labels"


def test_metrics_survive_a_dead_broker(app: Flask) -> None:
    """A broker that cannot be reached leaves the queue gauge empty; the scrape still answers."""
    settings = app.extensions["cxr_settings"]
    dead = settings.with_overrides(broker_url="redis://127.0.0.1:1/0")
    app.extensions["cxr_settings"] = dead
    app.extensions.pop("cxr_celery", None)
    families = _scrape(app)
    assert families["cxr_queue_depth"] == []
