"""Drift watch in SQL: each study's input statistics, each model version's training reference, and a batch's
comparison with both, against the bounds stated here (docs/operations.md).

The reference (class and band shares of the model's out-of-fold predictions) is computed by the worker, which
may read the artifact; the web only reads it from model_versions.drift_reference.
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

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
KINDS = ("inverted", "intensity", "size", "classes", "bands")  # one warning kind per bound


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


class week_start(FunctionElement):  # noqa: N801 - used like a SQL function
    """The Monday (UTC) of a timestamp's week as 'YYYY-MM-DD' text, the same on PostgreSQL and SQLite."""

    type = String()
    inherit_cache = True


@compiles(week_start, "postgresql")
def _week_start_postgresql(element: week_start, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"to_char(date_trunc('week', {column} AT TIME ZONE 'UTC'), 'YYYY-MM-DD')"


@compiles(week_start, "sqlite")
def _week_start_sqlite(element: week_start, compiler: Any, **kw: Any) -> str:
    # SQLite keeps these timestamps as UTC text; back six days, then forward to the next Monday (or stay).
    return f"date({compiler.process(element.clauses, **kw)}, '-6 days', 'weekday 1')"


def _judge(report: DriftReport, *, screened: int) -> None:
    """Add a warning for each stated bound the report's numbers cross (the same for a batch and a week)."""
    inputs = report.inputs
    if inputs.get("n"):
        bright, mean, side = (
            inputs["bright_border_share"],
            inputs["mean_intensity"],
            inputs["typical_short_side"],
        )
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
    if report.reference is None or screened < MIN_STUDIES:
        return
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


def _rollup(session: Session, *, key: Any, where: list[Any]) -> dict[Any, DriftReport]:
    """DriftReport per value of key (a study's batch, or its week) over the studies matching where.

    Three grouped queries whatever the number of studies or groups: input aggregates, input tallies, and the
    class/band mix of each DONE study's latest prediction; no row per study reaches Python.
    """
    reports: dict[Any, DriftReport] = {}
    group = key.label("grp")
    rows = session.execute(
        select(
            group,
            func.count(InputStats.study_id),
            func.avg(InputStats.mean_intensity),
            func.sum(case((InputStats.border_minus_centre > 0, 1), else_=0)),
            func.avg(InputStats.width),
            func.avg(InputStats.height),
        )
        .join(Study, Study.id == InputStats.study_id)
        .where(*where)
        .group_by(key)
    ).all()
    for grp, n, mean, bright, avg_w, avg_h in rows:
        reports[grp] = DriftReport(
            inputs={
                "n": int(n),
                # unrounded: the bounds are judged on these (pages round them)
                "mean_intensity": float(mean),
                "bright_border_share": float(bright or 0) / n,
                "typical_short_side": min(float(avg_w), float(avg_h)),
                "bit_depths": {},
                "manufacturers": {},
                "views": {},
            }
        )
    tallied = (
        ("bit_depths", InputStats.bit_depth),
        ("manufacturers", InputStats.manufacturer),
        ("views", InputStats.view),
    )
    rows = session.execute(
        select(group, *(col for _, col in tallied), func.count())
        .join(Study, Study.id == InputStats.study_id)
        .where(*where)
        .group_by(key, *(col for _, col in tallied))
    ).all()
    for grp, *values, n in rows:
        for (name, _), value in zip(tallied, values, strict=True):
            if value is not None:
                tally = reports[grp].inputs[name]
                tally[str(value)] = tally.get(str(value), 0) + int(n)

    latest = (
        select(func.max(Prediction.id).label("pid"))
        .join(Study, Study.id == Prediction.study_id)
        .where(*where, Study.status == StudyStatus.DONE)
        .group_by(Prediction.study_id)
        .subquery()
    )
    rows = session.execute(
        select(group, Prediction.label, Prediction.triage, Prediction.model_version_id, func.count())
        .join(latest, latest.c.pid == Prediction.id)
        .join(Study, Study.id == Prediction.study_id)
        .group_by(key, Prediction.label, Prediction.triage, Prediction.model_version_id)
    ).all()
    mixes: dict[Any, tuple[Tally, Tally, Tally]] = {}
    for grp, label, triage, version_id, n in rows:
        classes, bands, versions = mixes.setdefault(grp, (Tally(), Tally(), Tally()))
        classes[str(label)] += int(n)
        bands[str(triage)] += int(n)
        versions[version_id] += int(n)
    references: dict[int, dict[str, Any] | None] = {}
    version_ids = {v.most_common(1)[0][0] for _, _, v in mixes.values()}
    if version_ids:
        references = dict(
            session.execute(
                select(ModelVersion.id, ModelVersion.drift_reference).where(ModelVersion.id.in_(version_ids))
            ).all()
        )
    for grp, (classes, bands, versions) in mixes.items():
        report = reports.setdefault(grp, DriftReport())
        report.classes, report.bands = _shares(dict(classes)), _shares(dict(bands))
        report.reference = references.get(versions.most_common(1)[0][0])
    for grp, report in reports.items():
        _judge(report, screened=sum(mixes[grp][0].values()) if grp in mixes else 0)
    return reports


def batch_drift(session: Session, *, batch_id: int) -> DriftReport:
    """The batch's input statistics and class/band mix against the stated bounds and the model's reference."""
    # Aggregates in SQL: a 10,000-study batch's report must not load 10,000 rows.
    by_batch = _rollup(session, key=Study.batch_id, where=[Study.batch_id == batch_id])
    return by_batch.get(batch_id, DriftReport())


@dataclass
class WeekDrift:
    """One calendar week (Monday, UTC) of studies received, against the same bounds as a batch."""

    week: str  # the Monday, YYYY-MM-DD
    report: DriftReport


def weekly_drift(session: Session, *, weeks: int = 8, now: datetime | None = None) -> list[WeekDrift]:
    """The last `weeks` calendar weeks (by when studies were received), newest first; weeks with no study left
    out. Each week's input statistics and class/band mix are judged with the same bounds as a batch."""
    today = (now or utcnow()).astimezone(UTC).date()
    monday = today - timedelta(days=today.weekday() + 7 * (weeks - 1))
    since = datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
    by_week = _rollup(session, key=week_start(Study.created_at), where=[Study.created_at >= since])
    return [WeekDrift(week=str(w), report=by_week[w]) for w in sorted(by_week, reverse=True)]


def recent_drift(session: Session, *, days: int = 7, limit: int = 50) -> dict[str, int]:
    """Batches created in the last days (newest `limit`) with each kind of drift warning (for /metrics)."""
    since = utcnow() - timedelta(days=days)
    ids = session.scalars(
        select(Batch.id).where(Batch.created_at >= since).order_by(Batch.id.desc()).limit(limit)
    ).all()
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    for batch_id in ids:
        for kind in {k for k, _ in batch_drift(session, batch_id=batch_id).warnings}:
            counts[kind] += 1
    return counts


def this_week_drift(session: Session, *, now: datetime | None = None) -> dict[str, int]:
    """kind -> 1 when the current calendar week's studies cross that bound, else 0 (for /metrics)."""
    weeks = weekly_drift(session, weeks=1, now=now)
    crossed = {kind for w in weeks for kind, _ in w.report.warnings}
    return {kind: int(kind in crossed) for kind in KINDS}
