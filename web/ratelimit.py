"""Rate limits (issue 13): Flask-Limiter on storage shared by every web process, and sign-in back-off.

- Uploads (web form and API) and the JSON API are limited per user with Flask-Limiter (`upload_limit`,
  `api_limit`); a request without a signed-in user or a valid token is counted by its client address.
- Failed sign-ins are counted per submitted user name (known or not: the same work and the same answers) and
  per client address, in the limiter's storage (Redis in production, so every web process sees the same
  counts). After the free failures each further one doubles the wait (`LoginThrottle`). A successful sign-in
  forgets its account's failures, never its address's: an address guessing many accounts stays slowed.
- Every refusal is a 429 with Retry-After (web/__init__.py renders it as a page or as JSON).

/healthz, /readyz, /metrics and the dashboard's progress polling carry no limit (there is no default limit).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flask import current_app, g, request
from flask_login import current_user
from limits.storage import MemoryStorage, Storage

from config import Settings
from store.tables import User
from store.users import user_for_token
from web.db import get_db

log = logging.getLogger(__name__)

T = TypeVar("T")
UPLOAD_SCOPE = "upload"  # one bucket per user for the web form and the API uploads together
WARN_EVERY_S = 60  # while the shared storage is unreachable, say so this often


def _settings() -> Settings:
    return current_app.extensions["cxr_settings"]


def upload_limit() -> str:
    """CXR_RATELIMIT_UPLOAD of the current app."""
    return _settings().ratelimit_upload


def api_limit() -> str:
    """CXR_RATELIMIT_API of the current app."""
    return _settings().ratelimit_api


def client_address() -> str:
    """The client's address (behind CXR_PROXY_HOPS trusted proxies: the address they were sent from)."""
    return request.remote_addr or "unknown"


def bearer_user() -> User | None:
    """The active user of the request's bearer token (looked up once per request), or None."""
    if "cxr_bearer_user" not in g:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        g.cxr_bearer_user = user_for_token(get_db(), token.strip()) if scheme.lower() == "bearer" else None
    return g.cxr_bearer_user


def user_key() -> str:
    """Rate-limit key: the signed-in user or the token's user, else the client address."""
    if current_user.is_authenticated:
        return f"user:{current_user.id}"
    user = bearer_user()
    return f"user:{user.id}" if user is not None else f"address:{client_address()}"


@dataclass(frozen=True)
class Backoff:
    """free failures within window_s, then waits of base_s, 2*base_s, 4*base_s ... up to max_s."""

    free: int
    base_s: int
    max_s: int
    window_s: int

    def wait_after(self, failures: int) -> int:
        """Seconds to wait after this many failures in the window (0 while they are free)."""
        if failures <= self.free:
            return 0
        # 2 ** (failures - free - 1), without building a huge integer for a long-running attack
        doublings = min(failures - self.free - 1, 62)
        return min(self.max_s, self.base_s * 2**doublings)


class LoginThrottle:
    """Failed sign-ins per user name and per address, with doubling waits, kept in a limits Storage."""

    def __init__(self, storage: Storage, *, account: Backoff, address: Backoff) -> None:
        self.storage = storage
        self.policies = {"account": account, "address": address}
        self._fallback = MemoryStorage()
        self._warned_at = -math.inf

    @classmethod
    def from_settings(cls, storage: Storage, settings: Settings) -> LoginThrottle:
        """The throttle the CXR_LOGIN_* settings describe."""
        common = {
            "base_s": settings.login_backoff_s,
            "max_s": settings.login_backoff_max_s,
            "window_s": settings.login_window_s,
        }
        return cls(
            storage,
            account=Backoff(free=settings.login_account_failures, **common),
            address=Backoff(free=settings.login_address_failures, **common),
        )

    @staticmethod
    def _ids(username: str, address: str) -> dict[str, str]:
        # The name as authenticate() looks it up, hashed: any submitted text makes a short, safe key.
        name = hashlib.sha256(username.strip().encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return {"account": name, "address": address}

    def _shared(self, op: Callable[[Storage], T]) -> T:
        """op on the shared storage; while it is unreachable, count in this process rather than not at all."""
        try:
            return op(self.storage)
        except Exception:  # noqa: BLE001 - a Redis outage must not turn every sign-in into a 500
            now = time.monotonic()
            if now - self._warned_at > WARN_EVERY_S:  # once a minute, not once a request
                self._warned_at = now
                log.warning("rate-limit storage unreachable; counting sign-in failures in this process")
            return op(self._fallback)

    def wait_s(self, username: str, address: str) -> int:
        """Seconds before this name from this address may try again (0: now)."""
        now = time.time()
        wait = 0.0
        for kind, ident in self._ids(username, address).items():
            key = f"cxr/login-lock/{kind}/{ident}"
            if self._shared(lambda s, k=key: s.get(k)):
                wait = max(wait, self._shared(lambda s, k=key: s.get_expiry(k)) - now)
        # Redis keeps whole seconds: rounded, not ceiled, or a fresh 60 s wait would read 61.
        return max(1, round(wait)) if wait > 0 else 0

    def failed(self, username: str, address: str) -> int:
        """Count a failed sign-in; return the wait it starts (0 while failures are free)."""
        wait = 0
        for kind, ident in self._ids(username, address).items():
            policy = self.policies[kind]
            key = f"cxr/login-fail/{kind}/{ident}"
            count = self._shared(lambda s, k=key, p=policy: s.incr(k, p.window_s))
            seconds = policy.wait_after(count)
            if seconds:
                lock = f"cxr/login-lock/{kind}/{ident}"
                self._shared(lambda s, k=lock, n=seconds: (s.clear(k), s.incr(k, n)))
                wait = max(wait, seconds)
        return wait

    def succeeded(self, username: str, address: str) -> None:
        """Forget the account's failures (its owner signed in); the address keeps its count."""
        ident = self._ids(username, address)["account"]
        for key in (f"cxr/login-fail/account/{ident}", f"cxr/login-lock/account/{ident}"):
            self._shared(lambda s, k=key: s.clear(k))


def login_throttle() -> LoginThrottle:
    """The current app's sign-in throttle (made in create_app on the limiter's storage)."""
    return current_app.extensions["cxr_login_throttle"]


def retry_after_s() -> int:
    """Seconds until the limit that refused this request lets one through again (at least 1)."""
    from web.extensions import limiter

    current = limiter.current_limit
    if current is None:
        return 1
    return max(1, math.ceil(current.reset_at - time.time()))
