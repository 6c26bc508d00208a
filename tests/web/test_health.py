"""/healthz, /readyz and `cxr status`: ready on a migrated database, and a clear reason for each failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask

from store import migrate
from web import create_app

DEAD_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # port 1: connection refused at once


def _app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object) -> Flask:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_ENV", "test")
    return create_app({"TESTING": True, **overrides})


def _ready(app: Flask) -> tuple[int, dict]:
    resp = app.test_client().get("/readyz")
    return resp.status_code, resp.get_json()


def test_healthz_answers_without_touching_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alive even when the database is gone: a restart would not help."""
    app = _app(tmp_path, monkeypatch, DATABASE_URL=DEAD_PG)
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_ready_on_a_migrated_database(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite and PostgreSQL, migrated, with the embedded broker and the committed model: 200, all ok."""
    code, body = _ready(_app(tmp_path, monkeypatch, DATABASE_URL=db_url))
    assert code == 200, body
    assert body["ready"] is True
    assert set(body["checks"]) == {"database", "migrations", "broker", "model"}
    assert all(c["ok"] for c in body["checks"].values()), body


def test_readyz_names_an_unreachable_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """503 with the database check failed and why; the checks that need it are not run."""
    code, body = _ready(_app(tmp_path, monkeypatch, DATABASE_URL=DEAD_PG))
    assert code == 503 and body["ready"] is False
    db = body["checks"]["database"]
    assert not db["ok"] and "database unreachable" in db["detail"] and "refused" in db["detail"], db
    assert not body["checks"]["migrations"]["ok"]
    assert body["checks"]["broker"]["ok"], "the broker is independent of the database"


def test_readyz_says_migrations_are_behind(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One revision down: 503, 'migrations behind' with both revisions and the command that fixes it."""
    migrate.downgrade(db_url, "-1")
    code, body = _ready(_app(tmp_path, monkeypatch, DATABASE_URL=db_url))
    mig = body["checks"]["migrations"]
    assert code == 503 and not mig["ok"], body
    assert "migrations behind" in mig["detail"] and "cxr db upgrade" in mig["detail"], mig
    migrate.upgrade(db_url)
    assert _ready(_app(tmp_path, monkeypatch, DATABASE_URL=db_url))[0] == 200


def test_readyz_names_a_dead_broker_and_a_missing_model(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused broker port and an empty model folder each fail their own check."""
    empty = tmp_path / "no-model"
    empty.mkdir()
    app = _app(
        tmp_path, monkeypatch, DATABASE_URL=sqlite_url, BROKER_URL="redis://127.0.0.1:1/0", MODEL_DIR=empty
    )
    code, body = _ready(app)
    assert code == 503
    assert not body["checks"]["broker"]["ok"] and "broker unreachable" in body["checks"]["broker"]["detail"]
    assert not body["checks"]["model"]["ok"] and "not readable" in body["checks"]["model"]["detail"]
    assert body["checks"]["database"]["ok"] and body["checks"]["migrations"]["ok"]


def test_default_artifact_dir_matches_the_model_package() -> None:
    """web.health spells out model.serve's default artifact folder (the web never imports model/)."""
    from model.serve import DEFAULT_ARTIFACT_DIR
    from web.health import DEFAULT_ARTIFACT_DIR as WEB_DEFAULT

    assert WEB_DEFAULT.resolve() == DEFAULT_ARTIFACT_DIR.resolve()


def test_cxr_status_exit_code(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cxr status` prints every check and exits 0 when ready, 1 (naming the failure) when not."""
    from cli.main import main

    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_ENV", "test")
    monkeypatch.setenv("CXR_DATABASE_URL", sqlite_url)
    ok = CliRunner().invoke(main, ["status"])
    assert ok.exit_code == 0, ok.output
    assert "ready" in ok.output and "migrations" in ok.output and "inference=0" in ok.output

    monkeypatch.setenv("CXR_DATABASE_URL", DEAD_PG)
    bad = CliRunner().invoke(main, ["status"])
    assert bad.exit_code == 1, bad.output
    assert "FAIL database" in bad.output and "NOT READY" in bad.output


def test_model_files_on_worker_hosts_only_keep_the_web_ready(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving version whose folder is on the worker hosts only: the web (which never loads the model) is
    ready and says so; the strict check (`cxr status`, run on a worker host) still fails it."""
    from store.db import session_scope
    from store.health import check_serving_model
    from store.models_registry import register_model_version

    elsewhere = tmp_path / "on-a-worker-host" / "model"
    with session_scope(sqlite_url) as s:
        register_model_version(s, version="v-remote", artifact_path=str(elsewhere), artifact_sha256="0" * 64)
        s.commit()
    code, body = _ready(_app(tmp_path, monkeypatch, DATABASE_URL=sqlite_url, BROKER_URL="filesystem://"))
    model = body["checks"]["model"]
    assert model["ok"] and "v-remote serves" in model["detail"] and "worker hosts" in model["detail"], body
    ok, detail = check_serving_model(sqlite_url, fallback=tmp_path / "none")
    assert not ok and "not readable" in detail
    # a folder that is on this host must be readable, even for the web
    elsewhere.mkdir(parents=True)
    code, body = _ready(_app(tmp_path, monkeypatch, DATABASE_URL=sqlite_url, BROKER_URL="filesystem://"))
    assert code == 503 and not body["checks"]["model"]["ok"], body
