"""End-to-end throughput of the real path vs the raw model, on Redis + PostgreSQL (issue 2, section 6).

Run (needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, as in CI); results in bench/README.md:

    .venv/bin/python bench/throughput.py --studies 1000 --memory-studies 5000 --chunk-size 32

In one run, on the same images:
  1. raw: the model in this process (decode + preprocess + one array per chunk), none of the service's
     processes busy; measured before and after step 3 and averaged (a shared machine's spare CPU drifts);
  2. idle latency: with web + worker up and idle, upload one image through the JSON API and time until its
     prediction is in SQL;
  3. end to end: upload N studies through the JSON API (multipart, in groups, each group started at once),
     web validation, SQL, Redis, a real `celery worker`, predictions in SQL; studies/s from the first upload
     byte to the last prediction, and the ratio to raw (target >= 0.7);
  4. store path + memory: M more studies enqueued through store/ (no web): queue + SQL + worker studies/s,
     and the worker's resident memory after every 1000 studies: the peak must not grow with the batch.
A throwaway PostgreSQL database and a Redis database number are created and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import requests  # noqa: E402
from sqlalchemy import Engine, create_engine, func, select, text  # noqa: E402

from bench.cpu_by_process import cpu_between, snapshot  # noqa: E402
from model import shared_data_dir  # noqa: E402
from store import migrate  # noqa: E402
from store.db import dispose_all, session_scope  # noqa: E402
from store.studies import add_studies, batch_progress, create_batch, mark_queued  # noqa: E402
from store.tables import ModelVersion, Prediction, Role, Study  # noqa: E402
from store.users import create_user, issue_api_token  # noqa: E402
from tests.procs import service_env, settings_from_env, start_web, start_worker, stop_all  # noqa: E402
from worker.app import make_celery, send_screen_chunks  # noqa: E402


def create_database(admin_url: str, prefix: str) -> tuple[Engine, str, str]:
    """A throwaway PostgreSQL database next to admin_url's: (admin engine, its name, its URL).

    Every benchmark that needs its own database makes it here and drops it with drop_database.
    """
    name = prefix + secrets.token_hex(4)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return admin, name, admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin: Engine, name: str) -> None:
    """Drop a database made by create_database (sessions still on it are ended) and close the admin engine."""
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def load_images(n: int, sources: Collection[str] | None = None) -> list[tuple[str, bytes]]:
    """n distinct chest X-rays from ../shared/data/cxr (cycled if the set is smaller); sources: only these."""
    root = shared_data_dir("cxr")
    with open(root / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if sources is None or r["source"] in sources]
    files = sorted(root / r["file"] for r in rows)
    if not files:
        sys.exit(f"no images under {root}")
    return [(files[i % len(files)].name, files[i % len(files)].read_bytes()) for i in range(n)]


def raw_rate(images: list[bytes], chunk: int, model_dir: Path) -> tuple[float, str, float]:
    """(studies/s, version, CPU ms/study) of the model alone in this process, chunked as the worker does."""
    from model.serve import load_predictor

    predictor = load_predictor(model_dir)
    predictor.predict_bytes(images[:chunk])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()  # process_time: every thread of this process
    for i in range(0, len(images), chunk):
        predictor.predict_bytes(images[i : i + chunk])
    cpu_ms = (time.process_time() - c0) * 1000.0 / len(images)
    return len(images) / (time.perf_counter() - t0), predictor.version, cpu_ms


def proc_tree_rss_kib(pid: int) -> dict[int, tuple[int, int]]:
    """pid -> (VmRSS, VmHWM) in KiB for pid and its children (a prefork worker and its pool process)."""
    out: dict[int, tuple[int, int]] = {}
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{p}/status").read_text().splitlines()
                if ":" in line
            )
            out[p] = (int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            continue
    return out


class RssSampler(threading.Thread):
    """Samples the worker tree's total RSS every 0.25 s; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.stop_flag = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            total = sum(rss for rss, _ in proc_tree_rss_kib(self.pid).values())
            self.peak_kib = max(self.peak_kib, total)
            time.sleep(0.25)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a prefork worker's pool processes, PostgreSQL's backends)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
    return out


def pin(pids: list[int], cpus: set[int]) -> dict[int, set[int]]:
    """Set the CPU affinity of every thread of these processes; returns each thread's previous affinity."""
    before: dict[int, set[int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                with contextlib.suppress(OSError):
                    before[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, cpus)
    return before


def pids_named(prefix: str) -> list[int]:
    """Processes whose command line starts with prefix (e.g. the machine's PostgreSQL and Redis servers)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if Path(cmd).name.startswith(prefix) or cmd.startswith(prefix):
                out.append(int(pid))
    return out


def counts(url: str) -> tuple[int, int]:
    """(finished studies, predictions) in the whole database."""
    with session_scope(url) as s:
        finished = s.scalar(
            select(func.count()).select_from(Study).where(Study.status.in_(("DONE", "FAILED")))
        )
        preds = s.scalar(select(func.count()).select_from(Prediction))
        return int(finished), int(preds)


def wait_finished(url: str, target: int, timeout: float, poll: float = 0.1) -> float:
    """Block until `target` studies are finished; returns the monotonic time it happened.

    Polled every 0.1 s by default: polling much faster makes PostgreSQL count rows all the time, CPU that the
    measured path then lacks (the latency probe polls every 5 ms, but for one study on an idle system).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if counts(url)[0] >= target:
            return time.monotonic()
        time.sleep(poll)
    raise TimeoutError(f"{target} studies not finished after {timeout:.0f} s (at {counts(url)[0]})")


def upload_batch(
    base: str, token: str, batch_id: int, images: list[tuple[str, bytes]], *, group: int, workers: int
) -> None:
    """Upload images to a batch through the JSON API in groups of `group` files, `workers` requests at a time.

    As a script would: one HTTP session per thread, and each group started as soon as it is stored, so the
    worker runs while later groups are still uploading.
    """

    def upload_group(i: int) -> None:
        client = requests.Session()
        client.headers["Authorization"] = f"Bearer {token}"
        files = [("files", f) for f in images[i : i + group]]
        r = client.post(f"{base}/api/v1/batches/{batch_id}/files", files=files, timeout=600)
        r.raise_for_status()
        client.post(f"{base}/api/v1/batches/{batch_id}/start", timeout=60).raise_for_status()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(upload_group, range(0, len(images), group)))


def main() -> None:  # noqa: PLR0915 - one linear script
    """Run the benchmark and print (and optionally save) the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=1000, help="end-to-end batch size (default 1000)")
    ap.add_argument("--memory-studies", type=int, default=5000, help="studies for the memory run (0: skip)")
    ap.add_argument("--upload-group", type=int, default=100, help="files per upload request")
    ap.add_argument(
        "--chunk-size", type=int, help="CXR_CHUNK_SIZE for web and worker (default: the setting's)"
    )
    ap.add_argument("--concurrency", type=int, default=1, help="worker pool processes (default 1)")
    ap.add_argument("--pool", default="prefork", help="Celery pool of the worker (prefork, solo, threads)")
    ap.add_argument(
        "--worker-threads", type=int, help="CXR_SERVE_THREADS of each worker process (raw keeps its default)"
    )
    ap.add_argument(
        "--layout",
        choices=("shared", "split"),
        default="shared",
        help="shared: every process on every core; split (needs 2+ cores): inference (raw, worker) on the "
        "last core with 1 thread, web + PostgreSQL + Redis + upload client on the others",
    )
    ap.add_argument("--upload-workers", type=int, default=2, help="parallel upload requests")
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    ap.add_argument(
        "--model-dir",
        type=Path,
        help="model artifact (default: the committed default); a copy is served, so a retrain that replaces "
        "the artifact during the run cannot give raw and worker different models",
    )
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    infer_cpus, rest_cpus = set(cpus), set(cpus)
    if args.layout == "split":
        if len(cpus) < 2:
            sys.exit("--layout split needs at least 2 cores")
        infer_cpus, rest_cpus = {cpus[-1]}, set(cpus[:-1])
        args.worker_threads = args.worker_threads or 1
        os.environ["CXR_SERVE_THREADS"] = str(args.worker_threads)  # raw runs with the worker's threads
    me = [os.getpid()]
    restore: dict[int, set[int]] = {}
    images = load_images(args.studies)
    data = [d for _, d in images]
    report: dict[str, object] = {"studies": args.studies, "cpus": os.cpu_count(), "layout": args.layout}

    admin, db_name, url = create_database(args.pg_admin_url, "cxr_bench_")
    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    procs = []
    sampler = None
    tmp: Path | None = None
    try:
        migrate.upgrade(url)
        with session_scope(url) as s:
            user = create_user(s, username="bench", password="bench password 123", role=Role.ADMIN)
            token = issue_api_token(s, user=user)
            user_id = user.id
        tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
        from model.serve import DEFAULT_ARTIFACT_DIR

        model_dir = tmp / "model"
        shutil.copytree(args.model_dir or DEFAULT_ARTIFACT_DIR, model_dir)
        extra: dict[str, object] = {"model_dir": model_dir}
        if args.chunk_size:
            extra["chunk_size"] = args.chunk_size
        if args.worker_threads:
            extra["serve_threads"] = args.worker_threads
        env = service_env(tmp, database_url=url, broker_url=args.redis_url, **extra)
        settings = settings_from_env(env)
        chunk = settings.chunk_size

        # 1. Raw model throughput, alone (of this benchmark's processes). Measured again after the end-to-end
        # run and averaged: on a shared machine the available CPU drifts during the run.
        pin(me, infer_cpus)
        rate_before, version, raw_cpu_before = raw_rate(data, chunk, model_dir)
        report.update(model_version=version, chunk_size=chunk)
        print(f"raw model: {rate_before:.1f} studies/s (model {version}, chunks of {chunk})", flush=True)

        web, base = start_web(env)
        procs.append(web)
        worker = start_worker(env, concurrency=args.concurrency, pool=args.pool)
        procs.append(worker)
        if args.layout == "split":
            pin(process_tree(worker.pid), infer_cpus)
            pin(process_tree(web.pid), rest_cpus)
            # The machine's own servers: their previous affinity is restored in `finally`.
            for server in ("postgres", "redis-server"):
                for pid in pids_named(server):
                    for tid, mask in pin(process_tree(pid), rest_cpus).items():
                        restore.setdefault(tid, mask)  # the first reading is the original
            pin(me, rest_cpus)  # the upload client belongs with the web side
            print(
                f"layout split: raw + worker on CPU {sorted(infer_cpus)}, {args.worker_threads} thread(s); "
                f"web, PostgreSQL, Redis and the upload client on CPU {sorted(rest_cpus)}",
                flush=True,
            )
        sampler = RssSampler(worker.pid)
        sampler.start()
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {token}"

        # 2. Upload-to-first-result latency on an idle system (median of 3).
        latencies = []
        for i in range(3):
            time.sleep(1.0)
            before = counts(url)[0]
            t0 = time.monotonic()
            r = api.post(
                f"{base}/api/v1/batches",
                data={"name": f"latency {i}", "start": "true"},
                files=[("files", images[i])],
                timeout=60,
            )
            r.raise_for_status()
            latencies.append(wait_finished(url, before + 1, 60, poll=0.005) - t0)
        report["idle_upload_to_result_s"] = round(statistics.median(latencies), 3)
        print(
            f"idle upload -> first result: {statistics.median(latencies) * 1000:.0f} ms (median of 3)",
            flush=True,
        )

        # 3. End to end through the web API: groups uploaded and started while the worker already runs.
        before = counts(url)[0]
        cpu0 = snapshot()
        t0 = time.monotonic()
        r = api.post(f"{base}/api/v1/batches", json={"name": f"bench {args.studies}"}, timeout=60)
        r.raise_for_status()
        batch_id = r.json()["id"]

        upload_batch(base, token, batch_id, images, group=args.upload_group, workers=args.upload_workers)
        uploaded = time.monotonic()
        t1 = wait_finished(url, before + args.studies, 3600, poll=0.1)
        e2e = args.studies / (t1 - t0)
        cpu_parts = cpu_between(cpu0, snapshot())
        stop_all([web])  # the web's idle threads must not share the CPU with the second raw measurement
        procs.remove(web)
        pin(me, infer_cpus)
        rate_after, _, raw_cpu_after = raw_rate(data, chunk, model_dir)
        pin(me, rest_cpus)
        rate = (rate_before + rate_after) / 2
        raw_cpu = (raw_cpu_before + raw_cpu_after) / 2
        print(f"raw model again: {rate_after:.1f} studies/s; mean {rate:.1f}", flush=True)
        report.update(
            raw_studies_per_s=round(rate, 1), raw_before=round(rate_before, 1), raw_after=round(rate_after, 1)
        )
        with session_scope(url) as s:
            prog = batch_progress(s, batch_ids=[batch_id])[batch_id]
        report.update(
            e2e_studies_per_s=round(e2e, 1),
            ratio_e2e_to_raw=round(e2e / rate, 2),
            upload_s=round(uploaded - t0, 1),
            after_last_upload_s=round(t1 - uploaded, 1),
            e2e_done=prog.done,
            e2e_failed=prog.failed,
        )
        print(
            f"end to end: {e2e:.1f} studies/s = {e2e / rate:.2f} x raw "
            f"({prog.done} DONE, {prog.failed} FAILED; "
            f"uploads took {uploaded - t0:.1f} s, the last results {t1 - uploaded:.1f} s after)",
            flush=True,
        )

        # CPU per study, which (unlike studies/s) other jobs on a shared machine do not change much: what
        # the model costs alone, and what each part of the service spent during the end-to-end run.
        per_study = {part: cpu * 1000.0 / args.studies for part, cpu in cpu_parts.items()}
        overhead = sum(per_study.values()) - raw_cpu
        report["cpu_ms_per_study"] = {"raw_model": round(raw_cpu, 2)} | {
            k: round(v, 2) for k, v in sorted(per_study.items())
        }
        print(f"CPU per study: raw model {raw_cpu:.2f} ms; during end to end:", flush=True)
        for part, ms in sorted(per_study.items(), key=lambda kv: -kv[1]):
            print(f"  {part:42s} {ms:6.2f} ms", flush=True)
        if args.layout == "shared":
            ceiling = raw_cpu / (raw_cpu + overhead)
            why = (
                f"everything beyond the model: {overhead:.2f} ms of CPU per study -> with every part sharing "
                f"these cores, end to end cannot beat {ceiling:.2f} x raw "
                f"(0.7 needs <= {raw_cpu * 3 / 7:.2f} ms)"
            )
        else:
            worker_ms = per_study.get("worker", 0.0)
            ceiling = raw_cpu / worker_ms if worker_ms else 0.0
            why = (
                f"inference core: the worker spends {worker_ms:.2f} ms per study where raw spends "
                f"{raw_cpu:.2f} -> end to end cannot beat {ceiling:.2f} x raw; the other core(s) spend "
                f"{sum(per_study.values()) - worker_ms:.2f} ms per study on web, PostgreSQL, Redis and "
                "the client"
            )
        report["ratio_ceiling"] = round(ceiling, 2)
        print(f"  {why}", flush=True)

        # 4. Worker memory over many studies (enqueued through store/: the worker is what is measured).
        if args.memory_studies:
            app = make_celery(settings, set_as_current=False)
            step = 1000
            rss_at: list[tuple[int, int, int]] = []
            done_before = counts(url)[0]
            with session_scope(url) as s:
                from store.tables import User

                batch = create_batch(s, owner=s.get(User, user_id), name=f"memory {args.memory_studies}")
                ids = add_studies(
                    s,
                    batch=batch,
                    files=[
                        {"filename": images[i % len(images)][0], "data": data[i % len(data)]}
                        for i in range(args.memory_studies)
                    ],
                )
                mark_queued(s, study_ids=ids, lease_s=3600)
            t_sent = time.monotonic()
            send_screen_chunks(ids, app=app)
            for k in range(step, args.memory_studies + 1, step):
                wait_finished(url, done_before + k, 3600, poll=0.1)
                tree = proc_tree_rss_kib(worker.pid)
                total_rss = sum(v[0] for v in tree.values())
                child_hwm = max((v[1] for p, v in tree.items() if p != worker.pid), default=0)
                rss_at.append((k, total_rss, child_hwm))
                print(
                    f"  after {k:5d} studies: worker RSS {total_rss / 1024:.0f} MiB, "
                    f"pool process peak {child_hwm / 1024:.0f} MiB",
                    flush=True,
                )
            report["memory"] = [
                {"studies": k, "worker_rss_mib": round(r / 1024), "pool_peak_mib": round(h / 1024)}
                for k, r, h in rss_at
            ]
            store_rate = args.memory_studies / (time.monotonic() - t_sent)
            report["store_path_studies_per_s"] = round(store_rate, 1)
            print(
                f"store path (no web): {store_rate:.1f} studies/s = {store_rate / rate:.2f} x raw", flush=True
            )
            growth = (rss_at[-1][2] - rss_at[0][2]) / 1024
            report["pool_peak_growth_mib_first_to_last"] = round(growth, 1)
        sampler.stop_flag.set()
        sampler.join()
        report["worker_peak_rss_mib"] = round(sampler.peak_kib / 1024)
        print(f"worker peak RSS over the run: {sampler.peak_kib / 1024:.0f} MiB", flush=True)
        with session_scope(url) as s:
            dupes = s.execute(
                select(Prediction.study_id).group_by(Prediction.study_id).having(func.count() > 1)
            ).all()
            served = sorted(
                s.scalars(
                    select(ModelVersion.version)
                    .join(Prediction, Prediction.model_version_id == ModelVersion.id)
                    .distinct()
                )
            )
        report["duplicate_predictions"] = len(dupes)
        report["worker_model_versions"] = served
        print(f"(duplicate predictions: {len(dupes)}; worker served {', '.join(served)})", flush=True)
    finally:
        for tid, mask in restore.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        if sampler is not None:
            sampler.stop_flag.set()
        stop_all(procs)
        dispose_all()
        if tmp is not None:
            shutil.rmtree(tmp / "model", ignore_errors=True)  # the logs stay for a look after a failed run
        drop_database(admin, db_name)
        redis.Redis.from_url(args.redis_url).flushdb()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
