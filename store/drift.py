"""Drift watch in SQL: each study's input statistics, each model version's training reference, and a batch's
comparison with both, against the bounds stated here (docs/operations.md).

The reference (class and band shares of the model's out-of-fold predictions) is computed by the worker, which
may read the artifact; the web only reads it from model_versions.drift_reference.
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from store.db import insert_ignore
from store.tables import Batch, InputStats, ModelVersion, Prediction, Study, StudyStatus, utcnow

# Stated bounds. A batch needs MIN_STUDIES screened studies before its mix is compared (fewer: noise).
MIN_STUDIES = 20
MAX_MIX_DISTANCE = 0.25  # total variation distance between the batch's shares and the reference's
# Images whose border is brighter than their centre: inverted, or framed oddly. Measured: 12% of the fixture
# films, 47% of a mix of the adult public sources (many framed COVID-19 figures), 88% once inverted.
MAX_BRIGHT_BORDER_SHARE = 0.65
MEAN_INTENSITY_RANGE = (0.25, 0.75)  # the batch's average of per-image mean intensity (0..1, bone bright)
# Pixels: the smaller of the batch's average width and average height; below it, unlike the training data.
MIN_SHORT_SIDE = 256  # the shared training images are ~400 px; the model's input is 192 px


@dataclass
class DriftReport:
    """One batch against the bounds: warnings (empty when within), and the numbers they came from."""

    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, sentence)
    inputs: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, float] = field(default_factory=dict)
    bands: dict[str, float] = field(default_factory=dict)
    reference: dict[str, Any] | None = None


def save_input_stats(session: Session, *, rows: list[dict[str, Any]]) -> None:
    """Insert studies' input statistics (a redelivered chunk's are already there: kept)."""
    if rows:
        session.execute(insert_ignore(session, InputStats).values(rows).on_conflict_do_nothing())


def set_reference(session: Session, *, model_version_id: int, reference: dict[str, Any]) -> None:
    """Store a model version's training reference."""
    mv = session.get(ModelVersion, model_version_id)
    if mv is not None:
        mv.drift_reference = reference


def has_reference(session: Session, *, model_version_id: int) -> bool:
    """True when this model version's reference is stored."""
    ref = session.scalar(select(ModelVersion.drift_reference).where(ModelVersion.id == model_version_id))
    return ref is not None


def _shares(tally: dict[str, int]) -> dict[str, float]:
    total = sum(tally.values())
    return {k: v / total for k, v in sorted(tally.items())} if total else {}


def distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Total variation distance of two share dicts (0: same mix, 1: nothing in common)."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def batch_drift(session: Session, *, batch_id: int) -> DriftReport:
    """The batch's input statistics and class/band mix against the stated bounds and the model's reference."""
    report = DriftReport()
    # Aggregates in SQL: a 10,000-study batch's report must not load 10,000 rows.
    of_batch = (InputStats.study_id == Study.id, Study.batch_id == batch_id)
    n, mean, bright, avg_w, avg_h = session.execute(
        select(
            func.count(InputStats.study_id),
            func.avg(InputStats.mean_intensity),
            func.sum(case((InputStats.border_minus_centre > 0, 1), else_=0)),
            func.avg(InputStats.width),
            func.avg(InputStats.height),
        ).where(*of_batch)
    ).one()
    if n:
        mean, bright, side = float(mean), float(bright or 0) / n, min(float(avg_w), float(avg_h))

        def tally(column: Any) -> dict[str, int]:
            rows = session.execute(
                select(column, func.count()).where(*of_batch, column.is_not(None)).group_by(column)
            ).all()
            return {str(k): int(v) for k, v in rows}

        report.inputs = {
            "n": int(n),
            "mean_intensity": round(mean, 3),
            "bright_border_share": round(bright, 3),
            "typical_short_side": round(side),
            "bit_depths": tally(InputStats.bit_depth),
            "manufacturers": tally(InputStats.manufacturer),
            "views": tally(InputStats.view),
        }
        if bright > MAX_BRIGHT_BORDER_SHARE:
            report.warnings.append(
                (
                    "inverted",
                    f"{bright:.0%} of the images have a border brighter than their centre (bound "
                    f"{MAX_BRIGHT_BORDER_SHARE:.0%}): inverted or unusual images?",
                )
            )
        low, high = MEAN_INTENSITY_RANGE
        if not low <= mean <= high:
            report.warnings.append(
                ("intensity", f"mean intensity {mean:.2f} is outside {low:.2f}-{high:.2f}")
            )
        if side < MIN_SHORT_SIDE:
            report.warnings.append(("size", f"typical short side {side:.0f} px is below {MIN_SHORT_SIDE} px"))
    latest = (
        select(func.max(Prediction.id).label("pid"))
        .join(Study, Study.id == Prediction.study_id)
        .where(Study.batch_id == batch_id, Study.status == StudyStatus.DONE)
        .group_by(Prediction.study_id)
        .subquery()
    )
    rows = session.execute(
        select(Prediction.label, Prediction.triage, Prediction.model_version_id).join(
            latest, latest.c.pid == Prediction.id
        )
    ).all()
    if not rows:
        return report
    report.classes = _shares(dict(Tally(r[0] for r in rows)))
    report.bands = _shares(dict(Tally(r[1] for r in rows)))
    version_id = Tally(r[2] for r in rows).most_common(1)[0][0]
    report.reference = session.scalar(
        select(ModelVersion.drift_reference).where(ModelVersion.id == version_id)
    )
    if report.reference is None or len(rows) < MIN_STUDIES:
        return report
    for kind, mine in (("classes", report.classes), ("bands", report.bands)):
        d = distance(mine, report.reference.get(kind, {}))
        if d > MAX_MIX_DISTANCE:
            report.warnings.append(
                (
                    kind,
                    f"the {'class' if kind == 'classes' else 'band'} mix differs from the model's training "
                    f"reference by {d:.2f} (total variation; bound {MAX_MIX_DISTANCE})",
                )
            )
    return report


def recent_drift(session: Session, *, days: int = 7, limit: int = 50) -> dict[str, int]:
    """Batches created in the last days (newest `limit`) with each kind of drift warning (for /metrics)."""
    since = utcnow() - timedelta(days=days)
    ids = session.scalars(
        select(Batch.id).where(Batch.created_at >= since).order_by(Batch.id.desc()).limit(limit)
    ).all()
    counts: dict[str, int] = dict.fromkeys(("inverted", "intensity", "size", "classes", "bands"), 0)
    for batch_id in ids:
        for kind in {k for k, _ in batch_drift(session, batch_id=batch_id).warnings}:
            counts[kind] += 1
    return counts
