"""The JSON API with per-user bearer tokens: create, upload, start, poll, results; ownership; no CSRF."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select

from store.db import session_scope
from store.tables import Study, StudyStatus, User
from store.users import issue_api_token
from tests.web.conftest import corrupt_png, png_bytes
from web import create_app
from web.reports import NOTICE


def _token(app: Flask, username: str) -> dict[str, str]:
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        user = s.scalar(select(User).where(User.username == username))
        return {"Authorization": f"Bearer {issue_api_token(s, user=user)}"}


def _files(*pairs: tuple[str, bytes]) -> list[tuple[io.BytesIO, str]]:
    return [(io.BytesIO(b), n) for n, b in pairs]


def test_api_flow(app: Flask, users: dict[str, int], sent: list[list[int]]) -> None:
    client, auth = app.test_client(), _token(app, "alice")
    created = client.post("/api/v1/batches", json={"name": "api batch", "notes": "n"}, headers=auth)
    assert created.status_code == 201
    batch_id = created.get_json()["id"]
    up = client.post(
        f"/api/v1/batches/{batch_id}/files",
        data={
            "files": _files(
                ("a.png", png_bytes(seed=1)), ("b.png", png_bytes(seed=2)), ("c.png", corrupt_png())
            )
        },
        headers=auth,
        content_type="multipart/form-data",
    )
    assert up.status_code == 201 and len(up.get_json()["study_ids"]) == 3
    assert sent == []  # uploaded, not started
    progress = client.get(f"/api/v1/batches/{batch_id}", headers=auth).get_json()
    assert progress["progress"]["total"] == 3 and progress["progress"]["failed"] == 1
    assert progress["notice"] == NOTICE
    started = client.post(f"/api/v1/batches/{batch_id}/start", headers=auth).get_json()
    assert len(started["queued"]) == 2 and sent == [started["queued"]]
    again = client.post(f"/api/v1/batches/{batch_id}/start", headers=auth).get_json()
    assert again["queued"] == [] and len(sent) == 1  # starting twice enqueues nothing new
    results = client.get(f"/api/v1/batches/{batch_id}/results", headers=auth).get_json()
    assert results["notice"] == NOTICE and len(results["studies"]) == 3
    assert {s["status"] for s in results["studies"]} == {"QUEUED", "FAILED"}
    listing = client.get("/api/v1/batches", headers=auth).get_json()
    assert [b["id"] for b in listing["batches"]] == [batch_id]


def test_api_upload_and_start_in_one_call(app: Flask, users: dict[str, int], sent: list[list[int]]) -> None:
    client, auth = app.test_client(), _token(app, "bob")
    resp = client.post(
        "/api/v1/batches",
        data={
            "name": "one shot",
            "start": "true",
            "files": _files(("x.png", png_bytes()), ("y.txt", b"hello")),
        },
        headers=auth,
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201
    body = resp.get_json()
    assert len(body["study_ids"]) == 2 and len(body["queued"]) == 1 and sent == [body["queued"]]
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        states = sorted(s.scalars(select(Study.status).where(Study.id.in_(body["study_ids"]))))
    assert states == [StudyStatus.FAILED, StudyStatus.QUEUED]


def test_api_auth_and_ownership(app: Flask, users: dict[str, int]) -> None:
    client = app.test_client()
    assert client.get("/api/v1/batches").status_code == 401
    bad = client.get("/api/v1/batches", headers={"Authorization": "Bearer cxr_nope"})
    assert bad.status_code == 401 and "WWW-Authenticate" in bad.headers
    alice, bob, root = (_token(app, u) for u in ("alice", "bob", "root"))
    batch_id = client.post("/api/v1/batches", json={"name": "mine"}, headers=alice).get_json()["id"]
    for method, url in (
        ("get", f"/api/v1/batches/{batch_id}"),
        ("get", f"/api/v1/batches/{batch_id}/results"),
        ("post", f"/api/v1/batches/{batch_id}/start"),
    ):
        resp = getattr(client, method)(url, headers=bob)
        assert resp.status_code == 404 and resp.get_json()["error"], url
        # An admin sees it (starting it is refused only because it is empty: 400, not 404).
        assert getattr(client, method)(url, headers=root).status_code == (400 if "start" in url else 200), url
    # The session cookie does not authenticate the API, and a token does not need a CSRF token.
    assert client.get("/api/v1/batches/999", headers=alice).status_code == 404


def test_api_ignores_csrf_but_forms_do_not(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    app = create_app({"DATABASE_URL": sqlite_url, "WTF_CSRF_ENABLED": True})
    from tests.conftest import make_user

    make_user(sqlite_url, "erin")
    resp = app.test_client().post("/api/v1/batches", json={"name": "x"}, headers=_token(app, "erin"))
    assert resp.status_code == 201


def test_api_upload_too_large_is_json_413(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    app = create_app({"DATABASE_URL": sqlite_url, "MAX_UPLOAD_BYTES": 10_000})
    from tests.conftest import make_user

    make_user(sqlite_url, "fay")
    resp = app.test_client().post(
        "/api/v1/batches",
        data={"name": "big", "start": "true", "files": _files(("big.png", png_bytes(200, 200)))},
        headers=_token(app, "fay"),
        content_type="multipart/form-data",
    )
    assert resp.status_code == 413 and "limit" in resp.get_json()["error"]


def test_api_create_without_start_is_audited(
    app: Flask, users: dict[str, int], sent: list[list[int]]
) -> None:
    """Creating a batch with files but without start records the same batch.upload event as the form does."""
    from store.tables import AuditEvent

    client, auth = app.test_client(), _token(app, "alice")
    resp = client.post(
        "/api/v1/batches",
        data={"name": "later", "files": _files(("a.png", png_bytes(seed=4)))},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert resp.status_code == 201 and resp.get_json()["queued"] == [] and sent == []
    batch_id = resp.get_json()["id"]
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        actions = set(s.scalars(select(AuditEvent.action).where(AuditEvent.target == f"batch:{batch_id}")))
    assert {"batch.create", "batch.upload"} <= actions


def test_openapi_document_and_schema_validation(app: Flask, users: dict[str, int]) -> None:
    """/api/openapi.json describes every API route; the schemas refuse a malformed request with a 4xx."""
    client = app.test_client()
    doc = client.get("/api/openapi.json")
    assert doc.status_code == 200 and doc.get_json()["openapi"].startswith("3.")
    paths = doc.get_json()["paths"]
    for path in (
        "/api/v1/batches",
        "/api/v1/batches/{batch_id}",
        "/api/v1/batches/{batch_id}/files",
        "/api/v1/batches/{batch_id}/start",
        "/api/v1/batches/{batch_id}/results",
        "/api/v1/studies/{study_id}/review",
    ):
        assert path in paths, sorted(paths)
    assert "requestBody" in paths["/api/v1/studies/{study_id}/review"]["post"]
    auth = _token(app, "alice")
    bad = client.post(
        "/api/v1/batches", json={"name": "x", "start": "maybe", "notes": ["not", "text"]}, headers=auth
    )
    assert 400 <= bad.status_code < 500
    body = bad.get_json()
    assert "start" in body["fields"] and "notes" in body["fields"] and "invalid request" in body["error"]
    too_long = client.post("/api/v1/batches", json={"name": "n" * 201}, headers=auth)
    assert too_long.status_code == 400 and "name" in too_long.get_json()["fields"]
