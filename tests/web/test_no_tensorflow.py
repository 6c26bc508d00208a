"""The web process never imports TensorFlow: checked in a fresh interpreter, unpolluted by other tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import io, sys
    import cv2, numpy as np
    from sqlalchemy import select
    from store import migrate
    from store.db import session_scope
    from store.tables import Study
    from store.users import create_user
    from web import create_app

    url = sys.argv[1]
    migrate.upgrade(url)
    with session_scope(url) as s:
        create_user(s, username="u1", password="correct horse battery")
    app = create_app({"DATABASE_URL": url, "WTF_CSRF_ENABLED": False})
    c = app.test_client()
    assert c.post("/login", data={"username": "u1", "password": "correct horse battery"}).status_code == 302
    from tests.procs import film_gray  # a real film: a blank square is refused at upload (validity gate)

    ok, png = cv2.imencode(".png", film_gray(64, 64, 1))
    files = [(io.BytesIO(png.tobytes()), "a.png"), (io.BytesIO(b"bad"), "b.png")]
    r = c.post("/batches/new", data={"name": "b", "files": files}, content_type="multipart/form-data")
    assert r.status_code == 302, r.status_code
    with session_scope(url) as s:
        batch_id = s.scalars(select(Study.batch_id)).first()
    for path in (f"/batches/{batch_id}", f"/batches/{batch_id}/report.csv", "/", "/admin/users"):
        assert c.get(path).status_code in (200, 403), path
    # The real sender ran (worker.app, embedded filesystem broker under the data dir): messages are waiting.
    from pathlib import Path
    assert "worker.app" in sys.modules
    queued = list((Path(sys.argv[2]) / "broker" / "queue").iterdir())
    assert queued, "nothing was enqueued"
    heavy = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith(("tensorflow.", "keras")))
    print("HEAVY", heavy)
    assert not heavy, heavy
    """
)


def test_web_never_imports_tensorflow(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'notf.sqlite3'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_DATA_DIR=str(tmp_path / "var"), CXR_ENV="test", CXR_BROKER_URL="filesystem://")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, url, str(tmp_path / "var")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout
