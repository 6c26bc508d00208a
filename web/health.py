"""/healthz (the process answers) and /readyz (it can do its job); `cxr status` prints the same checks.

No sign-in: orchestrators and load balancers call these. /readyz says which dependency failed and why, never
a password (URLs are not printed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, current_app, jsonify
from werkzeug.wrappers import Response

from config import PROJECT_ROOT, Settings
from store.health import check_database, check_migrations, check_serving_model
from store.model_files import cache_root
from worker.app import CxrCelery, broker_ping, make_celery

bp = Blueprint("health", __name__)

# model.serve.DEFAULT_ARTIFACT_DIR, spelled out: the web never imports model/ (a test keeps the two equal).
DEFAULT_ARTIFACT_DIR = PROJECT_ROOT / "model" / "artifacts" / "default"


@dataclass(frozen=True)
class Check:
    """One readiness check's outcome."""

    name: str
    ok: bool
    detail: str


def readiness(settings: Settings, celery_app: CxrCelery, *, model_files_here: bool = True) -> list[Check]:
    """Database, migrations, broker and serving model, in that order (a dead database skips the two after).

    `model_files_here=False` (the web's /readyz and ops page): a serving version whose files live only on
    the worker hosts is not a reason to take the web out of service; `cxr status` checks the files.
    """
    checks = [Check("database", *check_database(settings.database_url))]
    if checks[0].ok:
        checks.append(Check("migrations", *check_migrations(settings.database_url)))
    else:
        checks.append(Check("migrations", False, "not checked: the database is unreachable"))
    checks.append(Check("broker", *broker_ping(celery_app)))
    fallback = Path(settings.model_dir or DEFAULT_ARTIFACT_DIR)
    if checks[1].ok:
        checks.append(
            Check(
                "model",
                *check_serving_model(
                    settings.database_url,
                    fallback=fallback,
                    files_here=model_files_here,
                    cache_dir=cache_root(settings.data_dir),
                ),
            )
        )
    else:
        checks.append(Check("model", False, "not checked: the database is not reachable or not migrated"))
    return checks


def celery_for(settings: Settings) -> CxrCelery:
    """The Celery app of this web app's settings, built once per web app (no connection until used)."""
    apps = current_app.extensions.setdefault("cxr_celery", {})
    if "app" not in apps:
        apps["app"] = make_celery(settings, set_as_current=False)
    return apps["app"]


@bp.route("/healthz")
def healthz() -> Response:
    """Alive: the process serves requests (checks nothing else, so a restart never waits on the database)."""
    return jsonify({"status": "ok"})


@bp.route("/readyz")
def readyz() -> tuple[Response, int]:
    """Ready: database reachable and migrated, broker reachable, serving model readable; 503 otherwise."""
    settings: Settings = current_app.extensions["cxr_settings"]
    checks = readiness(settings, celery_for(settings), model_files_here=False)
    ready = all(c.ok for c in checks)
    body = {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
    return jsonify(body), 200 if ready else 503
