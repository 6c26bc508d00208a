"""Batch report (HTML, CSV, JSON); every one carries the not-a-medical-device notice."""

from __future__ import annotations

import csv
import io
import logging
import re
from typing import Any

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, url_for
from flask_login import login_required
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from store.models_registry import serving_version
from store.studies import batch_progress, get_batch_for, rescreen_batch, study_rows
from store.tables import Batch, ModelVersion, Prediction, Review, User
from web.auth import current_row
from web.db import get_db, get_settings
from web.review import REVIEW_ROLES, ReviewForm
from worker import app as queue

bp = Blueprint("reports", __name__)
log = logging.getLogger(__name__)

NOTICE = "Research and teaching tool — not a medical device; not for diagnosis."
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


class RescreenForm(FlaskForm):
    """An empty form: re-screening a batch is a CSRF-checked POST."""


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
            "at": review.created_at.isoformat(),
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
                "created_at": pred.created_at.isoformat(),
            }
        )
    return out


def study_dicts(session: Session, *, batch: Batch) -> list[dict[str, Any]]:
    """One plain dict per study of the batch, with its latest prediction (the shape of the JSON export)."""
    versions: dict[int, str] = {}
    out = []
    rows = study_rows(session, batch_id=batch.id)
    reviews = latest_reviews(session, study_ids=[study.id for study, _ in rows])
    for study, pred in rows:
        review = reviews.get(study.id)
        version = None
        if pred is not None:
            if pred.model_version_id not in versions:
                mv = session.get(ModelVersion, pred.model_version_id)
                versions[pred.model_version_id] = mv.version if mv else str(pred.model_version_id)
            version = versions[pred.model_version_id]
        out.append(
            {
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
                "error": study.error,
                "review_label": review["label"] if review else None,
                "review_note": review["note"] if review else None,
                "review_agrees": review["agrees"] if review else None,
                "reviewer": review["reviewer"] if review else None,
                "reviewed_at": review["at"] if review else None,
            }
        )
    return out


def batch_payload(session: Session, *, batch: Batch) -> dict[str, Any]:
    """The JSON export of a batch: notice, batch metadata, progress, one entry per study."""
    progress = batch_progress(session, batch_ids=[batch.id])[batch.id]
    studies = [
        {k: v for k, v in row.items() if k != "has_thumbnail"} for row in study_dicts(session, batch=batch)
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
            "created_at": batch.created_at.isoformat(),
        },
        "progress": progress.as_dict(),
        "studies": studies,
    }


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
    if not RescreenForm().validate_on_submit():
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
