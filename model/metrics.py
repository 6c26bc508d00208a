"""Classification metrics with confidence intervals, calibration and triage statistics (no TF)."""

from __future__ import annotations

import numpy as np

from model import CLASSES
from model.calibrate import BANDS, COVID, band_of, fit_temperature, fit_thresholds, softmax


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Proportion k/n with its Wilson 95% interval (nan when n == 0)."""
    if n == 0:
        return (float("nan"),) * 3
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def confusion(y: np.ndarray, pred: np.ndarray, k: int = len(CLASSES)) -> np.ndarray:
    """Confusion matrix, rows = truth, columns = prediction."""
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    return cm


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def macro_f1(
    y: np.ndarray, pred: np.ndarray, k: int = len(CLASSES), *, labels: list[int] | None = None
) -> float:
    """Macro-averaged F1 over the k classes, or over `labels` only (e.g. the classes one collection holds)."""
    from sklearn.metrics import f1_score

    labels = list(range(k)) if labels is None else labels
    return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))


def auroc_ovr(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """One-vs-rest AUROC per class (nan when a class or its complement is absent) and their macro mean."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for c, name in enumerate(CLASSES):
        pos = y == c
        out[name] = float(roc_auc_score(pos, probs[:, c])) if 0 < pos.sum() < len(y) else float("nan")
    vals = [v for v in out.values() if not np.isnan(v)]
    out["macro"] = float(np.mean(vals)) if vals else float("nan")
    return out


def per_class(y: np.ndarray, pred: np.ndarray) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Sensitivity, specificity and PPV (with Wilson CIs) per class, from arg-max predictions."""
    out = {}
    for c, name in enumerate(CLASSES):
        tp = int(((y == c) & (pred == c)).sum())
        fn = int(((y == c) & (pred != c)).sum())
        fp = int(((y != c) & (pred == c)).sum())
        tn = int(((y != c) & (pred != c)).sum())
        out[name] = {
            "sensitivity": wilson(tp, tp + fn),
            "specificity": wilson(tn, tn + fp),
            "ppv": wilson(tp, tp + fp),
        }
    return out


def patient_resamples(groups: np.ndarray, n: int, seed: int = 0):
    """n bootstrap resamples of the rows, drawing patients (groups) with replacement: yields row indices."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    for _ in range(n):
        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])


def bootstrap_macro_f1(
    y: np.ndarray, pred: np.ndarray, groups: np.ndarray, n: int = 500, seed: int = 0
) -> tuple[float, float]:
    """95% interval of macro-F1 by resampling patients (groups) with replacement."""
    vals = [macro_f1(y[idx], pred[idx]) for idx in patient_resamples(groups, n, seed)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def covid_operating_point(
    probs: np.ndarray, y: np.ndarray, t_covid: float
) -> dict[str, tuple[float, float, float]]:
    """COVID-19 sensitivity and specificity (Wilson CIs) at the validation-chosen threshold."""
    flag = probs[:, COVID] >= t_covid
    pos = y == COVID
    return {
        "threshold": t_covid,
        "sensitivity": wilson(int((flag & pos).sum()), int(pos.sum())),
        "specificity": wilson(int((~flag & ~pos).sum()), int((~pos).sum())),
    }


def triage_table(probs: np.ndarray, y: np.ndarray, thresholds: dict[str, float]) -> dict[str, dict]:
    """Coverage and error of every triage band (error: the true class is not the band's class)."""
    bands = np.array(band_of(probs, thresholds))
    band_class = {BANDS[0]: "covid", BANDS[1]: "pneumonia", BANDS[2]: "normal"}
    out = {}
    for b in BANDS:
        m = bands == b
        mix = {c: int(((y == i) & m).sum()) for i, c in enumerate(CLASSES)}
        row = {"n": int(m.sum()), "coverage": float(m.mean()) if len(y) else float("nan"), "truth": mix}
        if b in band_class:
            wrong = int(m.sum()) - mix[band_class[b]]
            row["error"] = wilson(wrong, int(m.sum()))
        out[b] = row
    return out


def summarise(
    probs: np.ndarray, y: np.ndarray, thresholds: dict[str, float], groups: np.ndarray | None = None
) -> dict:
    """All headline metrics of calibrated probabilities against labels."""
    pred = probs.argmax(axis=1)
    out = {
        "n": int(len(y)),
        "accuracy": wilson(int((pred == y).sum()), len(y)),
        "macro_f1": macro_f1(y, pred),
        "auroc": auroc_ovr(y, probs),
        "per_class": per_class(y, pred),
        "confusion": confusion(y, pred).tolist(),
        "ece": ece(probs, y),
        "covid_operating_point": covid_operating_point(probs, y, thresholds["covid"]),
        "triage": triage_table(probs, y, thresholds),
    }
    if groups is not None:
        out["macro_f1_ci"] = bootstrap_macro_f1(y, pred, groups)
    return out


def calibrate_and_score(
    val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray, groups_test=None
) -> dict:
    """Fit temperature and thresholds on validation, then score test (and report uncalibrated test ECE)."""
    t = fit_temperature(val_logits, y_val)
    thr = fit_thresholds(softmax(val_logits / t), y_val)
    test_probs = softmax(test_logits / t)
    res = summarise(test_probs, y_test, thr, groups_test)
    res["temperature"] = t
    res["thresholds"] = thr
    res["ece_uncalibrated"] = ece(softmax(test_logits), y_test)
    return res


def headline(m: dict) -> dict:
    """The few numbers worth putting in meta.json and tables."""
    op = m["covid_operating_point"]
    return {
        "n": m["n"],
        "accuracy": round(m["accuracy"][0], 4),
        "macro_f1": round(m["macro_f1"], 4),
        "auroc_macro": round(m["auroc"]["macro"], 4),
        "auroc_covid": round(m["auroc"]["covid"], 4),
        "covid_sensitivity": round(op["sensitivity"][0], 4),
        "covid_specificity": round(op["specificity"][0], 4),
        "ece": round(m["ece"], 4),
    }
