"""Every Prometheus metric of web and worker, and how they are exposed (web /metrics, worker exporter).

Counters and histograms are plain module-level objects, incremented where things happen. Values that live
elsewhere (queue depth in the broker, the serving model in SQL) are read at scrape time by ScrapeGauge, so
they are never stale and need no multiprocess gauge mode. Under gunicorn (or a Celery prefork worker) with
PROMETHEUS_MULTIPROC_DIR set, the exposition adds up every process's files (MultiProcessCollector).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ops.multiproc import multiprocess_dir

log = logging.getLogger(__name__)

STUDIES_RECEIVED = Counter(
    "cxr_studies_received",
    "Studies received: queued for screening, or rejected at upload (not an image, too large, ...)",
    ["outcome"],
)
STUDIES_DONE = Counter("cxr_studies_done", "Studies screened: a prediction was written")
STUDIES_FAILED = Counter(
    "cxr_studies_failed",
    "Studies the worker ended FAILED, by reason (decode: unreadable image; no_image: nothing stored; "
    "internal: the model raised). Intake refusals, the validity gate's included, count as received/rejected",
    ["reason"],
)
# decode and preprocess: seconds per image; infer and write: seconds per chunk (one array, one commit).
STAGE_SECONDS = Histogram(
    "cxr_stage_seconds",
    "Seconds spent per screening stage (decode, preprocess: per image; infer, write: per chunk)",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRAIN_RUNS = Counter("cxr_retraining_runs", "Retraining runs by outcome", ["status"])
HTTP_SECONDS = Histogram(
    "cxr_http_request_seconds",
    "Web request latency by endpoint (the URL rule, never the raw path), method and status",
    ["endpoint", "method", "status"],
)
# livemax: a dead pool process's value is dropped, so only loaded models are shown.
WORKER_MODEL = Gauge(
    "cxr_worker_model_info",
    "1 for the model version a worker process has loaded",
    ["version"],
    multiprocess_mode="livemax",
)

STAGES = ("decode", "preprocess", "infer", "write")


class ScrapeGauge(Collector):
    """A gauge family whose samples are read at scrape time: read() -> {label values: value}."""

    def __init__(
        self, name: str, documentation: str, labels: Iterable[str], read: Callable[[], Mapping[Any, float]]
    ) -> None:
        self.name, self.documentation, self.labels, self.read = name, documentation, list(labels), read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One family; empty (and a warning in the log) when the source cannot be read now."""
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        try:
            for key, value in self.read().items():
                values = list(key) if isinstance(key, tuple) else [str(key)]
                family.add_metric([str(v) for v in values], float(value))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one source is down
            log.warning("metric %s not read: %s: %s", self.name, type(exc).__name__, exc)
        yield family


class _Default(Collector):
    """This process's own metrics (the default registry), when not in multiprocess mode."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def build_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry for one exposition: all processes' files in multiprocess mode, else this process."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir() is not None:
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Default())
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """(body, content type) of the text format for a /metrics response."""
    return generate_latest(build_registry(extra)), CONTENT_TYPE_LATEST


def start_exporter(port: int, *, addr: str = "0.0.0.0", extra: Iterable[Collector] = ()) -> Any:
    """Serve /metrics on port from a daemon thread of this process (a Celery worker's parent); the server."""
    server, _thread = start_http_server(port, addr=addr, registry=build_registry(extra))
    return server


def mark_process_dead(pid: int) -> None:
    """Drop a finished pool process's live gauges (multiprocess mode only)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)


def sample_value(name: str, labels: Mapping[str, str] | None = None) -> float:
    """The current value of one sample of this process's registry (0 when absent): for tests and the CLI."""
    return REGISTRY.get_sample_value(name, dict(labels or {})) or 0.0
