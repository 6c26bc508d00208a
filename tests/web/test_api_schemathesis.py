"""schemathesis over /api/openapi.json (issue 13, point 8): every operation of the JSON API, with generated
(valid and invalid) parameters and bodies, signed in with an API token, answers without a server error.

Through the app's WSGI interface (no server), on a migrated SQLite database holding one batch with one study,
so that half of the generated path ids name things that exist. Bounded: a fixed number of examples per
operation, derandomized (the same cases every run).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from store import migrate
from store.db import dispose_all, session_scope
from store.tables import Role, User
from store.users import issue_api_token
from tests.conftest import make_user
from tests.web.conftest import PASSWORD, png_bytes
from web import create_app

EXAMPLES = 40  # per operation


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Flask, str, dict[str, int]]]:
    """(app, token, existing ids): a reviewer with a token, one batch holding one study; nothing is queued."""
    root: Path = tmp_path_factory.mktemp("schemathesis")
    url = f"sqlite:///{root / 'api.sqlite3'}"
    migrate.upgrade(url)
    make_user(url, "fuzzer", role=Role.REVIEWER)
    with session_scope(url) as s:
        token = issue_api_token(s, user=s.query(User).filter(User.username == "fuzzer").one())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_DATA_DIR", str(root / "var"))
        mp.setenv("CXR_ENV", "test")
        mp.setattr("worker.app.send_screen_chunks", lambda ids: None)
        app = create_app(
            {
                "DATABASE_URL": url,
                "TESTING": True,
                "WTF_CSRF_ENABLED": False,
                # the limits are tested in test_ratelimit.py; here every generated case must reach its view
                "RATELIMIT_API": "100000/minute",
                "RATELIMIT_UPLOAD": "100000/minute",
            }
        )
        resp = app.test_client().post(
            "/api/v1/batches",
            headers={"Authorization": f"Bearer {token}"},
            data={"name": "seed", "files": [(io.BytesIO(png_bytes(128, 128)), "seed.png")]},
            content_type="multipart/form-data",
        )
        assert resp.status_code == 201, resp.get_data(as_text=True)
        ids = {"batch_id": resp.json["id"], "study_id": resp.json["study_ids"][0]}
        yield app, token, ids
    dispose_all()


@pytest.mark.hardening("schemathesis over the OpenAPI document: no 5xx on any operation")
def test_no_operation_answers_with_a_server_error(api_app: tuple[Flask, str, dict[str, int]]) -> None:
    """Generated requests (valid and invalid) to every operation get a 2xx, 3xx or 4xx, never a 5xx."""
    app, token, ids = api_app
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {f"{m} {path}" for path, m in api_routes(app)}
    calls: dict[str, int] = {}
    for operation in operations:
        _exerciser(operation, token, ids, calls)()
    assert set(calls) == {op.label for op in operations}, calls


def _exerciser(operation, token: str, ids: dict[str, int], calls: dict[str, int]):  # noqa: ANN001, ANN202
    """A bounded hypothesis run over one operation's generated cases; counts the calls made."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def exercise(case) -> None:  # noqa: ANN001
        # Half the cases name the batch and study that exist (random ids would nearly always be 404s).
        if case.path_parameters and random.Random(repr(case.query) + repr(case.body)).random() < 0.5:
            case.path_parameters = {k: ids.get(k, v) for k, v in case.path_parameters.items()}
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error])
        calls[operation.label] = calls.get(operation.label, 0) + 1

    return exercise


def api_routes(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI-style path, method) of every /api/v1 route of the app."""
    return {
        (rule.rule.replace("<int:", "{").replace(">", "}"), method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }


def test_the_schema_lists_every_api_route(api_app: tuple[Flask, str, dict[str, int]]) -> None:
    """schemathesis exercises every /api/v1 route: the OpenAPI document leaves none out."""
    app = api_app[0]
    doc = app.test_client().get("/api/openapi.json").json
    verbs = {"get", "post", "put", "patch", "delete"}
    documented = {(path, m.upper()) for path, ops in doc["paths"].items() for m in ops if m in verbs}
    assert api_routes(app) == documented


def test_found_by_schemathesis_ids_and_pages_past_what_sql_holds(
    api_app: tuple[Flask, str, dict[str, int]],
) -> None:
    """Found by schemathesis: an id past 2**63 - 1 in a path, or a page number that large, reached SQL and
    overflowed (a 500); now the route does not match (404), the page is refused (400), and the dashboard's
    ?ids= ignores what is not an id (a superscript digit used to raise too)."""
    app, token, ids = api_app
    api = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    too_big = 2**63
    assert api.get(f"/api/v1/batches/{too_big}", headers=headers).status_code == 404
    assert api.post(f"/api/v1/batches/{too_big}/files", headers=headers, json={}).status_code == 404
    results = api.get(f"/api/v1/batches/{ids['batch_id']}/results?page={10**20}", headers=headers)
    assert results.status_code == 400 and "page" in results.json["fields"]
    browser = app.test_client()
    assert browser.post("/login", data={"username": "fuzzer", "password": PASSWORD}).status_code == 302
    polled = browser.get(f"/batches/progress.json?ids={ids['batch_id']},\u00b2,{too_big}")
    assert polled.status_code == 200 and list(polled.json) == [str(ids["batch_id"])]
    assert browser.get(f"/batches/{too_big}/progress.json").status_code == 404
