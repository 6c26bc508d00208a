"""Fixtures for tests that run real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import stop


@pytest.fixture
def procs() -> Iterator[list]:
    """Append every started process here; all are stopped after the test, even when it fails."""
    started: list = []
    yield started
    for proc in reversed(started):
        stop(proc, timeout=15)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """CXR_DATA_DIR of the service processes (embedded broker folders, logs)."""
    path = tmp_path / "data"
    path.mkdir()
    return path
