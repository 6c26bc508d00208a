"""Rate limits (issue 13, point 1): sign-in back-off per name and per address, upload and API limits, 429s
with Retry-After, and counters shared by every web process through Redis."""

from __future__ import annotations

import http.cookiejar
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from store.db import session_scope
from store.tables import User
from store.users import issue_api_token
from tests.conftest import make_user
from tests.procs import free_port, service_env, start_web, stop
from tests.web.conftest import PASSWORD, png_bytes, upload
from web import create_app
from web.ratelimit import Backoff

MakeApp = Callable[..., Flask]


@pytest.fixture
def make_app(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeApp:
    """create_app on one migrated SQLite database with alice and bob, CSRF off, settings overridden."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_ENV", "test")
    monkeypatch.setattr("worker.app.send_screen_chunks", lambda ids: None)
    make_user(sqlite_url, "alice")
    make_user(sqlite_url, "bob")

    def _make(**overrides: object) -> Flask:
        config = {"DATABASE_URL": sqlite_url, "TESTING": True, "WTF_CSRF_ENABLED": False}
        return create_app({**config, **{k.upper(): v for k, v in overrides.items()}})

    return _make


def _client(app: Flask, address: str = "192.0.2.10") -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def _login(client: FlaskClient, username: str, password: str):  # noqa: ANN202
    return client.post("/login", data={"username": username, "password": password})


def _flash(resp) -> str:  # noqa: ANN001
    found = re.search(r'<p class="flash error" role="status">([^<]*)</p>', resp.get_data(as_text=True))
    return found.group(1) if found else ""


@pytest.mark.hardening("200 wrong passwords: 429 with Retry-After, right password after the wait works")
def test_many_wrong_passwords_are_slowed_then_the_right_one_works(make_app: MakeApp) -> None:
    """The abuse run's 200 wrong passwords in a row: after the free failures every try is a 429 with
    Retry-After (the right password too, so the wait reveals nothing); once the wait is over it signs in."""
    free = 3
    app = make_app(login_account_failures=free, login_backoff_s=1, login_backoff_max_s=1)
    client = _client(app)
    statuses = []
    started = time.monotonic()
    for _ in range(200):
        resp = _login(client, "alice", "wrong password")
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            assert "Too many failed sign-ins" in _flash(resp)
    elapsed = time.monotonic() - started
    assert set(statuses) == {401, 429}
    assert statuses[:free] == [401] * free and statuses[free + 1] == 429
    # One counted failure per wait (1 s here) once the free ones are spent: the rest never reach a hash.
    assert statuses.count(401) <= free + 1 + elapsed / 1 + 1, (statuses.count(401), elapsed)
    locked = _login(client, "alice", PASSWORD)
    assert locked.status_code == 429, "the right password is refused alike during the wait"
    time.sleep(int(locked.headers["Retry-After"]) + 0.2)
    assert _login(client, "alice", PASSWORD).status_code == 302


@pytest.mark.hardening("unknown and known user names get the same answers")
def test_unknown_and_known_names_get_the_same_answers(make_app: MakeApp) -> None:
    """Known name with a wrong password and unknown name: the same statuses, messages and waits, in order."""
    app = make_app(login_account_failures=2, login_backoff_s=60, login_backoff_max_s=600)
    answers = {}
    for name, address in (("alice", "192.0.2.1"), ("nobody-here", "192.0.2.2")):
        client = _client(app, address)
        seen = []
        for _ in range(6):
            resp = _login(client, name, "wrong password")
            seen.append((resp.status_code, resp.headers.get("Retry-After"), _flash(resp)))
        answers[name] = seen
    assert answers["alice"] == answers["nobody-here"]
    assert [s for s, _, _ in answers["alice"]] == [401, 401, 401, 429, 429, 429]
    assert answers["alice"][2][2].endswith("Wait 60 s before the next try.")


@pytest.mark.hardening("an address guessing many accounts is slowed; a success does not reset it")
def test_an_address_guessing_many_names_is_slowed(make_app: MakeApp) -> None:
    """Failures for many names from one address add up; bob signing in from it does not clear them, and the
    next failure there waits twice as long."""
    app = make_app(
        login_account_failures=100, login_address_failures=3, login_backoff_s=1, login_backoff_max_s=8
    )
    attacker = _client(app, "198.51.100.7")
    assert [_login(attacker, f"user{i}", "guess").status_code for i in range(4)] == [401] * 4
    refused = _login(attacker, "fresh-name", "guess")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    elsewhere = _client(app, "198.51.100.8")
    assert _login(elsewhere, "fresh-name", "guess").status_code == 401, "other addresses are not slowed"
    time.sleep(1.2)
    assert _login(attacker, "bob", PASSWORD).status_code == 302
    attacker = _client(app, "198.51.100.7")  # signed out again
    assert _login(attacker, "user9", "guess").status_code == 401
    again = _login(attacker, "user10", "guess")
    assert again.status_code == 429 and again.headers["Retry-After"] == "2"


def test_backoff_doubles_up_to_its_ceiling() -> None:
    """free failures cost nothing; then 1, 2, 4 ... seconds, never more than the ceiling."""
    policy = Backoff(free=2, base_s=1, max_s=5, window_s=60)
    assert [policy.wait_after(n) for n in range(1, 8)] == [0, 0, 1, 2, 4, 5, 5]
    assert policy.wait_after(10**9) == 5


def _token(app: Flask, username: str) -> str:
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        user = s.query(User).filter(User.username == username).one()
        return issue_api_token(s, user=user)


@pytest.mark.hardening("upload and API limits per user: 429 with Retry-After; health and polling free")
def test_upload_and_api_limits_per_user(make_app: MakeApp) -> None:
    """Uploads (web and API together) and API calls are counted per user; the refusal is a 429 with
    Retry-After, a page for the browser and JSON for the API; health, metrics and polling are not limited."""
    app = make_app(ratelimit_upload="2/minute", ratelimit_api="5/minute")
    alice = _client(app)
    _login(alice, "alice", PASSWORD)
    assert upload(alice, [("a.png", png_bytes())]).status_code == 302
    headers = {"Authorization": f"Bearer {_token(app, 'alice')}"}
    api = _client(app)
    made = api.post("/api/v1/batches", headers=headers, json={"name": "by api"})
    assert made.status_code == 201
    page = upload(alice, [("b.png", png_bytes())])
    assert page.status_code == 429 and int(page.headers["Retry-After"]) >= 1
    assert "Too many requests" in page.get_data(as_text=True) and page.mimetype == "text/html"
    refused = api.post(f"/api/v1/batches/{made.json['id']}/files", headers=headers, data={})
    assert refused.status_code == 429 and refused.is_json and refused.json["retry_after"] >= 1
    # API budget: 5 calls per minute for alice, one of them spent on the create above
    statuses = [api.get("/api/v1/batches", headers=headers).status_code for _ in range(8)]
    assert statuses[0] == 200 and 1 + statuses.count(200) <= 5, statuses
    assert statuses[statuses.index(429) :] == [429] * (8 - statuses.index(429)), statuses
    last = api.get("/api/v1/batches", headers=headers)
    assert last.json["error"].startswith("Too many requests") and int(last.headers["Retry-After"]) >= 1
    bob_headers = {"Authorization": f"Bearer {_token(app, 'bob')}"}
    assert api.get("/api/v1/batches", headers=bob_headers).status_code == 200, "per user"
    bob = _client(app, "192.0.2.99")
    _login(bob, "bob", PASSWORD)
    assert upload(bob, [("c.png", png_bytes())]).status_code == 302, "per user"
    for path in ("/healthz", "/metrics", "/batches/progress.json?ids=1"):
        assert {alice.get(path).status_code for _ in range(30)} == {200}, path


@pytest.mark.hardening("rate-limit storage unreachable: each process counts alone, no 500")
def test_an_unreachable_storage_counts_in_the_process(make_app: MakeApp) -> None:
    """With the shared storage down (nothing listens on its port), sign-ins are still slowed, counted in the
    process, and the API still answers: an outage of Redis is not an outage of the site."""
    app = make_app(ratelimit_storage_url=f"redis://127.0.0.1:{free_port()}/0", login_account_failures=2)
    client = _client(app)
    assert [_login(client, "alice", "wrong").status_code for _ in range(4)] == [401, 401, 401, 429]
    headers = {"Authorization": f"Bearer {_token(app, 'bob')}"}
    assert app.test_client().get("/api/v1/batches", headers=headers).status_code == 200


def _form_login(base: str, username: str, password: str) -> tuple[int, str | None]:
    """Sign in to a real web process as a browser would (CSRF token from the form); (status, Retry-After)."""
    jar = http.cookiejar.CookieJar()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)
    form = opener.open(f"{base}/login", timeout=10).read().decode()
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', form).group(1)
    body = urllib.parse.urlencode({"csrf_token": csrf, "username": username, "password": password}).encode()
    try:
        resp = opener.open(f"{base}/login", data=body, timeout=10)
        return resp.status, resp.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


@pytest.mark.services
@pytest.mark.hardening("two web processes share the sign-in counters through Redis")
def test_two_web_processes_share_counters_through_redis(
    make_app: MakeApp, sqlite_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Failures counted by one web app are seen by a second web process on the same Redis (a throwaway db
    number): the second process refuses the next try with 429 and Retry-After."""
    limits = {
        "ratelimit_storage_url": redis_url,
        "login_account_failures": 2,
        "login_backoff_s": 60,
        "login_backoff_max_s": 60,
    }
    data_dir = tmp_path / "web-b"
    data_dir.mkdir()
    env = service_env(data_dir, database_url=sqlite_url, **limits)
    web, base = start_web(env)
    try:
        app = make_app(**limits)
        client = _client(app)
        assert [_login(client, "alice", "wrong").status_code for _ in range(2)] == [401, 401]
        # the third failure, counted by the other process, starts the wait ...
        assert _form_login(base, "alice", "wrong")[0] == 401
        # ... that both see
        here = _login(client, "alice", PASSWORD)
        assert here.status_code == 429 and 55 <= int(here.headers["Retry-After"]) <= 60
        status, retry = _form_login(base, "alice", PASSWORD)
        assert status == 429 and retry is not None and 55 <= int(retry) <= 60
    finally:
        stop(web)
