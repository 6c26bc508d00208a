"""A small real dataset (from ../shared/data/cxr at test time) and a tiny serving model trained on it."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, require_shared_data

PER_CLASS = 90  # enough for a locked test split where a shuffled-label model is measurably worse
TINY_EPOCHS = 6


def build_small_dataset(dest: Path, per_class: int = PER_CLASS) -> Path:
    """Copy a deterministic, source-balanced subset of the shared data with its manifest into dest."""
    src = SHARED_DATA / "cxr"
    with open(src / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["file"]):
        by_label[r["label"]].append(r)
    picked = []
    for _label, items in sorted(by_label.items()):
        # every 'step'-th image: deterministic and spread over all sources of the class
        step = max(1, len(items) // per_class)
        picked += items[::step][:per_class]
    dest.mkdir(parents=True, exist_ok=True)
    for r in picked:
        (dest / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["file"], dest / r["file"])
    with open(dest / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(picked)
    return dest


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small dataset folder (manifest.csv + class folders)."""
    require_shared_data()
    return build_small_dataset(tmp_path_factory.mktemp("small-cxr"))


@pytest.fixture(scope="session")
def tiny_current(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny-architecture model honestly trained on the small dataset: (artifact dir, split file)."""
    from model.pipeline import Recipe, develop

    root = tmp_path_factory.mktemp("tiny-current")
    split = root / "split.csv"
    develop(
        small_data,
        root / "artifact",
        recipe=Recipe(arch="tiny", epochs=TINY_EPOCHS),
        split_path=split,
        runs_dir=root / "runs",
        log=lambda _m: None,
    )
    return root / "artifact", split
