"""Model registry page: versions, metrics, cards, promotions (admins only, audited), CSRF on every action."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from store.db import session_scope
from store.models_registry import serving_version
from store.tables import AuditEvent, Role
from tests.conftest import make_user
from tests.web.conftest import PASSWORD
from tests.web.test_review import add_model, url_of
from web import create_app

METRICS = {
    "locked_test": {"n": 120, "macro_f1": 0.81234, "covid_sensitivity": 0.9, "ece": 0.0412},
    "validation": {"accuracy": 0.8, "macro_f1_ci": [0.7, 0.9]},
    "reviewed_images": 12,
}


def test_registry_page_and_promotion(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    url = url_of(app)
    make_user(url, "rita", Role.REVIEWER)
    v1 = add_model(url, "v1-base", serving=True, metrics={"test": {"macro_f1": 0.75}}, card="# v1")
    v2 = add_model(url, "v2-retrained", metrics=METRICS, card="# Card\n<script>alert(1)</script>")
    rita, alice, root = login("rita"), login("alice"), login("root")

    page = rita.get("/models").get_data(as_text=True)
    assert "v1-base" in page and "v2-retrained" in page and "not a medical device" in page
    assert (
        "locked_test.macro_f1" in page and "0.812" in page and "0.041" in page and "reviewed_images" in page
    )
    assert "[0.700, 0.900]" in page  # nested lists are shown, not dropped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert re.search(r'id="model-\d+" data-version="v1-base"', page)
    assert "Promote" not in page and "Retrain now" not in page  # reviewers look, admins act
    assert 'href="/models"' in page
    assert alice.get("/models").status_code == 403 and 'href="/models"' not in alice.get("/").get_data(
        as_text=True
    )
    assert rita.post(f"/models/{v2}/promote").status_code == 403
    assert alice.post(f"/models/{v2}/promote").status_code == 403

    admin_page = root.get("/models").get_data(as_text=True)
    assert admin_page.count(">Promote") == 1 and "Retrain now" in admin_page and "data-confirm" in admin_page
    assert root.post(f"/models/{v2}/promote").status_code == 302
    with session_scope(url) as s:
        assert serving_version(s).version == "v2-retrained"
    assert "now serves (was v1-base)" in root.get("/models").get_data(as_text=True)
    # Rollback is promoting the older version again; each promotion is audited with who did it.
    assert root.post(f"/models/{v1}/promote").status_code == 302
    assert root.post(f"/models/{v1}/promote").status_code == 302  # already serving: nothing changes
    assert root.post("/models/99999/promote").status_code == 404
    with session_scope(url) as s:
        assert serving_version(s).version == "v1-base"
        events = list(
            s.scalars(select(AuditEvent).where(AuditEvent.action == "model.promote").order_by(AuditEvent.id))
        )
        assert [(e.target, e.user_id is not None) for e in events] == [
            ("model:v1-base", False),
            ("model:v2-retrained", True),
            ("model:v1-base", True),
        ]
    page = rita.get("/models").get_data(as_text=True)
    history = page[page.index('id="promotions"') :]
    assert history.index("v1-base") < history.index("v2-retrained")  # newest first
    assert history.count("root") == 2 and "system" in history


def test_new_forms_require_csrf(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    calls: list[str] = []
    monkeypatch.setattr("worker.app.send_retrain", calls.append, raising=False)
    app = create_app({"DATABASE_URL": sqlite_url, "TESTING": True, "WTF_CSRF_ENABLED": True})
    make_user(sqlite_url, "root", Role.ADMIN)
    v1 = add_model(sqlite_url, "v1")
    client = app.test_client()
    token = re.search(
        r'name="csrf_token" type="hidden" value="([^"]+)"', client.get("/login").get_data(as_text=True)
    )
    resp = client.post(
        "/login", data={"username": "root", "password": PASSWORD, "csrf_token": token.group(1)}
    )
    assert resp.status_code == 302
    for path in (f"/models/{v1}/promote", "/models/retrain", "/studies/1/review", "/batches/1/rescreen"):
        assert client.post(path, data={"label": "covid"}).status_code == 400, path
    assert calls == []
    # The page's own token works.
    page = client.get("/models").get_data(as_text=True)
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert client.post(f"/models/{v1}/promote", data={"csrf_token": form_token}).status_code == 302
    assert client.post("/models/retrain", data={"csrf_token": form_token}).status_code == 302
    assert calls == ["admin"]
