"""Prometheus multiprocess mode for a Celery prefork worker, set up BEFORE prometheus_client is imported.

prometheus_client picks its value store once, when first imported: with PROMETHEUS_MULTIPROC_DIR set, every
process writes its samples to files there, and one collector in any process adds them up. This module never
imports prometheus_client, so `worker.main` can call it first.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The multiprocess directory of this process, if multiprocess mode is on."""
    value = os.environ.get(ENV) or os.environ.get(ENV.lower())
    return Path(value) if value else None


def use_worker_dir(root: Path) -> Path:
    """Turn multiprocess mode on for this worker and the pool children it forks; returns the directory.

    One fresh directory per worker parent (root/<host>-<pid>): its pool children write there and its exporter
    reads only there. The host name is part of it because replicas in containers sharing one data volume are
    all pid 1. Directories of this host's parents no longer alive are removed (the documented 'wipe between
    runs'); other hosts' directories are theirs to clean. An operator's own PROMETHEUS_MULTIPROC_DIR is
    respected as is.
    """
    existing = multiprocess_dir()
    if existing is not None:
        existing.mkdir(parents=True, exist_ok=True)
        return existing
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before multiprocess mode could be set up")
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"{_host()}-"
    for old in root.iterdir():
        pid = old.name.removeprefix(prefix)
        if old.is_dir() and old.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{prefix}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ[ENV] = str(path)
    return path


def _host() -> str:
    # a file-name-safe host name (containers: the container id)
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
