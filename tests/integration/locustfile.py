"""Locust users for tests/integration/test_load.py: clinics that upload small batches and poll their progress.

Run only by that test, as a headless subprocess (locust patches the standard library with gevent: never import
it into pytest).
Each user has an API token of its own (LOAD_TOKENS, a JSON list). Every response is recorded in LOAD_RECORD
(JSON, written when the run stops): status codes per request kind, each poll's time and latency, the batches.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

TOKENS: list[str] = json.loads(Path(os.environ["LOAD_TOKENS"]).read_text())
IMAGES = sorted(p for p in Path(os.environ["LOAD_IMAGES"]).iterdir() if p.is_file())
FILES_PER_BATCH = int(os.environ.get("LOAD_FILES_PER_BATCH", "2"))
_next_token = itertools.count()
_status: dict[str, Counter] = {"upload": Counter(), "poll": Counter()}
_polls: list[tuple[float, float]] = []  # (unix time, latency ms)
_batches: dict[int, int] = {}  # batch id -> studies in it


@events.request.add_listener
def _record(name: str, response_time: float, response: Any = None, exception: Any = None, **_: Any) -> None:
    code = getattr(response, "status_code", None) or 0  # 0: no response at all (connection error)
    _status.setdefault(name, Counter())[str(code)] += 1
    if name == "poll" and exception is None:
        _polls.append((time.time(), response_time))


@events.test_stop.add_listener
def _write(**_: Any) -> None:
    record = {
        "status": {k: dict(v) for k, v in _status.items()},
        "polls": _polls,
        "batches": _batches,
    }
    Path(os.environ["LOAD_RECORD"]).write_text(json.dumps(record))


class Clinic(HttpUser):
    """Uploads a batch of a few films now and then; polls the progress of its batches in between."""

    # Faster than the dashboard, which polls every 2 s (web/static/app.js): 20 users make ~20 requests/s.
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        """Take the next account's token."""
        token = TOKENS[next(_next_token) % len(TOKENS)]
        self.client.headers["Authorization"] = f"Bearer {token}"
        self.mine: list[int] = []
        self.upload()

    @task(1)
    def upload(self) -> None:
        """Create, upload and start a batch in one call."""
        picked = random.sample(IMAGES, FILES_PER_BATCH)
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in picked]
        with self.client.post(
            "/api/v1/batches",
            data={"name": "load", "start": "true"},
            files=files,
            name="upload",
            catch_response=True,
        ) as r:
            if r.status_code == 201:
                body = r.json()
                self.mine.append(body["id"])
                _batches[body["id"]] = len(body["study_ids"])

    @task(4)
    def poll(self) -> None:
        """The dashboard's poll: one batch's progress."""
        if self.mine:
            self.client.get(f"/api/v1/batches/{random.choice(self.mine)}", name="poll")
