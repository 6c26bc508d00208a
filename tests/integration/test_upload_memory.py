"""Parallel zip bombs against a real web process (issue 13, point 3): its peak memory stays bounded and the
uploader gets a clear answer. The abuse run took the web from 0.9 GB to 3.4 GB this way."""

from __future__ import annotations

import contextlib
import json
import secrets
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from store.db import session_scope
from store.tables import User
from store.users import issue_api_token
from tests.conftest import make_user
from tests.intake.test_inflation import zeros_zip
from tests.procs import service_env, start_web, stop
from tests.web.conftest import png_bytes

MiB = 2**20
PARALLEL = 4
# The web's budget of bytes in flight for this test (CXR_MAX_INFLIGHT_BYTES), and what else a request may
# allocate beside it (request parsing, the zip's central directory, SQL rows, allocator slack).
INFLIGHT = 96 * MiB
SLACK = 64 * MiB


def _vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory field (VmHWM, VmRSS) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _reset_peak(pid: int) -> int:
    """Reset the process's peak RSS where the kernel allows it; return the peak to measure from."""
    # Where it is not allowed, the peak so far (after the warm-up) is the baseline.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _vm(pid, "VmHWM")


def _post(base: str, token: str, files: list[tuple[str, bytes]]) -> tuple[int, dict, str | None]:
    """POST /api/v1/batches with these files (multipart); (status, JSON body, Retry-After)."""
    boundary = "cxr" + secrets.token_hex(8)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbombs\r\n'.encode()]
    for name, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(
        f"{base}/api/v1/batches",
        data=b"".join(parts),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers.get("Retry-After")


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.hardening("4 parallel zip bombs: web peak memory within its budget, clear 413/429")
def test_parallel_zip_bombs_keep_the_web_within_its_budget(pg_url: str, data_dir: Path) -> None:
    """Four parallel uploads of 0.5 MB zips each holding a 500 MB member: each is refused with a 413 naming
    the per-file limit, before anything inflates. Then four parallel zips of four 48 MB members each (every
    member within the limits, so each really inflates, a chunk at a time): each is stored as failed rows or
    refused as busy (429, Retry-After, naming CXR_MAX_INFLIGHT_BYTES). Through both, the web process's peak
    RSS (VmHWM) grows by at most its in-flight budget (96 MB here) plus 64 MB. PostgreSQL, so that the
    uploads really run in parallel (SQLite's write lock would queue them)."""
    make_user(pg_url, "uploader")
    with session_scope(pg_url) as s:
        token = issue_api_token(s, user=s.query(User).filter(User.username == "uploader").one())
    env = service_env(data_dir, database_url=pg_url, max_inflight_bytes=INFLIGHT)
    web, base = start_web(env)
    try:
        status, body, _ = _post(base, token, [("warm.png", png_bytes(256, 256))])
        assert status == 201, body
        bomb = zeros_zip({"scan.png": 500 * MiB})
        many = zeros_zip({f"part{i}.png": 48 * MiB for i in range(4)})
        assert len(bomb) < MiB and len(many) < MiB
        baseline = _reset_peak(web.pid)
        with ThreadPoolExecutor(PARALLEL) as pool:
            bombs = list(pool.map(lambda _: _post(base, token, [("bomb.zip", bomb)]), range(PARALLEL)))
        for status, body, _ in bombs:
            assert status == 413, body
            assert "expands beyond 64 MB (bomb.zip/scan.png), the limit per file" in body["error"]
        with ThreadPoolExecutor(PARALLEL) as pool:
            heavy = list(pool.map(lambda _: _post(base, token, [("many.zip", many)]), range(PARALLEL)))
        for status, body, retry in heavy:
            if status == 429:
                assert "CXR_MAX_INFLIGHT_BYTES" in body["error"] and int(retry) > 0, body
            else:
                assert status == 201 and body["progress"]["failed"] == 4, body
        grown = _vm(web.pid, "VmHWM") - baseline
        print(f"peak RSS grew {grown / MiB:.0f} MiB; statuses {[s for s, _, _ in heavy]}")
        assert grown <= INFLIGHT + SLACK, f"peak RSS grew {grown / MiB:.0f} MiB"
    finally:
        stop(web)
