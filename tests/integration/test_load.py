"""A bounded locust run against the real stack: web (waitress subprocess), worker and beat, PostgreSQL, Redis.

20 users upload small batches through the API and poll their progress for LOAD_RUN_S seconds; midway the
worker is SIGKILLed and a new one started. Must hold: no 5xx (nor a dropped connection), poll p95 under
200 ms, and nothing lost: every uploaded study DONE with exactly one prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from sqlalchemy import select

from store.db import session_scope
from store.studies import ACTIVE
from store.tables import Study, User
from store.users import create_user, issue_api_token
from tests.integration.helpers import assert_done_exactly_once
from tests.procs import (
    REPO_ROOT,
    kill,
    log_tail,
    sample_images,
    service_env,
    start_beat,
    start_web,
    start_worker,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.services]

USERS = 20
SPAWN_RATE = 4  # users started per second: all 20 within 5 s, not 20 uploads in the same instant
LOAD_RUN_S = 40
KILL_AT_S = 15
POLL_P95_MS = 200.0
WEB_THREADS = 8  # as `cxr web` (cli/run_cmd.py) and docker-compose run it


def _accounts(url: str, n: int) -> list[str]:
    """n accounts, one API token each."""
    tokens = []
    with session_scope(url) as session:
        for i in range(n):
            user: User = create_user(session, username=f"clinic{i:02d}", password="correct horse battery")
            tokens.append(issue_api_token(session, user=user))
    return tokens


def _all_finished(url: str, batch_ids: list[int]) -> bool:
    with session_scope(url) as session:
        active = session.scalar(
            select(Study.id).where(Study.batch_id.in_(batch_ids), Study.status.in_(ACTIVE)).limit(1)
        )
    return active is None


@pytest.mark.hardening(
    "locust: 20 users upload and poll, a worker SIGKILLed: no 5xx, poll p95 < 200 ms, none lost"
)
def test_locust_upload_and_poll_with_a_worker_killed(
    data_dir: Path,
    procs: list,
    pg_url: str,
    redis_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """20 locust users for 40 s; the worker is killed at 15 s and replaced."""
    env = service_env(
        data_dir,
        database_url=pg_url,
        broker_url=redis_url,
        # The dead worker's chunk comes back after its lease: short here so the test stays bounded.
        running_lease_s=20,
        reconcile_every_s=5,
    )
    images = data_dir / "load-images"
    images.mkdir()
    for name, data in sample_images(6):
        (images / name).write_bytes(data)
    tokens_file, record_file = data_dir / "tokens.json", data_dir / "load-record.json"
    tokens_file.write_text(json.dumps(_accounts(pg_url, USERS)))

    web, base = start_web(env, threads=WEB_THREADS)
    procs.append(web)
    worker = start_worker(env, queues="inference")
    procs += [worker, start_beat(env)]

    # A web process serves for days: its first requests (imports, SQL statement caches) are not the load.
    auth = {"Authorization": f"Bearer {json.loads(tokens_file.read_text())[0]}"}
    for name, data in sample_images(2):
        warm = requests.post(
            f"{base}/api/v1/batches",
            headers=auth,
            data={"name": "warm-up", "start": "true"},
            files=[("files", (name, data))],
            timeout=60,
        )
        assert warm.status_code == 201, warm.text
    poll_url = f"{base}/api/v1/batches/{warm.json()['id']}"
    with ThreadPoolExecutor(WEB_THREADS) as pool:  # every thread's first request, every pooled connection
        assert all(
            pool.map(lambda _: requests.get(poll_url, headers=auth, timeout=60).ok, range(4 * WEB_THREADS))
        )

    locust_env = dict(
        env, LOAD_TOKENS=str(tokens_file), LOAD_IMAGES=str(images), LOAD_RECORD=str(record_file)
    )
    args = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py"))]
    args += [
        "--headless",
        "--users",
        str(USERS),
        "--spawn-rate",
        str(SPAWN_RATE),
        "--run-time",
        f"{LOAD_RUN_S}s",
    ]
    args += ["--host", base, "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING"]
    log = data_dir / "locust.log"
    with open(log, "wb") as out:
        load = subprocess.Popen(args, cwd=REPO_ROOT, env=locust_env, stdout=out, stderr=subprocess.STDOUT)

    def kill_and_replace() -> None:
        time.sleep(KILL_AT_S)
        kill(worker)
        procs.append(start_worker(env, queues="inference", wait_ready=False))

    killer = threading.Thread(target=kill_and_replace)
    killer.start()
    try:
        load.wait(LOAD_RUN_S + 60)
    finally:
        if load.poll() is None:
            load.kill()
        killer.join(30)
    assert record_file.exists(), log.read_text(errors="replace")[-4000:]
    record = json.loads(record_file.read_text())

    status = record["status"]
    bad = {
        name: {c: n for c, n in codes.items() if c == "0" or c.startswith("5")}
        for name, codes in status.items()
    }
    assert not any(bad.values()), f"5xx or dropped connections: {bad}\n{log_tail(web)}"
    uploads_ok = status["upload"].get("201", 0)
    when, polls = np.array(record["polls"]).T
    assert uploads_ok >= USERS and len(polls) >= 10 * USERS, status
    web_cpu_s = _cpu_seconds(web.pid)

    # Nothing lost: every study of every accepted upload DONE, one prediction each.
    batches = {int(k): v for k, v in record["batches"].items()}
    wait_for(
        lambda: _all_finished(pg_url, list(batches)),
        240,
        interval=1.0,
        message="every uploaded study to finish after the load",
    )
    with session_scope(pg_url) as session:
        rows = session.execute(
            select(Study.id, Study.batch_id).where(Study.batch_id.in_(list(batches)))
        ).all()
    per_batch: dict[int, int] = {}
    for _, batch_id in rows:
        per_batch[batch_id] = per_batch.get(batch_id, 0) + 1
    assert per_batch == batches, "every uploaded file is a study"
    assert_done_exactly_once(pg_url, [sid for sid, _ in rows])

    # Poll latency, last: a miss still shows that the rest held. Per phase for the reader of a failure (before
    # the kill, the new worker loading, after), with how busy the machine was.
    p95 = float(np.percentile(polls, 95))
    phases = np.digitize(when - when.min(), [KILL_AT_S, KILL_AT_S + 15])
    by_phase = " / ".join(
        f"{np.percentile(polls[phases == i], 95):.0f}" for i in range(3) if (phases == i).any()
    )
    summary = (
        f"locust: {status}; poll p50 {np.percentile(polls, 50):.0f} ms, p95 {p95:.0f} ms, {len(polls)} polls "
        f"(p95 before the kill / new worker loading / after: {by_phase} ms); web used {web_cpu_s:.1f} CPU-s; "
        f"machine: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {_cpu_pressure()}"
    )
    print(summary)
    record_property(
        "measured",
        f"{uploads_ok} uploads, {len(polls)} polls, no 5xx; poll p50 {np.percentile(polls, 50):.0f} ms, "
        f"p95 {p95:.0f} ms; {len(rows)} studies DONE once; load average {os.getloadavg()[0]:.1f}",
    )
    assert p95 < POLL_P95_MS, summary


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_pressure() -> str:
    """Linux PSI: the share of the last minute in which some runnable task waited for a CPU."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "CPU pressure unknown"
    return "CPU pressure " + dict(kv.split("=") for kv in line.split()[1:]).get("avg60", "?") + "% (avg60)"
