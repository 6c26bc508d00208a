"""Helpers that run the REAL service processes in tests (Celery worker, beat, web) and wait on them.

Every process is started in its own session (process group) with its output in a log file, so that
- `stop(proc)` sends SIGTERM to the process (warm shutdown), waits, then SIGKILLs the whole group;
- `stop_all(procs)` does the same for several processes in parallel (a Celery warm shutdown takes seconds);
- `kill(proc)` SIGKILLs the whole group at once, like a machine losing power (fault tests);
- a failed start shows the log tail in the assertion message (`log_tail(proc)`).

Typical use:

    env = service_env(tmp_path, database_url=url)              # embedded broker under tmp_path
    worker = start_worker(env)                                 # returns once the model is loaded
    app = make_celery(settings_from_env(env), set_as_current=False)
    ... create studies, commit, send_screen_chunks(ids, app=app) ...
    wait_for(lambda: batch_finished(url, batch_id), timeout=120)
    stop(worker)

`sample_images(n)` returns (file name, bytes) pairs: model/samples/ if present, else ../shared/data/cxr
(mlwg/nih/kermany sources), or skips the test when neither is there (fails it under CI=true).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "model" / "samples"
SHARED_CXR = REPO_ROOT.parent / "shared" / "data" / "cxr"
# Sources whose licences allow committing them as fixtures; reading any of them at test time is fine.
FIXTURE_SOURCES = ("mlwg", "nih", "kermany")
WORKER_READY_MARK = "cxr worker process ready"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


def service_env(
    data_dir: Path, *, database_url: str, broker_url: str | None = None, **extra: Any
) -> dict[str, str]:
    """Environment for a service process: CXR_ settings (embedded broker by default) + PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_ENV": "test",
            "CXR_DATA_DIR": str(data_dir),
            "CXR_DATABASE_URL": database_url,
            "CXR_BROKER_URL": broker_url or "filesystem://",
            # No nightly retraining in a test's beat unless a test asks for it.
            "CXR_RETRAIN_CRON": "off",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
            # Keep TensorFlow's C++ start-up chatter out of the logs the tests read.
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # `cxr run` starts the DICOM receiver too: never on the default port another run may hold.
            "CXR_DICOM_PORT": str(free_port()),
        }
    )
    env.update({(k if k.startswith("CXR_") else "CXR_" + k.upper()): str(v) for k, v in extra.items()})
    return env


def settings_from_env(env: Mapping[str, str]):  # noqa: ANN201
    """config.Settings as a process started with env would load them."""
    from config import load_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("CXR_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.startswith("CXR_")})
        return load_settings()
    finally:
        for k in [k for k in os.environ if k.startswith("CXR_")]:
            del os.environ[k]
        os.environ.update(saved)


def _spawn(args: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the child's exit; the Popen keeps the fd
    proc = subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen, chars: int = 4000) -> str:
    """The end of a process's log file."""
    path: Path | None = getattr(proc, "log_path", None)
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


def wait_for(
    predicate: Callable[[], Any], timeout: float, *, interval: float = 0.2, message: str = ""
) -> Any:
    """Poll predicate until it returns something truthy (returned); fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {message or predicate}")
        time.sleep(interval)


def start_worker(
    env: Mapping[str, str],
    *,
    log_path: Path | None = None,
    app: str = "worker.main",
    pool: str = "prefork",
    concurrency: int = 1,
    queues: str = "inference,training",
    ready_timeout: float = 180.0,
    wait_ready: bool = True,
    prefix: Sequence[str] = (),
) -> subprocess.Popen:
    """Start a real `celery worker`; by default return once its pool process has loaded the model.

    prefix: a command the worker is started through (e.g. `ip netns exec NS ...`, which must exec it).
    """
    log_path = log_path or Path(env["CXR_DATA_DIR"]) / f"worker-{time.monotonic_ns()}.log"
    args = [*prefix, sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "--pool", pool]
    args += ["--concurrency", str(concurrency), "--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    args += ["--hostname", f"test-{time.monotonic_ns()}@%h"]
    proc = _spawn(args, env, log_path)
    if wait_ready:
        wait_workers_ready([proc], ready_timeout)
    return proc


def wait_workers_ready(workers: Sequence[subprocess.Popen], timeout: float = 180.0) -> None:
    """Wait until every worker's pool process has loaded the model (fail at once if one exits)."""

    def ready() -> bool:
        for proc in workers:
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode} while starting:\n{log_tail(proc)}")
        return all(WORKER_READY_MARK in proc.log_path.read_text(errors="replace") for proc in workers)

    wait_for(ready, timeout, interval=0.25, message="the worker(s) to load the model")


def start_beat(
    env: Mapping[str, str], *, log_path: Path | None = None, schedule: str = "celerybeat-schedule"
) -> subprocess.Popen:
    """Start a real `celery beat` with its schedule file (name under the data dir: one per beat)."""
    data_dir = Path(env["CXR_DATA_DIR"])
    log_path = log_path or data_dir / f"beat-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "celery", "-A", "worker.main", "beat", "--loglevel", "INFO"]
    args += ["--schedule", str(data_dir / schedule)]
    return _spawn(args, env, log_path)


def start_redis_server(port: int, data_dir: Path, *, timeout: float = 30.0) -> subprocess.Popen:
    """A throwaway `redis-server` on its own port keeping nothing (no RDB, no AOF); returns once it listens.

    Fails under CI=true (skips elsewhere) when redis-server is not installed.
    """
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(reason + " and CI=true requires it")
        pytest.skip(reason)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(data_dir)]
    proc = _spawn(args, {"PATH": os.environ.get("PATH", "")}, data_dir / f"redis-{port}.log")

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited with {proc.returncode}:\n{log_tail(proc)}")
        return port_open(port)

    wait_for(up, timeout, interval=0.05, message=f"redis-server on port {port}")
    return proc


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_web(
    env: Mapping[str, str],
    *,
    port: int | None = None,
    log_path: Path | None = None,
    timeout: float = 60.0,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    threads: int = 4,
) -> tuple[subprocess.Popen, str]:
    """Start the web app under waitress (as `cxr run` does); return the process and its base URL when up.

    host: the address it listens on; prefix: a command it is started through (as for start_worker).
    """
    port = port or free_port()
    log_path = log_path or Path(env["CXR_DATA_DIR"]) / f"web-{port}.log"
    args = [*prefix, sys.executable, "-m", "waitress", "--host", host, "--port", str(port)]
    args += ["--threads", str(threads)]
    args += ["--call", "web:create_app"]
    proc = _spawn(args, env, log_path)

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"web exited with {proc.returncode} while starting:\n{log_tail(proc)}")
        return port_open(port, host)

    wait_for(up, timeout, message=f"the web app on {host}:{port}")
    return proc, f"http://{host}:{port}"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen, timeout: float = 20.0, *, terminate: bool = True) -> int | None:
    """SIGTERM the process (warm shutdown), wait for it, then SIGKILL its group; returns its exit code."""
    if terminate and proc.poll() is None:
        # Only the main process: Celery's parent stops its pool children itself; signalling them too
        # makes the parent replace a child it sees die (loading the model again) during shutdown.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(10)
    # Reap stragglers of the group (a pool child outliving its parent).
    _signal_group(proc, signal.SIGKILL)
    return proc.returncode


def stop_all(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """stop() several processes at once: all get SIGTERM first, so their shutdowns overlap."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        stop(proc, timeout=max(0.1, deadline - time.monotonic()), terminate=False)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group at once (no warm shutdown, nothing acknowledged)."""
    _signal_group(proc, signal.SIGKILL)
    proc.wait(10)


def sample_images(n: int) -> list[tuple[str, bytes]]:
    """n (file name, bytes) chest X-rays: model/samples/ first, else shared data; skips when neither has n."""
    files: list[Path] = []
    if SAMPLES_DIR.is_dir():
        files = sorted(p for p in SAMPLES_DIR.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < n and (SHARED_CXR / "manifest.csv").exists():
        import csv

        with open(SHARED_CXR / "manifest.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["source"] in FIXTURE_SOURCES]
        # Interleave the classes so every batch exercises all three outputs.
        by_label: dict[str, list[Path]] = {}
        for r in rows:
            by_label.setdefault(r["label"], []).append(SHARED_CXR / r["file"])
        pools = [sorted(v) for _, v in sorted(by_label.items())]
        for i in range(max(len(p) for p in pools)):
            files += [p[i] for p in pools if i < len(p)]
    if len(files) < n:
        reason = f"need {n} sample images; none in {SAMPLES_DIR} and {SHARED_CXR} is absent or too small"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(reason + " (CI=true requires them)")
        pytest.skip(reason)
    return [(p.name, p.read_bytes()) for p in files[:n]]


@functools.cache
def _films() -> tuple[np.ndarray, ...]:
    # The committed demo films (model/samples, redistributable sources): uploads must look like chest films,
    # or the validity gate at intake refuses them, as it should. Only films the gate takes with a clear
    # margin even squashed to 64 x 64 (one COVID figure is borderline there), so a fixture never flips.
    from intake.validity import assess_gray

    paths = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    films = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
    kept = []
    for img in films:
        small = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        stretched = (small - small.min()) / max(1e-6, float(small.max() - small.min()))
        if all((v := assess_gray(x)).ok and (v.score or 0.0) > 2.0 for x in (small, stretched)):
            kept.append(img)
    return tuple(kept)


def film_gray(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    """A real chest film resized to w x h, different bytes for each seed (a few pixels nudged by one)."""
    films = _films()
    img = cv2.resize(films[seed % len(films)], (w, h), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, img.size, 8)
    flat = img.reshape(-1)
    flat[idx] = np.where(flat[idx] < 255, flat[idx] + 1, flat[idx] - 1)
    return img
