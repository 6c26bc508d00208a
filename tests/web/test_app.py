"""App factory, configuration, sign in/out, CSRF, ownership and security headers."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from store.db import session_scope
from store.studies import create_batch
from store.tables import User
from tests.conftest import make_user
from tests.web.conftest import PASSWORD, png_bytes, sign_in, upload
from web import create_app


def test_factory_reads_settings_and_overrides(app: Flask, db_url: str) -> None:
    settings = app.extensions["cxr_settings"]
    assert settings.database_url == db_url
    assert app.config["SECRET_KEY"] == settings.secret_key and len(app.config["SECRET_KEY"]) > 30
    assert app.config["MAX_CONTENT_LENGTH"] == settings.max_upload_bytes
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    assert app.config["SESSION_COOKIE_SECURE"] is False  # not production


def test_production_cookies_are_secure(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_ENV", "production")
    monkeypatch.setenv("CXR_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CXR_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("CXR_SECRET_KEY", "s" * 40)
    monkeypatch.setenv("CXR_DEID_KEY", "d" * 40)
    monkeypatch.setenv("CXR_MAX_UPLOAD_BYTES", "12345")
    app = create_app()
    assert app.config["SESSION_COOKIE_SECURE"] is True
    assert app.config["REMEMBER_COOKIE_SECURE"] is True
    assert app.config["SECRET_KEY"] == "s" * 40
    assert app.config["MAX_CONTENT_LENGTH"] == 12345


def test_sign_in_and_out(app: Flask, users: dict[str, int]) -> None:
    client = app.test_client()
    assert client.get("/").status_code == 302  # redirected to the sign-in page
    bad = client.post("/login", data={"username": "alice", "password": "wrong password!"})
    assert bad.status_code == 401 and "Wrong username or password" in bad.get_data(as_text=True)
    sign_in(client, "alice")
    page = client.get("/")
    assert page.status_code == 200 and "alice" in page.get_data(as_text=True)
    assert client.post("/logout").status_code == 302
    assert client.get("/").status_code == 302


def test_login_redirect_only_to_this_site(app: Flask, users: dict[str, int]) -> None:
    client = app.test_client()
    resp = client.post("/login?next=https://evil.example/", data={"username": "alice", "password": PASSWORD})
    assert resp.headers["Location"] == "/"
    client.post("/logout")
    resp = client.post("/login?next=/batches/new", data={"username": "alice", "password": PASSWORD})
    assert resp.headers["Location"] == "/batches/new"


def test_csrf_is_enforced_on_forms(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    app = create_app({"DATABASE_URL": sqlite_url, "TESTING": True, "WTF_CSRF_ENABLED": True})
    make_user(sqlite_url, "carol")
    client = app.test_client()
    # No token: refused.
    resp = client.post("/login", data={"username": "carol", "password": PASSWORD})
    assert resp.status_code == 400
    # With the token from the form: accepted.
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    resp = client.post("/login", data={"username": "carol", "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302
    # Upload and sign-out forms are protected too.
    assert client.post("/batches/new", data={"name": "x"}).status_code == 400
    assert client.post("/logout").status_code == 400
    assert client.get("/").status_code == 200  # still signed in


def test_ownership_404_and_admin_sees_all(
    app: Flask, login: Callable[[str], FlaskClient], sent: list
) -> None:
    alice = login("alice")
    upload(alice, [("a.png", png_bytes())], name="alice batch")
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        batch_id = create_batch(s, owner=s.query(User).filter_by(username="alice").one(), name="other").id
    bob = login("bob")
    for url in (
        f"/batches/{batch_id}",
        f"/batches/{batch_id}/report.csv",
        f"/batches/{batch_id}/report.json",
        f"/batches/{batch_id}/progress.json",
        "/studies/1/thumbnail.png",
    ):
        assert bob.get(url).status_code == 404, url
        assert alice.get(url).status_code == 200, url
    assert "alice batch" not in bob.get("/").get_data(as_text=True)
    assert bob.get(f"/batches/progress.json?ids={batch_id}").get_json() == {}
    root = login("root")
    assert "alice batch" in root.get("/").get_data(as_text=True)
    assert root.get(f"/batches/{batch_id}").status_code == 200
    assert bob.get("/admin/users").status_code == 403


def test_security_headers_and_notice(login: Callable[[str], FlaskClient]) -> None:
    resp = login("alice").get("/")
    assert "script-src" not in resp.headers["Content-Security-Policy"]  # default-src 'self' covers scripts
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "not a medical device" in resp.get_data(as_text=True)


def test_admin_creates_account_and_issues_token(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    root = login("root")
    resp = root.post("/admin/users", data={"username": "dave", "password": "short", "role": "reviewer"})
    assert resp.status_code == 400
    resp = root.post(
        "/admin/users", data={"username": "dave", "password": "long enough pw", "role": "reviewer"}
    )
    assert resp.status_code == 302
    page = root.get("/admin/users").get_data(as_text=True)
    assert "dave" in page and "reviewer" in page
    dup = root.post("/admin/users", data={"username": "dave", "password": "long enough pw", "role": "user"})
    assert dup.status_code == 400 and "already exists" in dup.get_data(as_text=True)
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        dave_id = s.query(User).filter_by(username="dave").one().id
    page = root.post(f"/admin/users/{dave_id}/token").get_data(as_text=True)
    token = re.search(r'<code id="api-token">(cxr_[^<]+)</code>', page).group(1)
    api = app.test_client().get("/api/v1/batches", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 200
    sign_in(app.test_client(), "dave", "long enough pw")


def test_upload_too_large_is_a_readable_413(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    make_user(sqlite_url, "alice")
    app = create_app({"DATABASE_URL": sqlite_url, "WTF_CSRF_ENABLED": False, "MAX_UPLOAD_BYTES": 10_000})
    client = app.test_client()
    sign_in(client, "alice")
    resp = upload(client, [("big.png", png_bytes(200, 200))])
    assert resp.status_code == 413
    assert "limit" in resp.get_data(as_text=True)


def test_user_issues_own_api_token(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    alice = login("alice")
    assert "Issue my API token" in alice.get("/account").get_data(as_text=True)
    page = alice.post("/account").get_data(as_text=True)
    token = re.search(r'<code id="api-token">(cxr_[^<]+)</code>', page).group(1)
    resp = app.test_client().get("/api/v1/batches", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200 and resp.get_json()["batches"] == []
