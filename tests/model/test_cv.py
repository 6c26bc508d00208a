"""Cross-validation: patient-grouped stratified folds, threshold-free fold metrics, bands from OOF."""

from __future__ import annotations

import numpy as np

from model import CLASSES
from model.calibrate import BAND_COVID, BAND_NORMAL, BANDS, decide, decide_all, fit_thresholds, softmax
from model.cv import cv_folds, fold_metrics, sens_at_spec, summarise_oof
from model.data import Record


def _records(n_patients: int = 150) -> list[Record]:
    rng = np.random.default_rng(0)
    out = []
    for p in range(n_patients):
        label = CLASSES[p % 3]
        source = f"{label}-{p % 2}"
        out += [Record(f"{p}_{i}.jpg", label, source, f"pat{p}") for i in range(1 + rng.integers(0, 4))]
    return out


def test_folds_keep_patients_together_and_classes_balanced() -> None:
    recs = _records()
    folds = cv_folds(recs, 5)
    assert set(folds) == set(range(5))
    by_patient: dict[str, set[int]] = {}
    for r, f in zip(recs, folds, strict=True):
        by_patient.setdefault(r.patient_id, set()).add(int(f))
    assert all(len(s) == 1 for s in by_patient.values()), "a patient in two folds"
    for f in range(5):
        labels = [r.label for r, g in zip(recs, folds, strict=True) if g == f]
        assert all(labels.count(c) > 0.15 * len(labels) for c in CLASSES)
    assert np.array_equal(folds, cv_folds(recs, 5)), "folds are deterministic"


def test_fold_metrics_tell_right_from_shuffled() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 60)
    z = rng.normal(0, 0.5, (len(y), 3))
    z[np.arange(len(y)), y] += 4.0
    good, bad = fold_metrics(z, y), fold_metrics(z, rng.permutation(y))
    assert good["macro_f1"] == 1.0 and good["covid_sens_at_spec95"] == 1.0
    assert bad["macro_f1"] < 0.6 and bad["auroc_covid"] < 0.75


def test_sensitivity_at_specificity_counts_only_what_beats_the_negatives() -> None:
    neg = np.linspace(0, 1, 100)
    pos = np.array([0.5, 0.92, 0.97, 0.99])
    score = np.concatenate([neg, pos])
    is_pos = np.r_[np.zeros(100, bool), np.ones(4, bool)]
    # 95% specificity: the threshold is the 95th negative (0.949...): 2 of 4 positives lie above it
    assert sens_at_spec(score, is_pos, 0.95) == 0.5


def test_decided_finding_never_contradicts_its_band() -> None:
    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(0, 2, (500, 3)))
    thr = {"covid": 0.2, "normal": 0.7, "pneumonia": 0.6}
    decided, bands = decide_all(probs, thr)
    for d, b in zip(decided, bands, strict=True):
        assert b in BANDS
        if b == BAND_COVID:
            assert CLASSES[d] == "covid"
        if b == BAND_NORMAL:
            assert CLASSES[d] == "normal"
    # a study below every threshold is referred, with the likelier non-COVID class as its finding
    assert decide(np.array([0.1, 0.5, 0.4]), thr) == ("normal", BANDS[3])


def test_thresholds_from_oof_meet_the_band_targets_they_were_fitted_for() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 200)
    z = rng.normal(0, 1.0, (len(y), 3))
    z[np.arange(len(y)), y] += 2.5
    probs = softmax(z)
    thr = fit_thresholds(probs, y)
    rep = summarise_oof(z, y, np.arange(len(y)) % 5, np.array(["s"] * len(y)), thresholds=thr)
    covid = rep["bands"][BAND_COVID]
    assert covid["recall"] >= 0.95
    assert rep["bands"][BAND_NORMAL]["precision"] >= 0.95
    assert abs(sum(b["share"] for b in rep["bands"].values()) - 1.0) < 1e-9
    assert set(rep["per_fold"]) == set(range(5))


def test_a_sweep_is_adopted_only_when_it_trained_exactly_the_recipe(tmp_path) -> None:
    """`cxr model train --reuse-cv` copies fold networks of the same configuration and refuses any other."""
    import json
    from dataclasses import asdict

    import pytest

    from model.cv import CV_SEED
    from model.pipeline import Recipe, _adopt_sweep_folds

    recipe = Recipe(arch="tiny", epochs=3)
    cfg = recipe.train_config()
    sweep, runs = tmp_path / "sweep", tmp_path / "runs"
    (sweep / "fold0").mkdir(parents=True)
    (sweep / "fold0" / "model.keras").write_bytes(b"weights")
    runs.mkdir()
    conf = {"name": "s", "k": 5, "cv_seed": CV_SEED, "lung_crop": False, **asdict(cfg)}
    (sweep / "config.json").write_text(json.dumps(conf))
    _adopt_sweep_folds(sweep, runs, cfg, 5, lambda m: None)
    assert (runs / "fold0" / "model.keras").read_bytes() == b"weights"
    for change in ({"epochs": 4}, {"label_smoothing": 0.1}, {"lung_crop": True}, {"cv_seed": 1}):
        (sweep / "config.json").write_text(json.dumps({**conf, **change}))
        with pytest.raises(ValueError, match="another configuration"):
            _adopt_sweep_folds(sweep, tmp_path / "other", cfg, 5, lambda m: None)


def test_excluded_studies_leave_training_but_not_evaluation(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Label noise: an excluded study is in no fold's training set, yet every study gets an OOF logit."""
    import json
    from types import SimpleNamespace

    import model.artifact as artifact
    import model.cv as cv
    import model.train as train

    n = 40
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    y = np.arange(n) % 3
    folds = np.arange(n) % 4
    exclude = np.zeros(n, bool)
    exclude[[1, 6, 11, 30]] = True
    trained_on: list[set[int]] = []

    def fake_train(cfg, x_tr, y_tr, x_val, y_val, out_dir, **_):  # noqa: ANN001, ANN003, ANN202
        trained_on.append({int(v) for v in x_tr.ravel()})
        out_dir.mkdir(parents=True)
        (out_dir / "history.json").write_text(json.dumps({"train_seconds": 0.0}))
        return "net"

    monkeypatch.setattr(train, "train_network", fake_train)
    monkeypatch.setattr(train, "to_model_input", lambda xs, arch: xs)
    monkeypatch.setattr(artifact, "ensemble_logits", lambda ms, xs, **_: np.zeros((len(xs), 3), np.float32))
    monkeypatch.setattr(cv, "fold_metrics", lambda z, yy: {})
    cfg = SimpleNamespace(arch="cxr_slim", epochs=1)
    logits, done, _ = cv.cross_validate(cfg, x, y, folds, tmp_path, exclude=exclude, log=lambda m: None)
    assert len(trained_on) == 4
    assert all(s.isdisjoint({1, 6, 11, 30}) for s in trained_on)
    assert all(len(s) == n - n // 4 - sum(exclude[folds != f]) for f, s in enumerate(trained_on))
    assert (done >= 0).all() and not np.isnan(logits).any()  # excluded studies are still evaluated
