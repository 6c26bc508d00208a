"""The patient-level split, metrics, temperature scaling and triage thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model import DEFAULT_SPLIT
from model.calibrate import (
    BANDS,
    COVID_SENSITIVITY_TARGET,
    fit_temperature,
    fit_thresholds,
    nll,
    softmax,
    triage,
)
from model.data import Record, make_split, read_dataset, read_split, write_split
from model.metrics import ece, wilson


def test_committed_split_is_by_patient_and_covers_every_stratum() -> None:
    split = read_split(DEFAULT_SPLIT)  # raises if a patient is in two splits
    n = {k: len(v) for k, v in split.items()}
    assert sum(n.values()) == 1701
    assert 0.65 < n["train"] / 1701 < 0.75 and 0.12 < n["test"] / 1701 < 0.18
    strata = {(r.label, r.source) for r in split["train"]}
    for k in ("val", "test"):
        assert {(r.label, r.source) for r in split[k] if (r.label, r.source) != ("normal", "fig1")} <= strata


def test_split_is_reproducible_from_the_data(cxr_dir: Path, tmp_path: Path) -> None:
    records = read_dataset(cxr_dir)
    write_split(records, make_split(records), tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text() == DEFAULT_SPLIT.read_text()


def test_split_keeps_patients_together() -> None:
    recs = [Record(f"f{i}.jpg", "covid" if i % 2 else "normal", "a", f"p{i // 4}") for i in range(200)]
    assignment = make_split(recs, seed=3)
    assert set(assignment) == {f"p{i}" for i in range(50)}
    assert set(assignment.values()) == {"train", "val", "test"}


def test_class_folder_reader(tmp_path: Path, sample_files: list[Path]) -> None:
    for f in sample_files:
        label = f.name.split("_", 1)[0]
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f.name).write_bytes(f.read_bytes())
    recs = read_dataset(tmp_path)
    assert len(recs) == 6 and {r.label for r in recs} == {"covid", "normal", "pneumonia"}


def test_wilson_and_ece() -> None:
    p, lo, hi = wilson(95, 100)
    assert p == 0.95 and lo < 0.95 < hi and hi <= 1
    probs = np.array([[0.9, 0.05, 0.05]] * 10)
    y = np.array([0] * 9 + [1])
    assert abs(ece(probs, y)) < 1e-9


def test_temperature_and_thresholds() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), y] += 2.0
    t = fit_temperature(3.0 * logits, y)  # overconfident logits need T > 1
    assert t > 1.2
    assert nll(3.0 * logits, y, t) < nll(3.0 * logits, y, 1.0)
    probs = softmax(logits)
    thr = fit_thresholds(probs, y)
    flagged = probs[y == 0, 0] >= thr["covid"]
    assert flagged.mean() >= COVID_SENSITIVITY_TARGET
    assert triage(np.array([0.9, 0.05, 0.05]), thr) == BANDS[0]
    assert triage(np.array([0.0, 0.5, 0.5]), {"covid": 0.2, "pneumonia": 0.9, "normal": 0.9}) == BANDS[3]
