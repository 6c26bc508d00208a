"""Batch report (HTML, CSV, JSON); every one carries the not-a-medical-device notice."""

from __future__ import annotations

import csv
import io
import logging
import re

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, url_for
from flask_login import login_required
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from store.models_registry import serving_version
from store.reports import NOTICE, batch_payload, study_dicts
from store.studies import batch_progress, get_batch_for, rescreen_batch
from store.tables import Batch
from web.auth import current_row
from web.common import REVIEW_ROLES, ActionForm
from web.db import get_db, get_settings
from web.review import ReviewForm
from worker import app as queue

bp = Blueprint("reports", __name__)
log = logging.getLogger(__name__)

CSV_COLUMNS = (
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
    "model_version",
    "error",
    "review_label",
    "review_note",
)


def _csv_cell(value: object) -> object:
    # A file name like "=HYPERLINK(...)" must not become a formula when the CSV is opened in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def batch_csv(session: Session, *, batch: Batch) -> str:
    """The CSV export: a notice line, then a header and one row per study."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([f"# {NOTICE}"])
    writer.writerow(CSV_COLUMNS)
    for row in study_dicts(session, batch=batch):
        writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
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
    """The batch report page."""
    batch = _visible_batch(batch_id)
    db = get_db()
    progress = batch_progress(db, batch_ids=[batch.id])[batch.id]
    rows = study_dicts(db, batch=batch)
    can_review = current_row().role in REVIEW_ROLES
    return render_template(
        "report.html",
        batch=batch,
        rows=rows,
        progress=progress,
        can_review=can_review,
        review_form=ReviewForm() if can_review else None,
        serving=serving_version(db),
    )


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
