"""Temperature scaling, triage thresholds and the decision rule (no TF); fitted on out-of-fold predictions."""

from __future__ import annotations

import numpy as np

from model import CLASSES

COVID, NORMAL, PNEUMONIA = (CLASSES.index(c) for c in ("covid", "normal", "pneumonia"))

BAND_COVID = "COVID-19 suspected"
BAND_PNEUMONIA = "pneumonia suspected"
BAND_NORMAL = "likely normal"
BAND_REFER = "refer to a radiologist"
BANDS = (BAND_COVID, BAND_PNEUMONIA, BAND_NORMAL, BAND_REFER)

# Band targets, met on the out-of-fold predictions of all of train+val (model/cv.py), never on test.
COVID_SENSITIVITY_TARGET = 0.95  # "COVID-19 suspected" catches at least this share of COVID studies ...
COVID_MAX_FLAGGED = 0.10  # ... while flagging at most this share of non-COVID studies (reported when missed)
PNEUMONIA_PRECISION_TARGET = 0.80
NORMAL_PRECISION_TARGET = 0.95  # "likely normal" is right at least this often ...
NORMAL_MIN_COVERAGE = 0.50  # ... and covers at least half of the normal studies (reported when missed)

# What each band means, shown beside every report (HTML, CSV/JSON, PDF).
BAND_LEGEND: dict[str, str] = {
    BAND_COVID: "COVID-19 probability above the threshold chosen to catch at least 95% of COVID-19 studies "
    "in cross-validation; the finding shown is COVID-19",
    BAND_PNEUMONIA: "not COVID-19 suspected; pneumonia probability high enough that at least 80% of such "
    "studies were pneumonia in cross-validation",
    BAND_NORMAL: "not COVID-19 suspected; normal probability high enough that at least 95% of such studies "
    "were normal in cross-validation",
    BAND_REFER: "the model is unsure: no band's threshold is met; a radiologist should read the study",
}
BAND_CLASS = {BAND_COVID: "covid", BAND_PNEUMONIA: "pneumonia", BAND_NORMAL: "normal"}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels y under softmax(logits / T)."""
    p = softmax(logits / temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 minimising validation NLL of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda lt: nll(logits, y, float(np.exp(lt))), bounds=(np.log(0.05), np.log(20.0)), method="bounded"
    )
    return float(np.exp(res.x))


def fit_thresholds(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Choose the band thresholds on out-of-fold probabilities (see `decide` for the band rules).

    COVID: the highest threshold whose sensitivity is still >= COVID_SENSITIVITY_TARGET. Normal and pneumonia:
    among the studies left, the lowest threshold (>= 0.5, so the two never overlap) whose band precision
    reaches its target.
    """
    pc = probs[:, COVID]
    is_covid = y == COVID
    cand = np.sort(pc[is_covid])
    k = int(np.floor((1.0 - COVID_SENSITIVITY_TARGET) * len(cand)))
    t_covid = float(min(0.5, cand[k] - 1e-6)) if len(cand) else 0.5
    t_covid = max(t_covid, 0.02)
    rest = pc < t_covid
    t_no = _lowest_threshold_with_precision(probs[rest, NORMAL], y[rest] == NORMAL, NORMAL_PRECISION_TARGET)
    t_pn = _lowest_threshold_with_precision(
        probs[rest, PNEUMONIA], y[rest] == PNEUMONIA, PNEUMONIA_PRECISION_TARGET
    )
    return {"covid": round(t_covid, 6), "pneumonia": round(t_pn, 6), "normal": round(t_no, 6)}


def _lowest_threshold_with_precision(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    for t in np.arange(0.50, 0.991, 0.01):
        sel = score >= t
        if sel.sum() >= 5 and positive[sel].mean() >= target:
            return float(round(t, 2))
    return 0.99


def decide(probs: np.ndarray, thresholds: dict[str, float]) -> tuple[str, str]:
    """The reported finding and triage band of one calibrated probability vector (covid, normal, pneumonia).

    1. p_covid >= t_covid -> covid, "COVID-19 suspected" (even when another class has a higher probability:
       the threshold is set for sensitivity, and the finding shown must agree with the band);
    2. else p_normal >= t_normal -> normal, "likely normal" (threshold set for band precision);
    3. else p_pneumonia >= t_pneumonia -> pneumonia, "pneumonia suspected";
    4. else the most probable of normal and pneumonia, "refer to a radiologist" (the model is unsure).
    """
    p = np.asarray(probs, dtype=float)
    if p[COVID] >= thresholds["covid"]:
        return "covid", BAND_COVID
    if p[NORMAL] >= thresholds["normal"]:
        return "normal", BAND_NORMAL
    if p[PNEUMONIA] >= thresholds["pneumonia"]:
        return "pneumonia", BAND_PNEUMONIA
    return ("normal" if p[NORMAL] >= p[PNEUMONIA] else "pneumonia"), BAND_REFER


def triage(probs: np.ndarray, thresholds: dict[str, float]) -> str:
    """Band of one calibrated probability vector (see `decide`)."""
    return decide(probs, thresholds)[1]


def decide_all(probs: np.ndarray, thresholds: dict[str, float]) -> tuple[np.ndarray, list[str]]:
    """Finding (class index) and band for every row."""
    pairs = [decide(p, thresholds) for p in probs]
    return np.array([CLASSES.index(c) for c, _ in pairs], dtype=np.int64), [b for _, b in pairs]


def band_of(probs: np.ndarray, thresholds: dict[str, float]) -> list[str]:
    """Triage band for every row."""
    return decide_all(probs, thresholds)[1]
