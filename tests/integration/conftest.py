"""Fixtures for tests that run real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import kill


@pytest.fixture
def procs() -> Iterator[list]:
    """Append every started process here; all are killed after the test, even when it fails.

    SIGKILL, not a warm shutdown: the test's checks are done, and a Celery warm shutdown on the embedded
    broker takes ~6 s per worker (test_run_command covers the clean stop).
    """
    started: list = []
    yield started
    for proc in started:
        kill(proc)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """CXR_DATA_DIR of the service processes (embedded broker folders, logs)."""
    path = tmp_path / "data"
    path.mkdir()
    return path
