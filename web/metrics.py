"""/metrics, the request-latency histogram (labelled by URL rule, never the raw path), request log context.

The web runs under waitress (threads, one process): this process's registry. Under gunicorn set
PROMETHEUS_MULTIPROC_DIR (empty at start) and every worker process's samples are added up here.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, current_app, g, request
from werkzeug.wrappers import Response

from config import Settings
from ops import logs
from ops.metrics import HTTP_SECONDS, ScrapeGauge, exposition
from store.health import drift_counts, drift_this_week, serving_version_name
from web.health import celery_for
from worker.app import queue_depths

bp = Blueprint("metrics", __name__)


def init_app(app: Flask) -> None:
    """Time every request and register /metrics."""

    @app.before_request
    def _start_timer() -> None:
        g.cxr_started = time.perf_counter()
        # The request's log lines carry its batch (waitress reuses threads: cleared at teardown).
        logs.clear()
        logs.bind(batch_id=(request.view_args or {}).get("batch_id"))

    @app.after_request
    def _observe(resp: Response) -> Response:
        started = g.pop("cxr_started", None)
        if started is not None:
            # The rule ("/batches/<int:batch_id>"), so ids do not explode the label set; 404s share one label.
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            HTTP_SECONDS.labels(rule, request.method, str(resp.status_code)).observe(
                time.perf_counter() - started
            )
        return resp

    @app.teardown_request
    def _clear_log_context(_exc: BaseException | None) -> None:
        logs.clear()

    app.register_blueprint(bp)


def scrape_collectors(settings: Settings) -> list[ScrapeGauge]:
    """Gauges read when scraped: queue depth per queue (broker) and the serving model version (SQL)."""
    celery_app = celery_for(settings)

    def serving() -> dict[str, float]:
        version = serving_version_name(settings.database_url)
        return {version: 1.0} if version else {}

    return [
        ScrapeGauge(
            "cxr_queue_depth",
            "Messages waiting in each broker queue (read from the broker at scrape time)",
            ["queue"],
            lambda: queue_depths(celery_app),
        ),
        ScrapeGauge("cxr_serving_model_info", "1 for the model version that serves", ["version"], serving),
        ScrapeGauge(
            "cxr_drift_batches",
            "Batches of the last 7 days (newest 50) with a drift warning, by kind",
            ["kind"],
            lambda: drift_counts(settings.database_url),
        ),
        ScrapeGauge(
            "cxr_drift_week",
            "1 when this calendar week's studies (Monday, UTC) cross the drift bound of that kind",
            ["kind"],
            lambda: drift_this_week(settings.database_url),
        ),
    ]


@bp.route("/metrics")
def metrics() -> Response:
    """The Prometheus text format; no sign-in, so keep it off the public network (docs/operations.md)."""
    body, content_type = exposition(scrape_collectors(current_app.extensions["cxr_settings"]))
    return Response(body, content_type=content_type)
