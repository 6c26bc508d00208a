"""The Flask web app: one factory, blueprints for auth, batches, reports, admin and the JSON API.

The web process never imports TensorFlow: it parses requests and hands files to intake (OpenCV/pydicom
only), reads and changes state through store, and reaches the queue through worker.app (Celery only).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, render_template, request
from flask_limiter import RateLimitExceeded
from flask_smorest import Api
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, TooManyRequests
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter, Map
from werkzeug.wrappers import Response

from config import Settings, load_settings
from web.common import MAX_ROW_ID

log = logging.getLogger(__name__)


class RowIdConverter(IntegerConverter):
    """<int:...> bounded to what SQL can hold (a BIGINT): a larger number does not match the route."""

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:  # noqa: A002 - werkzeug's name
        kwargs.setdefault("max", MAX_ROW_ID)
        super().__init__(map, *args, **kwargs)


def _apply_overrides(settings: Settings, config: dict[str, Any]) -> Settings:
    # Keys named like Settings fields in upper case (DATABASE_URL, MAX_UPLOAD_BYTES, ...) override the
    # environment; this is how tests point the app at a throwaway database.
    names = set(Settings.model_fields)
    return settings.with_overrides(
        **{k.lower(): v for k, v in config.items() if k.lower() in names and k.isupper()}
    )


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the web app from CXR_ settings, with optional overrides (tests)."""
    config = dict(config or {})
    settings = _apply_overrides(load_settings(), config)

    app = Flask(__name__)
    # Every <int:...> in a route is a row id: past 2**63 - 1 it is a 404 (schemathesis found the 500).
    app.url_map.converters["int"] = RowIdConverter
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        # Every uploaded file is one multipart part; leave room for the form fields.
        MAX_FORM_PARTS=settings.max_files_per_upload + 50,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.env == "production" or settings.tls,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=settings.env == "production",
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session; long uploads must not expire it
        CXR_ENV=settings.env,
        # The JSON API's OpenAPI document (flask-smorest), at /api/openapi.json.
        API_TITLE="CXR screening API",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api",
        OPENAPI_JSON_PATH="openapi.json",
        # Rate limits (web/ratelimit.py): one storage for every web process; a moving window, so a burst at
        # a window's edge cannot double the rate. While Redis is unreachable each process counts alone.
        RATELIMIT_STORAGE_URI=settings.ratelimit_storage_url,
        RATELIMIT_STRATEGY="moving-window",
        RATELIMIT_KEY_PREFIX="cxr",
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
    )
    app.config.update({k: v for k, v in config.items() if k.isupper()})
    if not app.testing:  # tests keep pytest's log capture as it is
        from ops.logs import setup_from_settings

        setup_from_settings(settings, process="web")

    if settings.proxy_hops:  # behind trusted proxies: the client address is the one they were sent from
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)

    from intake.files import ServerBusy, UploadTooLarge
    from web.db import init_db
    from web.extensions import csrf, limiter, login_manager
    from web.ratelimit import LoginThrottle, retry_after_s

    init_db(app, settings)
    limiter.init_app(app)
    # The sign-in back-off keeps its counts in the limiter's storage (Redis in production).
    app.extensions["cxr_login_throttle"] = LoginThrottle.from_settings(limiter.storage, settings)
    csrf.init_app(app)
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please sign in."
    login_manager.session_protection = "strong"

    from web import admin, api, auth, batches, common, registry, reports, review, studies

    app.register_blueprint(auth.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(reports.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(review.bp)
    app.register_blueprint(registry.bp)
    app.register_blueprint(studies.bp)
    from web import dicom_results  # SR / Secondary Capture downloads (issue 12)

    app.register_blueprint(dicom_results.bp)
    from web import health  # /healthz, /readyz (issue 14)

    app.register_blueprint(health.bp)
    from web import metrics  # /metrics and request latency (issue 14)

    metrics.init_app(app)
    # flask-smorest registers its own HTTPException handler here; the app's handlers below replace it.
    Api(app).register_blueprint(api.bp)
    csrf.exempt(api.bp)  # bearer tokens, never cookies: CSRF does not apply

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {
            "notice": reports.NOTICE,
            "review_roles": common.REVIEW_ROLES,
            "band_slug": common.band_slug,
        }

    # Every time is stored in UTC; pages print it in UTC with its zone, and app.js rewrites it in the
    # reader's own time zone (with the zone's name), so one page never mixes zones.
    app.add_template_filter(common.time_tag, "when")

    @app.after_request
    def _security_headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        # No inline script or style anywhere, so the policy can forbid them.
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'",
        )
        if settings.tls:  # only when the site is known to be on HTTPS: HSTS over plain HTTP would lock it out
            resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        return resp

    def _wants_json() -> bool:
        return request.path.startswith("/api/") or request.path.endswith(".json")

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> tuple[Response | str, int]:
        limit = settings.max_upload_bytes / 2**20
        msg = f"The upload is larger than the {limit:.0f} MB limit. Split it into several batches."
        if _wants_json():
            return jsonify({"error": msg}), 413
        return render_template("error.html", code=413, message=msg), 413

    @app.errorhandler(TooManyRequests)
    def _too_many(exc: TooManyRequests) -> Response:
        # Flask-Limiter's refusals name their limit; ours (sign-in back-off, busy uploads) carry retry_after.
        retry = getattr(exc, "retry_after", None)
        seconds = int(retry) if isinstance(retry, int | float) else retry_after_s()
        if isinstance(exc, RateLimitExceeded):
            msg = f"Too many requests (the limit is {exc.description}). Try again in {seconds} s."
        else:
            msg = exc.description or "Too many requests."
        if _wants_json():
            resp = jsonify({"error": msg, "retry_after": seconds})
        else:
            resp = Response(render_template("error.html", code=429, message=msg), mimetype="text/html")
        resp.status_code = 429
        resp.headers["Retry-After"] = str(seconds)
        return resp

    @app.errorhandler(UploadTooLarge)
    def _inflates_too_much(exc: UploadTooLarge) -> tuple[Response | str, int]:
        if _wants_json():
            return jsonify({"error": str(exc)}), 413
        return render_template("error.html", code=413, message=str(exc)), 413

    @app.errorhandler(ServerBusy)
    def _busy(exc: ServerBusy) -> Response:
        return _too_many(TooManyRequests(str(exc), retry_after=exc.retry_after))

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> tuple[str, int]:
        msg = "The form expired or was not sent from this site. Reload the page and try again."
        return render_template("error.html", code=400, message=msg), 400

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response | str, int]:
        code = exc.code or 500
        if _wants_json():
            return jsonify({"error": exc.description or exc.name}), code
        return render_template("error.html", code=code, message=exc.description or exc.name), code

    return app
