"""Batch report (HTML, CSV, JSON, PDF) and batch deletion; every report carries the not-a-medical-device
notice."""

from __future__ import annotations

import csv
import io
import logging
import re
from datetime import UTC, datetime

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import login_required
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from store.drift import batch_drift
from store.models_registry import band_legends, serving_version
from store.reports import (
    BANDS,
    NOTICE,
    STATUSES,
    ReportQuery,
    batch_payload,
    batch_summary,
    legend_of,
    report_page,
    row_legends,
    stored_thumbnails,
    study_dicts,
)
from store.reviews import LABELS
from store.studies import batch_progress, delete_batch, get_batch_for, rescreen_batch
from store.tables import Batch
from web.auth import current_row
from web.common import REVIEW_ROLES, ActionForm, band_legend, report_args, report_query
from web.db import get_db, get_settings
from web.pdf import batch_pdf
from web.review import ReviewForm
from worker import app as queue

bp = Blueprint("reports", __name__)
log = logging.getLogger(__name__)

# Provenance rides in columns (no comment line before the header: spreadsheet tools read it as data).
CSV_COLUMNS = (
    "batch_id",
    "study_id",
    "file_name",
    "status",
    "format",
    "width",
    "height",
    "predicted_class",
    "p_covid",
    "p_normal",
    "p_pneumonia",
    "triage",
    "triage_meaning",
    "model_version",
    "error",
    "review_label",
    "review_note",
    "exported_at",
    "notice",
)


def _csv_cell(value: object) -> object:
    # A file name like "=HYPERLINK(...)" must not become a formula when the CSV is opened in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def batch_csv(session: Session, *, batch: Batch) -> str:
    """The CSV export: a plain header row, then one row per study with its provenance in columns."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    extra = {"batch_id": batch.id, "exported_at": datetime.now(UTC).isoformat(), "notice": NOTICE}
    rows = study_dicts(session, batch=batch)
    legends = row_legends(session, rows)
    for row in rows:
        legend = legends.get(int(row["model_version_id"] or 0)) or legend_of(None)
        meaning = {"triage_meaning": legend.get(row["triage"], "") if row.get("triage") else ""}
        writer.writerow([_csv_cell({**row, **extra, **meaning}[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def _visible_batch(batch_id: int, *, manage: bool = False) -> Batch:
    batch = get_batch_for(get_db(), user=current_row(), batch_id=batch_id, manage=manage)
    if batch is None:
        abort(404)
    return batch


def _download_name(batch: Batch, ext: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", batch.name).strip("-")[:60] or "batch"
    return f"cxr-batch-{batch.id}-{slug}.{ext}"


@bp.route("/batches/<int:batch_id>")
@login_required
def report(batch_id: int) -> str:
    """The batch report page: summary, band legend, filters, search, sortable columns, pages."""
    batch = _visible_batch(batch_id)
    db = get_db()
    progress = batch_progress(db, batch_ids=[batch.id])[batch.id]
    query = report_query(request.args)
    page = report_page(db, batch=batch, query=query)
    can_review = current_row().role in REVIEW_ROLES
    return render_template(
        "report.html",
        batch=batch,
        page=page,
        rows=page.rows,
        query=query,
        args=report_args(request.args),
        summary=batch_summary(db, batch=batch),
        legends=_legends(page.rows),
        bands=BANDS,
        labels=LABELS,
        statuses=STATUSES,
        progress=progress,
        can_review=can_review,
        can_manage=get_batch_for(db, user=current_row(), batch_id=batch.id, manage=True) is not None,
        review_form=ReviewForm() if can_review else None,
        serving=serving_version(db),
        drift=batch_drift(db, batch_id=batch.id),
    )


def _legends(rows: list[dict]) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """(model version, legend) for each version that made a prediction in rows; the generic one if none."""
    versions = {r["model_version_id"]: r["model_version"] for r in rows if r.get("model_version_id")}
    stored = band_legends(get_db(), version_ids=sorted(versions))
    if not versions:
        return [(None, band_legend(None))]
    return [(versions[vid], band_legend(stored.get(vid))) for vid in sorted(versions)]


@bp.route("/batches/<int:batch_id>/report.csv")
@login_required
def report_csv(batch_id: int) -> Response:
    """CSV export."""
    batch = _visible_batch(batch_id)
    resp = Response(batch_csv(get_db(), batch=batch), mimetype="text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="{_download_name(batch, "csv")}"'
    return resp


@bp.route("/batches/<int:batch_id>/report.json")
@login_required
def report_json(batch_id: int) -> Response:
    """JSON export."""
    batch = _visible_batch(batch_id)
    resp = jsonify(batch_payload(get_db(), batch=batch))
    resp.headers["Content-Disposition"] = f'attachment; filename="{_download_name(batch, "json")}"'
    return resp


@bp.route("/batches/<int:batch_id>/report.pdf")
@login_required
def report_pdf(batch_id: int) -> Response:
    """PDF export: summary, legend and every study, needs review first; the notice on every page."""
    batch = _visible_batch(batch_id)
    db = get_db()
    rows = report_page(db, batch=batch, query=ReportQuery(sort="priority")).rows
    legends = _legends(rows)
    body = batch_pdf(
        batch=batch,
        rows=rows,
        summary=batch_summary(db, batch=batch),
        progress=batch_progress(db, batch_ids=[batch.id])[batch.id].as_dict(),
        legend=legends[-1][1],
        thumbnails=stored_thumbnails(db, study_ids=[r["study_id"] for r in rows]),
        notice=NOTICE,
    )
    resp = Response(body, mimetype="application/pdf")
    resp.headers["Content-Disposition"] = f'attachment; filename="{_download_name(batch, "pdf")}"'
    return resp


@bp.route("/batches/<int:batch_id>/delete", methods=["POST"])
@login_required
def delete(batch_id: int) -> Response:
    """Soft-delete a batch (owner or admin): hidden everywhere, audited; unshared image bytes removed."""
    batch = _visible_batch(batch_id, manage=True)
    if not ActionForm().validate_on_submit():
        abort(400)
    db = get_db()
    delete_batch(db, batch=batch, user_id=current_row().id)
    db.commit()
    flash(f"Batch “{batch.name}” deleted.", "info")
    return redirect(url_for("batches.dashboard"))


@bp.route("/batches/<int:batch_id>/rescreen", methods=["POST"])
@login_required
def rescreen(batch_id: int) -> Response:
    """Send a finished batch through the serving model again; old predictions are kept."""
    batch = _visible_batch(batch_id, manage=True)  # owner or admin; anyone else (reviewers too) gets 404
    if not ActionForm().validate_on_submit():
        abort(400)
    db = get_db()
    back = redirect(url_for("reports.report", batch_id=batch.id))
    if not batch_progress(db, batch_ids=[batch.id])[batch.id].finished:
        flash("The batch is still being screened; re-screen it once it has finished.", "error")
        return back
    serving = serving_version(db)
    if serving is None:
        flash("No model is serving, so there is nothing to re-screen with.", "error")
        return back
    settings = get_settings()
    ids = rescreen_batch(db, batch_id=batch.id, lease_s=settings.queued_lease_s, user_id=current_row().id)
    # Commits, THEN enqueues: a worker must see the studies QUEUED.
    enqueue_error = queue.enqueue_after_commit(db, ids)
    if not ids:
        flash("No study of this batch has an image to screen again.", "info")
        return back
    if enqueue_error:  # the studies are saved QUEUED; the reconciler re-queues them after the lease
        flash(
            "The work queue could not be reached; the studies are saved and will be queued again "
            "automatically.",
            "error",
        )
        return back
    flash(
        f"Re-screening {len(ids)} studies with model {serving.version}; earlier predictions are kept.", "info"
    )
    return back
