"""Fixtures for the model tests: shared data locations (skipped when absent) and the committed samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CXR_TF_THREADS", "2")

from model import PACKAGE_DIR, shared_data_dir  # noqa: E402

SAMPLES = PACKAGE_DIR / "samples"


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """../shared/data/dicom, or skip."""
    d = shared_data_dir("dicom")
    if not (d / "manifest.csv").exists():
        pytest.skip(
            f"DICOM fixtures not found at {d} (the shared data folder sits beside the repository in CI)"
        )
    return d


@pytest.fixture(scope="session")
def cxr_dir() -> Path:
    """../shared/data/cxr, or skip."""
    d = shared_data_dir("cxr")
    if not (d / "manifest.csv").exists():
        pytest.skip(
            f"training data not found at {d} (the shared data folder sits beside the repository in CI)"
        )
    return d


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    """The six committed sample images."""
    files = sorted(SAMPLES.glob("*.jpg"))
    assert len(files) == 6
    return files
