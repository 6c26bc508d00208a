"""Temperature scaling and triage thresholds, both fitted on the validation split only (no TF)."""

from __future__ import annotations

import numpy as np

from model import CLASSES

COVID, NORMAL, PNEUMONIA = (CLASSES.index(c) for c in ("covid", "normal", "pneumonia"))

BAND_COVID = "COVID-19 suspected"
BAND_PNEUMONIA = "pneumonia suspected"
BAND_NORMAL = "likely normal"
BAND_REFER = "refer to a radiologist"
BANDS = (BAND_COVID, BAND_PNEUMONIA, BAND_NORMAL, BAND_REFER)

# targets on the validation split
COVID_SENSITIVITY_TARGET = 0.97  # above the 0.95 goal, for margin on unseen patients
PNEUMONIA_PRECISION_TARGET = 0.80
NORMAL_PRECISION_TARGET = 0.95


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
    """Choose the triage thresholds on validation probabilities (see `triage` for the band rules)."""
    pc = probs[:, COVID]
    is_covid = y == COVID
    # COVID: the highest threshold keeping validation sensitivity >= target (best specificity)
    cand = np.sort(pc[is_covid])
    k = int(np.floor((1.0 - COVID_SENSITIVITY_TARGET) * len(cand)))
    t_covid = float(min(0.5, cand[k] - 1e-6)) if len(cand) else 0.5
    t_covid = max(t_covid, 0.02)
    rest = pc < t_covid
    # pneumonia among the rest: the lowest threshold whose band precision reaches the target
    t_pn = _lowest_threshold_with_precision(
        probs[rest, PNEUMONIA], y[rest] == PNEUMONIA, PNEUMONIA_PRECISION_TARGET
    )
    rest2 = rest & (probs[:, PNEUMONIA] < t_pn)
    t_no = _lowest_threshold_with_precision(probs[rest2, NORMAL], y[rest2] == NORMAL, NORMAL_PRECISION_TARGET)
    return {"covid": round(t_covid, 6), "pneumonia": round(t_pn, 6), "normal": round(t_no, 6)}


def _lowest_threshold_with_precision(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    for t in np.arange(0.34, 0.991, 0.01):
        sel = score >= t
        if sel.sum() >= 5 and positive[sel].mean() >= target:
            return float(round(t, 2))
    return 0.99


def triage(probs: np.ndarray, thresholds: dict[str, float]) -> str:
    """Band of one calibrated probability vector (covid, normal, pneumonia order).

    1. p_covid >= t_covid -> "COVID-19 suspected" (threshold set for high COVID sensitivity on validation);
    2. else p_pneumonia >= t_pneumonia -> "pneumonia suspected";
    3. else p_normal >= t_normal -> "likely normal" (threshold set for >= 95% band precision on validation);
    4. else "refer to a radiologist" (the model is unsure).
    """
    p = np.asarray(probs, dtype=float)
    if p[COVID] >= thresholds["covid"]:
        return BAND_COVID
    if p[PNEUMONIA] >= thresholds["pneumonia"]:
        return BAND_PNEUMONIA
    if p[NORMAL] >= thresholds["normal"]:
        return BAND_NORMAL
    return BAND_REFER


def band_of(probs: np.ndarray, thresholds: dict[str, float]) -> list[str]:
    """Triage band for every row."""
    return [triage(p, thresholds) for p in probs]
