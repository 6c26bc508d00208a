"""What a batch report shows, read in a few queries: studies with their latest prediction and review, the
prediction history, and the JSON export's shape (web renders it as HTML, CSV and JSON; the API returns it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, case, func, select
from sqlalchemy.orm import Session

from store.studies import ACTIVE, batch_progress
from store.tables import Batch, ModelVersion, Prediction, Review, Study, StudyStatus, User

NOTICE = "Research and teaching tool — not a medical device; not for diagnosis."


def latest_reviews(session: Session, *, study_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The newest review of each of these studies (one query), with the reviewer's name."""
    out: dict[int, dict[str, Any]] = {}
    if not study_ids:
        return out
    rows = session.execute(
        select(Review, User.username)
        .outerjoin(User, User.id == Review.reviewer_id)
        .where(Review.study_id.in_(study_ids))
        .order_by(Review.id)
    ).all()
    for review, username in rows:
        out[review.study_id] = {
            "label": review.label,
            "agrees": review.agrees,
            "note": review.note,
            "reviewer": username,
            "at": iso_utc(review.created_at),
        }
    return out


def all_predictions(session: Session, *, study_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Every prediction of these studies, oldest first, each with its model version string."""
    out: dict[int, list[dict[str, Any]]] = {sid: [] for sid in study_ids}
    if not study_ids:
        return out
    rows = session.execute(
        select(Prediction, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .where(Prediction.study_id.in_(study_ids))
        .order_by(Prediction.id)
    ).all()
    for pred, version in rows:
        out[pred.study_id].append(
            {
                "model_version": version,
                "predicted_class": pred.label,
                "p_covid": pred.p_covid,
                "p_normal": pred.p_normal,
                "p_pneumonia": pred.p_pneumonia,
                "triage": pred.triage,
                "created_at": iso_utc(pred.created_at),
            }
        )
    return out


BAND_COVID = "COVID-19 suspected"
BAND_PNEUMONIA = "pneumonia suspected"
BAND_NORMAL = "likely normal"
BAND_REFER = "refer to a radiologist"
# The four triage bands, as model/calibrate.py names them (store may not import model/): the legend's order.
BANDS = (BAND_COVID, BAND_PNEUMONIA, BAND_NORMAL, BAND_REFER)

# What each triage band means when the model version that made a prediction carries no legend of its own
# (artifacts from before meta["band_legend"]); the one generic text, used by every page, export and PDF.
GENERIC_BAND_LEGEND: dict[str, str] = {
    BAND_COVID: "The COVID-19 probability is above the model's COVID-19 threshold, which is set "
    "low to miss few COVID-19 studies, so many of these are not COVID-19. The finding shown is COVID-19.",
    BAND_PNEUMONIA: "Not COVID-19 suspected; the pneumonia probability is above the model's pneumonia "
    "threshold. The finding shown is pneumonia.",
    BAND_NORMAL: "Not COVID-19 suspected; the normal probability is above the model's normal threshold, "
    "set so that few abnormal studies land here.",
    BAND_REFER: "The model is unsure: no band's threshold is met. A radiologist should read the study.",
}


def legend_of(stored: dict[str, str] | None) -> dict[str, str]:
    """Band -> meaning, in the bands' order: a model version's own legend, else the generic one."""
    legend = dict(GENERIC_BAND_LEGEND)
    if stored:
        legend.update({band: text for band, text in stored.items() if text})
    return legend


def row_legends(session: Session, rows: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """The legend of every model version that made one of these rows' predictions (by version id)."""
    from store.models_registry import band_legends

    ids = sorted({int(r["model_version_id"]) for r in rows if r.get("model_version_id")})
    return {vid: legend_of(stored) for vid, stored in band_legends(session, version_ids=ids).items()}


# "Needs review first": the unsure ones, then COVID-19 suspected, then the rest; screened before unscreened.
PRIORITY = {BAND_REFER: 0, BAND_COVID: 1, BAND_PNEUMONIA: 2, BAND_NORMAL: 3}
SORTS = ("priority", "id", "file", "class", "p_covid", "p_normal", "p_pneumonia", "band", "status", "review")
STATUSES = tuple(s.value for s in StudyStatus)


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 with an explicit UTC offset (SQLite hands back naive datetimes; every stored one is UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class ReportQuery:
    """Filters, search, order and page of a batch report (all optional)."""

    band: str | None = None
    label: str | None = None
    status: str | None = None
    reviewed: bool | None = None
    search: str = ""
    sort: str = "id"
    desc: bool = False
    page: int = 1
    per_page: int | None = None  # None: every row (the exports)

    def normalised(self) -> ReportQuery:
        """The same query with unknown values dropped and the page clamped to >= 1."""
        return replace(
            self,
            band=self.band if self.band in BANDS else None,
            status=self.status if self.status in STATUSES else None,
            sort=self.sort if self.sort in SORTS else "id",
            page=max(1, int(self.page)),
            search=self.search.strip()[:200],
        )


@dataclass(frozen=True)
class ReportPage:
    """One page of a batch report's rows and how many rows match in all."""

    rows: list[dict[str, Any]]
    total: int
    page: int
    per_page: int | None

    @property
    def pages(self) -> int:
        """Number of pages (at least 1)."""
        if not self.per_page:
            return 1
        return max(1, -(-self.total // self.per_page))


def _report_select(batch_id: int, query: ReportQuery) -> Select:
    """Studies of a batch joined to their latest prediction, model version and latest review, filtered."""
    in_batch = select(Study.id).where(Study.batch_id == batch_id)
    latest_pred = (
        select(Prediction.study_id, func.max(Prediction.id).label("pid"))
        .where(Prediction.study_id.in_(in_batch))
        .group_by(Prediction.study_id)
        .subquery()
    )
    latest_rev = (
        select(Review.study_id, func.max(Review.id).label("rid"))
        .where(Review.study_id.in_(in_batch))
        .group_by(Review.study_id)
        .subquery()
    )
    stmt = (
        select(Study, Prediction, ModelVersion.version, Review, User.username)
        .outerjoin(latest_pred, latest_pred.c.study_id == Study.id)
        .outerjoin(Prediction, Prediction.id == latest_pred.c.pid)
        .outerjoin(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .outerjoin(latest_rev, latest_rev.c.study_id == Study.id)
        .outerjoin(Review, Review.id == latest_rev.c.rid)
        .outerjoin(User, User.id == Review.reviewer_id)
        .where(Study.batch_id == batch_id)
    )
    if query.band:
        stmt = stmt.where(Prediction.triage == query.band)
    if query.label:
        stmt = stmt.where(Prediction.label == query.label)
    if query.status:
        stmt = stmt.where(Study.status == query.status)
    if query.reviewed is True:
        stmt = stmt.where(Review.id.is_not(None))
    elif query.reviewed is False:
        stmt = stmt.where(Review.id.is_(None))
    if query.search:
        stmt = stmt.where(func.lower(Study.original_filename).contains(query.search.lower(), autoescape=True))
    return stmt


def _order(query: ReportQuery) -> list[Any]:
    if query.sort == "priority":
        rank = case(
            *((Prediction.triage == band, value) for band, value in PRIORITY.items()),
            else_=len(PRIORITY),
        )
        # Within a band the highest COVID-19 probability first; studies without a prediction last.
        return [rank, case((Prediction.p_covid.is_(None), 1), else_=0), Prediction.p_covid.desc(), Study.id]
    column = {
        "id": Study.id,
        "file": func.lower(Study.original_filename),
        "class": Prediction.label,
        "p_covid": Prediction.p_covid,
        "p_normal": Prediction.p_normal,
        "p_pneumonia": Prediction.p_pneumonia,
        "band": Prediction.triage,
        "status": Study.status,
        "review": Review.label,
    }[query.sort]
    key = column.desc() if query.desc else column.asc()
    # NULLs (no prediction, no review) always last, whichever the direction, on SQLite and PostgreSQL alike.
    return [case((column.is_(None), 1), else_=0), key, Study.id]


def _row(
    study: Study, pred: Prediction | None, version: str | None, review: Review | None, reviewer: str | None
) -> dict[str, Any]:
    return {
        "study_id": study.id,
        "file_name": study.original_filename,
        "status": study.status.value,
        "format": study.format,
        "width": study.width,
        "height": study.height,
        "has_thumbnail": study.image_sha256 is not None,  # only validated images have a preview
        "predicted_class": pred.label if pred else None,
        "p_covid": pred.p_covid if pred else None,
        "p_normal": pred.p_normal if pred else None,
        "p_pneumonia": pred.p_pneumonia if pred else None,
        "triage": pred.triage if pred else None,
        "model_version": version,
        "model_version_id": pred.model_version_id if pred else None,
        "error": study.error,
        "review_label": review.label if review else None,
        "review_note": review.note if review else None,
        "review_agrees": review.agrees if review else None,
        "reviewer": reviewer if review else None,
        "reviewed_at": iso_utc(review.created_at) if review else None,
    }


def report_page(session: Session, *, batch: Batch, query: ReportQuery | None = None) -> ReportPage:
    """One page of a batch report: rows filtered, searched and ordered in SQL (see ReportQuery)."""
    query = (query or ReportQuery()).normalised()
    stmt = _report_select(batch.id, query)
    total = int(session.scalar(select(func.count()).select_from(stmt.with_only_columns(Study.id).subquery())))
    stmt = stmt.order_by(*_order(query))
    if query.per_page:
        stmt = stmt.limit(query.per_page).offset((query.page - 1) * query.per_page)
    rows = [_row(*r) for r in session.execute(stmt).all()]
    return ReportPage(rows=rows, total=total, page=query.page, per_page=query.per_page)


def study_report_row(session: Session, *, study: Study) -> dict[str, Any]:
    """One study's report row (latest prediction, model version, latest review)."""
    stmt = _report_select(study.batch_id, ReportQuery()).where(Study.id == study.id)
    return _row(*session.execute(stmt).one())


def stored_thumbnails(session: Session, *, study_ids: list[int]) -> dict[int, bytes]:
    """The previews already made for these studies (made on first view; missing ones are left out)."""
    if not study_ids:
        return {}
    rows = session.execute(
        select(Study.id, Study.thumbnail_png).where(Study.id.in_(study_ids), Study.thumbnail_png.is_not(None))
    ).all()
    return {int(sid): bytes(png) for sid, png in rows}


def ordered_study_ids(session: Session, *, batch: Batch, query: ReportQuery | None = None) -> list[int]:
    """The ids of a batch's studies in the report's order and filters (for previous/next on a study page)."""
    query = replace((query or ReportQuery()).normalised(), per_page=None)
    stmt = _report_select(batch.id, query).with_only_columns(Study.id).order_by(*_order(query))
    return list(session.scalars(stmt))


def study_dicts(session: Session, *, batch: Batch) -> list[dict[str, Any]]:
    """One plain dict per study of the batch, with its latest prediction (the shape of the JSON export)."""
    return report_page(session, batch=batch).rows


def batch_summary(session: Session, *, batch: Batch) -> dict[str, Any]:
    """What the top of a report says: class mix, band counts, failures by reason, how long it took."""
    latest = (
        select(Prediction.study_id, func.max(Prediction.id).label("pid"))
        .join(Study, Study.id == Prediction.study_id)
        .where(Study.batch_id == batch.id)
        .group_by(Prediction.study_id)
        .subquery()
    )
    done = and_(Study.status == StudyStatus.DONE)
    by_class = dict(
        session.execute(
            select(Prediction.label, func.count())
            .join(latest, latest.c.pid == Prediction.id)
            .join(Study, Study.id == Prediction.study_id)
            .where(done)
            .group_by(Prediction.label)
        ).all()
    )
    by_band = dict(
        session.execute(
            select(Prediction.triage, func.count())
            .join(latest, latest.c.pid == Prediction.id)
            .join(Study, Study.id == Prediction.study_id)
            .where(done)
            .group_by(Prediction.triage)
        ).all()
    )
    failures = [
        {"reason": reason or "unknown", "count": int(n)}
        for reason, n in session.execute(
            select(Study.error, func.count())
            .where(Study.batch_id == batch.id, Study.status == StudyStatus.FAILED)
            .group_by(Study.error)
            .order_by(func.count().desc())
        ).all()
    ]
    first, last, n_active, reviewed = session.execute(
        select(
            func.min(Study.created_at),
            func.max(Study.finished_at),
            func.sum(case((Study.status.in_(ACTIVE), 1), else_=0)),
            func.count(func.distinct(Review.study_id)),
        )
        .outerjoin(Review, Review.study_id == Study.id)
        .where(Study.batch_id == batch.id)
    ).one()
    seconds = None
    if first is not None and last is not None and not n_active:
        as_utc = [d if d.tzinfo else d.replace(tzinfo=UTC) for d in (first, last)]
        seconds = max(0.0, (as_utc[1] - as_utc[0]).total_seconds())
    return {
        "classes": {str(k): int(v) for k, v in by_class.items()},
        "bands": {band: int(by_band.get(band, 0)) for band in BANDS}
        | {str(k): int(v) for k, v in by_band.items() if k not in BANDS},
        "failures": failures,
        "seconds": seconds,
        "reviewed": int(reviewed or 0),
    }


def batch_payload(session: Session, *, batch: Batch, query: ReportQuery | None = None) -> dict[str, Any]:
    """The JSON export of a batch: notice, batch metadata, progress, summary, one entry per study.

    With a query (the API), one page of the filtered, ordered studies and the page numbers.
    """
    progress = batch_progress(session, batch_ids=[batch.id])[batch.id]
    page = report_page(session, batch=batch, query=query)
    legends = row_legends(session, page.rows)
    studies = [
        {k: v for k, v in row.items() if k not in ("has_thumbnail", "model_version_id")} for row in page.rows
    ]
    # Re-screening adds predictions and never overwrites: the export carries all of them, oldest first.
    history = all_predictions(session, study_ids=[row["study_id"] for row in studies])
    for row in studies:
        row["predictions"] = history.get(row["study_id"], [])
    return {
        "notice": NOTICE,
        "batch": {
            "id": batch.id,
            "name": batch.name,
            "notes": batch.notes,
            "owner": batch.owner.username,
            "created_at": iso_utc(batch.created_at),
        },
        "progress": progress.as_dict(),
        "summary": batch_summary(session, batch=batch),
        "total": page.total,
        "page": page.page,
        "per_page": page.per_page,
        "pages": page.pages,
        # what each band means, per model version that made a prediction here (every report carries it)
        "band_legend": {
            row["model_version"]: legends[int(row["model_version_id"])]
            for row in page.rows
            if row.get("model_version_id") and int(row["model_version_id"]) in legends
        }
        or {"generic": legend_of(None)},
        "studies": studies,
    }
