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


def test_admin_ops_page_shows_rate_failures_and_queues(app: Flask, users: dict[str, int]) -> None:
    """5 studies DONE a moment ago and 1 FAILED: 5.0/min over 1 min, 1.0 over 5, the failure's reason."""
    from sqlalchemy import update

    from store.tables import Study, StudyStatus, utcnow
    from tests.web.conftest import sign_in
    from tests.worker.conftest import seed

    url = app.extensions["cxr_settings"].database_url
    s = seed(url, [png_bytes(seed=i) for i in range(6)])
    with session_scope(url) as session:
        now = utcnow()
        session.execute(
            update(Study)
            .where(Study.id.in_(s.study_ids[:5]))
            .values(status=StudyStatus.DONE, finished_at=now)
        )
        session.execute(
            update(Study)
            .where(Study.id == s.study_ids[5])
            .values(status=StudyStatus.FAILED, finished_at=now, error="image could not be decoded")
        )
    client = app.test_client()
    sign_in(client, "alice")
    assert client.get("/admin/ops").status_code in (302, 403)
    client = app.test_client()
    sign_in(client, "root")
    page = client.get("/admin/ops")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "last 1 min</td><td>5.0" in html and "last 5 min</td><td>1.0" in html, html
    assert "Failures in the last hour: 1" in html and "image could not be decoded" in html
    assert "<td>inference</td><td>0</td>" in html and "<td>database</td><td>ok</td>" in html
