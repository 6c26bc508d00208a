"""`cxr run` (the whole service on this machine) and the single-process commands used in production.

`cxr run` applies migrations to the embedded SQLite database, creates a first admin if there is none, then
runs the web app (waitress), a Celery worker for screening, a Celery worker for retraining (so a training run
never holds up screening), Celery beat and the DICOM C-STORE receiver (CXR_DICOM_PORT; 0 leaves it out),
on the embedded filesystem broker (or whatever CXR_DATABASE_URL / CXR_BROKER_URL say). Ctrl-C stops them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from config import PROJECT_ROOT, Settings, load_settings
from store import migrate
from store.db import session_scope
from store.users import ensure_admin

STOP_TIMEOUT_S = 20.0


def _default_port() -> int:
    return load_settings().port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def web_args(host: str, port: int, threads: int = 8) -> list[str]:
    """Command line of the web process (waitress serving web.create_app)."""
    args = [sys.executable, "-m", "waitress", "--host", host, "--port", str(port)]
    return args + ["--threads", str(threads), "--call", "web:create_app"]


def worker_args(
    *, queues: str = "inference,training", pool: str = "prefork", concurrency: int = 1, loglevel: str = "INFO"
) -> list[str]:
    """Command line of a Celery worker on these queues.

    prefork (even with one process) is the default: the model loads in the pool child after fork, the soft and
    hard time limits are enforced (the solo pool ignores them), and a child killed by a poison image is seen
    as lost and its task requeued, where the solo pool would lose the whole worker. Measured on the embedded
    broker (SQLite, 500 studies, 2 vCPUs): solo ~200 studies/s, prefork ~140 (the prefork parent polls the
    queue folder between tasks); both far above what one person uploads.
    """
    return [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "-Q", queues] + [
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        # No broadcast chatter: on the embedded broker every broadcast is a file per worker, forever.
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        loglevel,
    ]


def beat_args(settings: Settings, *, loglevel: str = "INFO") -> list[str]:
    """Command line of Celery beat, its schedule file under the data dir."""
    schedule = settings.data_dir / "celerybeat-schedule"
    return [sys.executable, "-m", "celery", "-A", "worker.main", "beat", "--schedule", str(schedule)] + [
        "--loglevel",
        loglevel,
    ]


def dicom_args() -> list[str]:
    """Command line of the DICOM C-STORE receiver (`cxr dicom-listen`, its settings from CXR_DICOM_*)."""
    return [sys.executable, "-c", "from cli.main import main; main()", "dicom-listen"]


def _check_model(settings: Settings) -> Path:
    from model.serve import DEFAULT_ARTIFACT_DIR  # cheap: no TensorFlow, no interpreter

    artifact = settings.model_dir or DEFAULT_ARTIFACT_DIR
    if not (artifact / "meta.json").exists():
        raise click.ClickException(
            f"no model artifact at {artifact}: set CXR_MODEL_DIR to a trained artifact (see README)"
        )
    return artifact


def _terminate_all(children: dict[str, subprocess.Popen], timeout: float) -> None:
    """SIGTERM each child (warm shutdown), wait, then SIGKILL whatever is left of its process group."""
    for proc in children.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, proc in children.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            click.echo(f"{name} did not stop in {timeout:.0f} s; killing it", err=True)
        # Each child leads its own process group: this also reaps a worker's pool children.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


@click.command("run")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the web app listens on.")
@click.option("--port", type=int, default=_default_port, show_default="$CXR_PORT or 8000")
@click.option("--pool", type=click.Choice(["prefork", "solo"]), default="prefork", show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Worker processes.")
def run_command(host: str, port: int, pool: str, concurrency: int) -> None:
    """Run web, workers and beat on this machine (embedded SQLite + broker by default); Ctrl-C stops them."""
    settings = load_settings()
    _check_model(settings)
    if _port_open(host, port):
        raise click.ClickException(f"port {port} is already in use (set CXR_PORT or --port)")
    if settings.dicom_port and _port_open(settings.dicom_host, settings.dicom_port):
        raise click.ClickException(
            f"DICOM port {settings.dicom_port} is already in use (set CXR_DICOM_PORT, or 0 for no receiver)"
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        created = ensure_admin(session)
        if created:
            user, password = created
            click.echo(f"Created the first admin account: user {user.username!r}, password {password!r}")
            click.echo("This password is shown once. Sign in and change it, or reset it with `cxr user`.")

    # Children get the resolved data dir so all three agree on the database and broker folders.
    env = dict(os.environ, CXR_DATA_DIR=str(settings.data_dir), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    commands = {
        "worker": worker_args(queues="inference,explain", pool=pool, concurrency=concurrency),
        # Retraining has a worker of its own, so a training run never holds up screening.
        "trainer": worker_args(queues="training"),
        "beat": beat_args(settings),
        "web": web_args(host, port),
    }
    if settings.dicom_port:
        commands["dicom"] = dicom_args()
    children: dict[str, subprocess.Popen] = {}
    stopping = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        for name, args in commands.items():
            # A session of its own: Ctrl-C in the terminal reaches only us, and we stop the children in order.
            children[name] = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, start_new_session=True)
        url = f"http://{host}:{port}/"
        announced = False
        while not stopping["signal"]:
            dead = {n: p.returncode for n, p in children.items() if p.poll() is not None}
            if dead:
                gone = ", ".join(f"{n} exited with {c}" for n, c in dead.items())
                click.echo(f"stopping: {gone}", err=True)
                exit_code = 1
                break
            if not announced and _port_open(host, port):
                click.echo(
                    f"\nChest X-ray screening is running at {url}  (Ctrl-C stops web, workers and beat)\n"
                )
                if settings.dicom_port:
                    click.echo(
                        f"DICOM receiver: AE title {settings.dicom_ae_title} at "
                        f"{settings.dicom_host}:{settings.dicom_port}\n"
                    )
                announced = True
            time.sleep(0.25)
    finally:
        click.echo("stopping web, workers and beat ...", err=True)
        _terminate_all(children, STOP_TIMEOUT_S)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if exit_code:
        sys.exit(exit_code)
    click.echo("stopped.", err=True)


@click.command("worker")
@click.option(
    "--queues",
    type=click.Choice(["inference", "training", "inference,training"]),
    default="inference,training",
    show_default=True,
    help="Give training a worker of its own in production, so that it never holds up screening.",
)
@click.option("--pool", type=click.Choice(["prefork", "solo"]), default="prefork", show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Pool processes (one per core).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker_command(queues: str, pool: str, concurrency: int, loglevel: str) -> None:
    """Run one Celery worker (production, docker)."""
    _check_model(load_settings())
    args = worker_args(queues=queues, pool=pool, concurrency=concurrency, loglevel=loglevel)
    os.execv(args[0], args)  # become the worker: signals from the supervisor reach Celery directly


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=_default_port, show_default="$CXR_PORT or 8000")
@click.option("--threads", type=int, default=8, show_default=True)
def web_command(host: str, port: int, threads: int) -> None:
    """Serve the web app with waitress (production, docker)."""
    args = web_args(host, port, threads)
    os.execv(args[0], args)


@click.command("reconcile")
def reconcile_command() -> None:
    """Requeue studies whose lease ran out and re-send lost ones, once (beat: every CXR_RECONCILE_EVERY_S)."""
    from worker.app import INFERENCE_QUEUE, queue_depths, send_screen_chunks
    from worker.recovery import resend_lost
    from worker.screening import reconcile_once

    settings = load_settings()

    def enqueue(ids: list[int], size: int) -> int:
        return send_screen_chunks(ids, chunk_size=size)

    ids = reconcile_once(settings, enqueue=enqueue)
    lost = resend_lost(settings, queue_depth=lambda: queue_depths()[INFERENCE_QUEUE], enqueue=enqueue)
    click.echo(f"requeued {len(ids)} studies after their lease, re-sent {len(lost)} the broker lost")
