"""Machine learning for chest X-ray screening: preprocessing, networks, training, evaluation, serving.

Importing this package is cheap: TensorFlow is only imported inside the modules that need it
(network, train, evaluate, explain) and lazily inside serve.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")
DEFAULT_SPLIT = PACKAGE_DIR / "splits" / "cxr_split_v1.csv"


def shared_data_dir(*parts: str) -> Path:
    """Return `<repo root>/../shared/data/<parts>` (where CI puts the shared data beside the clone)."""
    return REPO_ROOT.parent.joinpath("shared", "data", *parts)
