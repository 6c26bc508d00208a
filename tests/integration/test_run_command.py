"""`cxr run` as a user runs it: migrations, first admin, web + worker + beat, a batch via the API, Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from store.db import session_scope
from store.tables import Role, User
from store.users import issue_api_token
from tests.integration.helpers import CORRUPT_PNG
from tests.procs import REPO_ROOT, free_port, log_tail, sample_images, service_env, wait_for

pytestmark = pytest.mark.slow


def test_cxr_run_serves_a_batch_and_ctrl_c_stops_everything(data_dir: Path, procs: list) -> None:
    """The embedded stack end to end through the JSON API; SIGINT stops web, worker and beat."""
    port = free_port()
    url = f"sqlite:///{data_dir / 'cxr.sqlite3'}"
    env = service_env(data_dir, database_url=url, port=port)
    del env["CXR_DATABASE_URL"]  # `cxr run`'s own default: SQLite under the data dir
    log = data_dir / "run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen(
            [sys.executable, "-c", "from cli.main import main; main()", "run"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run.log_path = log  # type: ignore[attr-defined]
    procs.append(run)

    def announced() -> str | None:
        if run.poll() is not None:
            pytest.fail(f"cxr run exited with {run.returncode}:\n{log_tail(run)}")
        m = re.search(r"running at (http://\S+)", log.read_text(errors="replace"))
        return m.group(1) if m else None

    base = wait_for(announced, 120, message="cxr run to print its URL").rstrip("/")
    text = log.read_text(errors="replace")
    assert re.search(r"first admin account: user 'admin', password '\S+'", text), text
    wait_for(lambda: "cxr worker process ready" in log.read_text(errors="replace"), 120, message="the worker")

    with session_scope(url) as session:
        admin = session.query(User).filter_by(role=Role.ADMIN).one()
        token = issue_api_token(session, user=admin)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"
    files = [("files", f) for f in sample_images(3)] + [("files", ("broken.png", CORRUPT_PNG))]
    r = api.post(
        f"{base}/api/v1/batches", data={"name": "run test", "start": "true"}, files=files, timeout=60
    )
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]

    def batch_finished() -> dict | None:
        body = api.get(f"{base}/api/v1/batches/{batch_id}", timeout=10).json()
        return body if body["progress"]["finished"] else None

    body = wait_for(batch_finished, 120, message="the batch to finish")
    assert (body["progress"]["done"], body["progress"]["failed"]) == (3, 1), body

    run.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends (children are in their own sessions)
    assert run.wait(40) == 0, log_tail(run)
    assert "stopped." in log.read_text(errors="replace")
    assert not _processes_with_env(f"CXR_DATA_DIR={data_dir}"), "web, worker or beat left running"


def _processes_with_env(entry: str) -> list[int]:
    """Pids of live processes whose environment holds entry (the children of this `cxr run`)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found
