"""Drift watch, worker side: per-image input statistics, and a model version's training reference.

The reference is the class and band mix of the model's out-of-fold predictions (the artifact's oof.csv:
logits per class, turned into calibrated probabilities with meta's temperature, then findings and bands with
model.calibrate.decide, exactly as served). It is computed once per model version and stored in SQL, where the
web reads it (the web never imports model/).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("cxr.worker")
LOGIT_COLUMNS = ("logit_covid", "logit_normal", "logit_pneumonia")


def image_stats(data: bytes, gray: np.ndarray) -> dict[str, Any]:
    """Size, bit depth, mean intensity, border-minus-centre brightness, DICOM manufacturer and view."""
    h, w = gray.shape
    edge = max(1, min(h, w) // 10)
    border = np.concatenate(
        [gray[:edge].ravel(), gray[-edge:].ravel(), gray[:, :edge].ravel(), gray[:, -edge:].ravel()]
    )
    centre = gray[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    stats: dict[str, Any] = {
        "width": int(w),
        "height": int(h),
        "mean_intensity": float(gray.mean()),
        "border_minus_centre": float(border.mean() - centre.mean()),
        "bit_depth": None,
        "manufacturer": None,
        "view": None,
    }
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        stats["bit_depth"] = int(data[24])
    elif data[:3] == b"\xff\xd8\xff":
        stats["bit_depth"] = 8
    else:
        stats.update(_dicom_header(data))
    return stats


def _dicom_header(data: bytes) -> dict[str, Any]:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - statistics are best effort; the image itself decoded
        return {}
    return {
        "bit_depth": int(ds.get("BitsStored", 0)) or None,
        "manufacturer": (str(ds.get("Manufacturer", "")) or None) and str(ds.Manufacturer)[:64],
        "view": (str(ds.get("ViewPosition", "")) or None) and str(ds.ViewPosition)[:16],
    }


def reference_from_oof(path: Path, *, temperature: float, thresholds: dict[str, float]) -> dict[str, Any]:
    """Class and band shares of the out-of-fold predictions (calibrated and decided as in serving)."""
    from model.calibrate import decide

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} has no predictions")
    logits = np.array([[float(r[c]) for c in LOGIT_COLUMNS] for r in rows], dtype=float) / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    decided = [decide(p, thresholds) for p in probs]
    n = len(decided)
    classes: dict[str, float] = {}
    bands: dict[str, float] = {}
    for label, band in decided:
        classes[label] = classes.get(label, 0.0) + 1 / n
        bands[band] = bands.get(band, 0.0) + 1 / n
    sources: dict[str, int] = {}
    for r in rows:
        sources[r.get("source", "")] = sources.get(r.get("source", ""), 0) + 1
    return {"n": n, "classes": classes, "bands": bands, "sources": sources, "from": "oof.csv"}


def ensure_reference(database_url: str, *, predictor: Any, model_version_id: int) -> bool:
    """Store this version's reference if the artifact ships oof.csv and none is stored; True if stored."""
    from store.db import session_scope
    from store.drift import has_reference, set_reference

    oof = Path(predictor.artifact_dir) / "oof.csv"
    if not oof.exists():
        return False
    with session_scope(database_url) as session:
        if has_reference(session, model_version_id=model_version_id):
            return False
    reference = reference_from_oof(oof, temperature=predictor.temperature, thresholds=predictor.thresholds)
    with session_scope(database_url) as session:
        set_reference(session, model_version_id=model_version_id, reference=reference)
    log.info(
        "drift reference of model %s stored (%d out-of-fold predictions)", predictor.version, reference["n"]
    )
    return True
