"""Cost as work grows (issue 14, point 6): time and peak memory of web and worker for batches of 10 to 10,000.

    .venv/bin/python bench/cost.py [--sizes 10,100,1000,10000] [--json docs/operations/cost.json]
                                   [--plot docs/operations/cost.png]

For each size, fresh processes on a fresh throwaway PostgreSQL database and Redis database (both emptied
afterwards), so that each process's peak resident memory (VmHWM in /proc) belongs to that batch alone:
  1. web (waitress, as `cxr run`) and a real `celery worker` (1 pool process) start; idle memory is read;
  2. upload: the studies go through the JSON API in groups (bench.throughput.upload_batch), each group started
     at once; meanwhile the report page's poll (/batches/<id>/progress.json, signed in) is timed every 0.5 s;
  3. queue + worker: from the first upload byte until the last study is finished in SQL;
  4. pages of the finished batch, signed in as the owner: the report page (first page of 50 rows, summary,
     drift), the poll, the CSV export and the JSON export (each the median of 3 requests);
  5. peak memory: VmHWM of the web process, of the worker's parent and of its pool process.

Images: real chest X-rays from ../shared/data/cxr (bench.throughput.load_images; 1,701 JPEGs of ~53 KB).
Beyond those, each further study is one of them with a few corner pixels set to its index and encoded again
as JPEG: distinct bytes (images are stored once per content hash) of the same kind and size.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

from bench.throughput import (  # noqa: E402
    create_database,
    drop_database,
    load_images,
    proc_tree_rss_kib,
    upload_batch,
    wait_finished,
)
from store import migrate  # noqa: E402
from store.db import dispose_all, session_scope  # noqa: E402
from store.studies import batch_progress  # noqa: E402
from store.users import create_user, issue_api_token  # noqa: E402
from tests.procs import service_env, start_web, start_worker, stop_all  # noqa: E402

PASSWORD = "bench password 123"
MIB = 1024.0


def distinct_images(n: int) -> list[tuple[str, bytes]]:
    """n images with distinct bytes: the shared films, then re-encoded copies stamped with their index."""
    seen: set[bytes] = set()
    base = [(name, data) for name, data in load_images(n) if not (data in seen or seen.add(data))]
    out = base[:n]
    for i in range(len(out), n):
        name, data = base[i % len(base)]
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        gray[0, :4] = np.frombuffer(int(i).to_bytes(4, "big"), np.uint8)
        ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        out.append((f"v{i}-{name}", buf.tobytes()))
    return out


def sign_in(base: str, username: str) -> requests.Session:
    """A browser-like session signed in through the login form (CSRF token included)."""
    web = requests.Session()
    page = web.get(f"{base}/login", timeout=30).text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', page
    )
    if token is None:
        sys.exit("no CSRF token on the login page")
    r = web.post(
        f"{base}/login",
        data={"username": username, "password": PASSWORD, "csrf_token": token.group(1)},
        allow_redirects=False,
        timeout=30,
    )
    if r.status_code != 302:
        sys.exit(f"sign-in failed: {r.status_code}")
    return web


def timed_get(web: requests.Session, url: str, runs: int = 3) -> tuple[float, int]:
    """(median seconds, bytes) of GET url."""
    times, size = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        r = web.get(url, timeout=600)
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
        size = len(r.content)
    return statistics.median(times), size


class Poller(threading.Thread):
    """GETs the report page's poll every 0.5 s (as app.js does) and keeps each request's seconds."""

    def __init__(self, web: requests.Session, url: str) -> None:
        super().__init__(daemon=True)
        self.web, self.url, self.seconds, self.stop_flag = web, url, [], threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.5):
            t0 = time.perf_counter()
            self.web.get(self.url, timeout=60).raise_for_status()
            self.seconds.append(time.perf_counter() - t0)


def peaks(web_pid: int, worker_pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (MiB) of the web process, the worker's parent and its pool process(es)."""
    web = proc_tree_rss_kib(web_pid).get(web_pid, (0, 0))
    tree = proc_tree_rss_kib(worker_pid)
    parent = tree.get(worker_pid, (0, 0))
    children = [v for p, v in tree.items() if p != worker_pid]
    return {
        "web_rss": web[0] / MIB,
        "web_hwm": web[1] / MIB,
        "worker_parent_hwm": parent[1] / MIB,
        "worker_pool_hwm": max((h for _, h in children), default=0) / MIB,
        "worker_rss": (parent[0] + sum(r for r, _ in children)) / MIB,
    }


def run_size(n: int, images: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, Any]:
    """One batch of n studies through fresh web + worker processes; the measurements."""
    import redis

    admin, db_name, url = create_database(args.pg_admin_url, "cxr_cost_")
    redis.Redis.from_url(args.redis_url).flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="cxr-cost-"))
    procs = []
    try:
        migrate.upgrade(url)
        with session_scope(url) as s:
            user = create_user(s, username="bench", password=PASSWORD)
            token = issue_api_token(s, user=user)
        env = service_env(tmp, database_url=url, broker_url=args.redis_url)
        web_proc, base = start_web(env)
        procs.append(web_proc)
        worker = start_worker(env, concurrency=1)
        procs.append(worker)
        idle = peaks(web_proc.pid, worker.pid)
        web = sign_in(base, "bench")
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {token}"
        batch_id = api.post(f"{base}/api/v1/batches", json={"name": f"cost {n}"}, timeout=60).json()["id"]
        poller = Poller(web, f"{base}/batches/{batch_id}/progress.json")
        poller.start()
        t0 = time.monotonic()
        upload_batch(base, token, batch_id, images[:n], group=args.upload_group, workers=2)
        uploaded = time.monotonic()
        finished = wait_finished(url, n, 3600, poll=0.2)
        poller.stop_flag.set()
        poller.join()
        with session_scope(url) as s:
            prog = batch_progress(s, batch_ids=[batch_id])[batch_id]
        pages = {}
        for key, path in (
            ("report_page", f"/batches/{batch_id}"),
            ("poll", f"/batches/{batch_id}/progress.json"),
            ("csv_export", f"/batches/{batch_id}/report.csv"),
            ("json_export", f"/batches/{batch_id}/report.json"),
        ):
            seconds, size = timed_get(web, base + path)
            pages[key] = {"s": round(seconds, 3), "kb": round(size / 1024, 1)}
        peak = peaks(web_proc.pid, worker.pid)
        during = sorted(poller.seconds)
        return {
            "studies": n,
            "done": prog.done,
            "failed": prog.failed,
            "upload_s": round(uploaded - t0, 2),
            "to_last_result_s": round(finished - t0, 2),
            "studies_per_s": round(n / (finished - t0), 1),
            "poll_during_run_ms": {
                "n": len(during),
                "p50": round(statistics.median(during) * 1000, 1) if during else None,
                "p95": round(statistics.quantiles(during, n=20)[-1] * 1000, 1) if len(during) >= 2 else None,
            },
            "pages": pages,
            "memory_idle_mib": {k: round(v) for k, v in idle.items()},
            "memory_after_mib": {k: round(v) for k, v in peak.items()},
        }
    finally:
        stop_all(procs)
        dispose_all()
        drop_database(admin, db_name)
        redis.Redis.from_url(args.redis_url).flushdb()
        shutil.rmtree(tmp, ignore_errors=True)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels against batch size (log-log): seconds per stage, and peak memory per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["studies"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {
        "upload (API)": [r["upload_s"] for r in rows],
        "upload to last result": [r["to_last_result_s"] for r in rows],
        "report page": [r["pages"]["report_page"]["s"] for r in rows],
        "CSV export": [r["pages"]["csv_export"]["s"] for r in rows],
        "JSON export": [r["pages"]["json_export"]["s"] for r in rows],
        "poll (finished batch)": [r["pages"]["poll"]["s"] for r in rows],
        "poll p95 while it runs": [(r["poll_during_run_ms"]["p95"] or float("nan")) / 1000 for r in rows],
    }
    for label, ys in series.items():
        ax_t.plot(ns, ys, marker="o", label=label)
    ax_t.set(xscale="log", yscale="log", xlabel="studies in the batch", ylabel="seconds", title="Time")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    mem = {
        "web peak (VmHWM)": [r["memory_after_mib"]["web_hwm"] for r in rows],
        "worker pool process peak": [r["memory_after_mib"]["worker_pool_hwm"] for r in rows],
        "worker parent peak": [r["memory_after_mib"]["worker_parent_hwm"] for r in rows],
    }
    for label, ys in mem.items():
        ax_m.plot(ns, ys, marker="o", label=label)
    ax_m.set(xscale="log", xlabel="studies in the batch", ylabel="MiB", title="Peak resident memory")
    ax_m.set_ylim(bottom=0)
    ax_m.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.suptitle("Cost of one batch as it grows (bench/cost.py; fresh processes per size)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run every size, print the table, write JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--upload-group", type=int, default=100, help="files per upload request")
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--plot", type=Path, help="write the PNG plot here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    images = distinct_images(max(sizes))
    print(
        f"{len(images)} distinct images "
        f"({sum(len(d) for _, d in images) / len(images) / 1024:.0f} KB on average)",
        flush=True,
    )
    rows = []
    for n in sizes:
        row = run_size(n, images, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        f"{'studies':>8} {'upload s':>9} {'to last s':>9} {'studies/s':>9} {'poll p95 ms':>11} "
        f"{'report s':>8} {'CSV s':>7} {'JSON s':>7} {'web MiB':>8} {'pool MiB':>8} {'parent MiB':>10}"
    )
    for r in rows:
        m = r["memory_after_mib"]
        print(
            f"{r['studies']:>8} {r['upload_s']:>9.2f} {r['to_last_result_s']:>9.2f} "
            f"{r['studies_per_s']:>9.1f} "
            f"{r['poll_during_run_ms']['p95'] or float('nan'):>11.1f} {r['pages']['report_page']['s']:>8.3f} "
            f"{r['pages']['csv_export']['s']:>7.3f} {r['pages']['json_export']['s']:>7.3f} "
            f"{m['web_hwm']:>8} {m['worker_pool_hwm']:>8} {m['worker_parent_hwm']:>10}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
