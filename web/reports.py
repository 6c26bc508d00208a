"""Batch report (HTML, CSV, JSON); every one carries the not-a-medical-device notice."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from flask import Blueprint, abort, jsonify, render_template
from flask_login import login_required
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

from store.studies import batch_progress, get_batch_for, study_rows
from store.tables import Batch, ModelVersion
from web.auth import current_row
from web.db import get_db

bp = Blueprint("reports", __name__)

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
)


def study_dicts(session: Session, *, batch: Batch) -> list[dict[str, Any]]:
    """One plain dict per study of the batch, with its latest prediction (the shape of the JSON export)."""
    versions: dict[int, str] = {}
    out = []
    for study, pred in study_rows(session, batch_id=batch.id):
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
            }
        )
    return out


def batch_payload(session: Session, *, batch: Batch) -> dict[str, Any]:
    """The JSON export of a batch: notice, batch metadata, progress, one entry per study."""
    progress = batch_progress(session, batch_ids=[batch.id])[batch.id]
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
        "studies": [
            {k: v for k, v in row.items() if k != "has_thumbnail"}
            for row in study_dicts(session, batch=batch)
        ],
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


def _visible_batch(batch_id: int) -> Batch:
    batch = get_batch_for(get_db(), user=current_row(), batch_id=batch_id)
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
    return render_template("report.html", batch=batch, rows=study_dicts(db, batch=batch), progress=progress)


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
