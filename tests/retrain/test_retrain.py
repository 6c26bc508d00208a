"""Retraining: the gate, a real small training run, promotion, one run at a time, a killed run's lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from config import Settings, load_settings
from model import CLASSES
from model.retrain import GateMargins, compare, gate
from store.db import session_scope
from store.model_files import stored_files
from store.models_registry import register_model_version, serving_version
from store.retraining import RETRAIN_LOCK, list_runs, start_run
from store.reviews import review_study
from store.studies import add_studies, create_batch
from store.tables import Lock, Role, RunStatus, Study, StudyStatus, User
from tests.conftest import REPO_ROOT, make_user


def _artifact(tmp: Path, name: str, y: np.ndarray, logits: np.ndarray, ece: float = 0.05) -> Path:
    """A minimal artifact directory: meta.json (temperature, thresholds, OOF ECE) and oof.csv."""
    from model.cv import save_oof
    from model.data import Record

    out = tmp / name
    out.mkdir()
    meta = {
        "temperature": 1.0,
        "thresholds": {"covid": 0.5, "pneumonia": 0.5, "normal": 0.5},
        "metrics": {"oof": {"ece": ece}},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    recs = [Record(f"img{i}.jpg", CLASSES[c], "src", f"p{i // 2}") for i, c in enumerate(y)]
    save_oof(out / "oof.csv", recs, logits, y, np.zeros(len(y), dtype=np.int64))
    return out


def _logits(y: np.ndarray, wrong: float, seed: int) -> np.ndarray:
    """Logits that are right except for a share `wrong` of studies (moved to the next class)."""
    rng = np.random.default_rng(seed)
    pred = y.copy()
    flip = rng.random(len(y)) < wrong
    pred[flip] = (pred[flip] + 1) % 3
    z = rng.normal(0, 0.1, (len(y), 3))
    z[np.arange(len(y)), pred] += 3.0
    return z


def test_gate_pairs_the_two_models_on_the_same_held_out_studies(tmp_path: Path) -> None:
    """Equal models pass; a clearly worse one fails on the bound of the paired difference; reasons say why."""
    y = np.repeat(np.arange(3), 100)
    z = _logits(y, 0.10, 1)
    serving = _artifact(tmp_path, "serving", y, z)
    same = _artifact(tmp_path, "same", y, z + 0.01)  # the same findings: the paired difference is exactly 0
    worse = _artifact(tmp_path, "worse", y, _logits(y, 0.35, 3))
    m = GateMargins(covid_sensitivity_lcb=0.02, macro_f1=0.02, ece_max=0.1)
    cmp = compare(same, serving)
    assert cmp.n == len(y)
    assert cmp.macro_f1[2] == 0.0 == cmp.macro_f1[0] - cmp.macro_f1[1]
    ok, reasons = gate(cmp, m, candidate_ece=0.05)
    assert ok, reasons
    worse_cmp = compare(worse, serving)
    assert worse_cmp.macro_f1[2] < worse_cmp.macro_f1[0] - worse_cmp.macro_f1[1] < 0, (
        "bound below the difference"
    )
    ok, reasons = gate(worse_cmp, m, candidate_ece=0.05)
    assert not ok and any("macro-F1" in r and "below" in r for r in reasons)
    ok, reasons = gate(cmp, m, candidate_ece=0.15)
    assert not ok and any("calibration" in r and "above" in r for r in reasons)
    assert gate(None, m, candidate_ece=0.05)[0], "with nothing serving only calibration is checked"


def _settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str, data: Path, split: Path, **extra: str
) -> Settings:
    for k in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(k)
    env = {
        "CXR_ENV": "test",
        "CXR_DATA_DIR": str(tmp_path / "var"),
        "CXR_DATABASE_URL": db_url,
        "CXR_RETRAIN_BASE_DATA": str(data),
        "CXR_RETRAIN_SPLIT": str(split),
        "CXR_RETRAIN_EPOCHS": "6",
        "CXR_RETRAIN_SEEDS": "1",
    }
    env.update(extra)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_settings()


def _serve(db_url: str, artifact: Path) -> str:
    from model.artifact import artifact_sha256, read_meta

    meta = read_meta(artifact)
    with session_scope(db_url) as s:
        register_model_version(
            s,
            version=meta["version"],
            artifact_path=str(artifact),
            artifact_sha256=artifact_sha256(artifact),
            serve_if_none=True,
        )
    return meta["version"]


def _reviewed_studies(db_url: str, data: Path, n: int = 6) -> None:
    """Finished studies of a batch, reviewed (some corrected) by a reviewer."""
    owner = make_user(db_url, "clinic")
    reviewer_id = make_user(db_url, "rev", Role.REVIEWER)
    files = sorted((data / "normal").glob("*.jpg"))[:n]
    with session_scope(db_url) as s:
        batch = create_batch(s, owner=s.get(User, owner), name="reviewed")
        ids = add_studies(
            s,
            batch=batch,
            files=[
                {"filename": f.name, "data": f.read_bytes(), "fmt": "jpeg", "patient_key": f"p{i // 2}"}
                for i, f in enumerate(files)
            ],
        )
        s.execute(update(Study).where(Study.id.in_(ids)).values(status=StudyStatus.DONE))
    with session_scope(db_url) as s:
        reviewer = s.get(User, reviewer_id)
        for sid in ids:
            review_study(s, study=s.get(Study, sid), reviewer=reviewer, label="normal", note="checked")


@pytest.mark.slow
def test_shuffled_label_candidate_is_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str, small_data: Path, tiny_current
) -> None:
    """A candidate trained on shuffled labels fails the gate; serving is unchanged; the lock is released."""
    from worker.retrain import run_retraining

    artifact, split = tiny_current
    settings = _settings(monkeypatch, tmp_path, sqlite_url, small_data, split)
    before = _serve(sqlite_url, artifact)
    out = run_retraining(settings, trigger="test", shuffle_labels=True)
    assert out.status == "REJECTED", out
    with session_scope(sqlite_url) as s:
        assert serving_version(s).version == before
        run = list_runs(s)[0]
        assert run.status == RunStatus.REJECTED
        assert run.epoch == run.epochs_total == 6 * 5, "six epochs in each of five folds"
        assert "below" in run.reasons
        assert run.gate["passed"] is False
        print("gate report:", run.gate)
        assert s.scalar(select(Lock).where(Lock.name == RETRAIN_LOCK)) is None


@pytest.mark.slow
def test_candidate_with_reviews_is_promoted_and_versioned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str, small_data: Path, tiny_current
) -> None:
    """Reviewed labels are folded in; a candidate that passes the gate becomes the serving version."""
    from worker.retrain import run_retraining

    artifact, split = tiny_current
    # Margins wide open: this test is about the promotion path, the rejection test is about the gate.
    settings = _settings(
        monkeypatch,
        tmp_path,
        sqlite_url,
        small_data,
        split,
        CXR_GATE_F1_MARGIN="1",
        CXR_GATE_SENSITIVITY_MARGIN="1",
        CXR_GATE_ECE_MAX="1",
    )
    before = _serve(sqlite_url, artifact)
    _reviewed_studies(sqlite_url, small_data)
    out = run_retraining(settings, trigger="test")
    assert out.status == "PROMOTED", out
    with session_scope(sqlite_url) as s:
        serving = serving_version(s)
        assert serving.version == out.candidate_version != before
        assert Path(serving.artifact_path).is_relative_to(settings.data_dir / "models")
        # The promoted folder's files are in SQL too: worker hosts without the trainer's folder serve it.
        stored = stored_files(s, model_version_id=serving.id)
        assert {"meta.json", "model.tflite", "model.keras", "card.md", "oof.csv"} <= set(stored)
        assert serving.metrics["reviewed_images"] == 6
        assert list_runs(s)[0].n_reviewed == 6


def test_simultaneous_starts_open_one_run(sqlite_url: str) -> None:
    """Two beat ticks at the same moment: one run starts, the other is skipped."""
    barrier = threading.Barrier(2)
    started: list[int] = []

    def tick(holder: str) -> None:
        barrier.wait()
        with session_scope(sqlite_url) as s:
            run = start_run(
                s, holder=holder, trigger="schedule", lease_s=600, epochs_total=1, current_version_id=None
            )
            if run is not None:
                started.append(run.id)

    threads = [threading.Thread(target=tick, args=(f"beat-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) == 1
    with session_scope(sqlite_url) as s:
        assert len(list_runs(s)) == 1


@pytest.mark.slow
def test_killed_run_releases_lock_after_lease(
    tmp_path: Path, sqlite_url: str, small_data: Path, tiny_current
) -> None:
    """SIGKILL a training run mid-way: its lock blocks others until the lease ends, then a new run starts."""
    artifact, split = tiny_current
    _serve(sqlite_url, artifact)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_ENV": "test",
            "CXR_DATA_DIR": str(tmp_path / "var"),
            "CXR_DATABASE_URL": sqlite_url,
            "CXR_RETRAIN_BASE_DATA": str(small_data),
            "CXR_RETRAIN_SPLIT": str(split),
            "CXR_RETRAIN_EPOCHS": "200",
            "CXR_RETRAIN_LEASE_S": "8",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    code = (
        "from config import load_settings; from worker.retrain import run_retraining; "
        "run_retraining(load_settings(), trigger='test')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with session_scope(sqlite_url) as s:
                runs = list_runs(s)
                if runs and runs[0].epoch >= 2:
                    break
            assert proc.poll() is None, "the training process ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("training never reached epoch 2")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with session_scope(sqlite_url) as s:
        assert (
            start_run(
                s, holder="next", trigger="schedule", lease_s=60, epochs_total=1, current_version_id=None
            )
            is None
        ), "the dead run's lease should still hold"
    time.sleep(9)
    with session_scope(sqlite_url) as s:
        run = start_run(
            s, holder="next", trigger="schedule", lease_s=60, epochs_total=1, current_version_id=None
        )
        assert run is not None
        runs = list_runs(s)
        assert [r.status for r in runs] == [RunStatus.RUNNING, RunStatus.FAILED]
        assert "lease" in runs[1].reasons
