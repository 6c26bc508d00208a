"""One study: the page (image, heat map, probabilities, band, review, audit trail, previous/next), the
display image, the heat map, the original file and the study's PDF."""

from __future__ import annotations

import io
import re

from flask import Blueprint, abort, render_template, request, send_file, url_for
from flask_login import login_required
from werkzeug.wrappers import Response

from store.audit import list_events, record_event
from store.heatmaps import heatmap_png, heatmap_status
from store.models_registry import band_legends
from store.reports import NOTICE, ordered_study_ids, study_report_row
from store.studies import get_study_for, image_data
from store.tables import Study
from web.auth import current_row
from web.common import REVIEW_ROLES, band_legend, report_args, report_query
from web.db import get_db, get_settings
from web.imaging import MIME, dicom_summary, display_png
from web.pdf import study_pdf
from web.review import ReviewForm

bp = Blueprint("studies", __name__)


def _study(study_id: int) -> Study:
    study = get_study_for(get_db(), user=current_row(), study_id=study_id)
    if study is None:
        abort(404)
    return study


def _legend_for(row: dict) -> list[tuple[str, str]]:
    mv_id = row.get("model_version_id")
    stored = band_legends(get_db(), version_ids=[mv_id]).get(mv_id) if mv_id else None
    return band_legend(stored)


def _heatmap(study: Study, row: dict) -> tuple[str, bytes | None]:
    """("ready" | "pending" | "failed: reason" | "none", png) for the study's latest prediction."""
    if not row.get("model_version_id"):
        return "none", None
    status = heatmap_status(get_db(), study_id=study.id, model_version_id=row["model_version_id"])
    if status is None:
        return "pending", None
    if status.error:
        return f"failed: {status.error}", None
    return "ready", None


@bp.route("/studies/<int:study_id>")
@login_required
def study(study_id: int) -> str:
    """The study page; the report's filters and order in the query string set previous/next."""
    db = get_db()
    study = _study(study_id)
    row = study_report_row(db, study=study)
    query = report_query(request.args, default_sort="priority")
    ids = ordered_study_ids(db, batch=study.batch, query=query)
    prev_id = next_id = None
    if study.id in ids:
        at = ids.index(study.id)
        prev_id = ids[at - 1] if at > 0 else None
        next_id = ids[at + 1] if at + 1 < len(ids) else None
    data = image_data(db, sha256=study.image_sha256) if study.image_sha256 else None
    heat_state, _ = _heatmap(study, row)
    events, _total = list_events(db, study_id=study.id, per_page=100)
    can_review = current_row().role in REVIEW_ROLES
    nav = report_args(request.args, page=None)
    return render_template(
        "study.html",
        study=study,
        batch=study.batch,
        row=row,
        legend=_legend_for(row),
        heat_state=heat_state,
        dicom=dicom_summary(data) if data else [],
        events=events,
        position=(ids.index(study.id) + 1, len(ids)) if study.id in ids else None,
        prev_url=url_for("studies.study", study_id=prev_id, **nav) if prev_id else None,
        next_url=url_for("studies.study", study_id=next_id, **nav) if next_id else None,
        back_url=url_for("reports.report", batch_id=study.batch_id, **report_args(request.args)),
        here=url_for("studies.study", study_id=study.id, **nav),
        can_review=can_review,
        review_form=ReviewForm() if can_review else None,
        has_image=data is not None,
    )


@bp.route("/studies/<int:study_id>/image.png")
@login_required
def image(study_id: int) -> Response:
    """The study's image as an 8-bit PNG the browser can draw (DICOM windowed as the model reads it)."""
    study = _study(study_id)
    data = image_data(get_db(), sha256=study.image_sha256) if study.image_sha256 else None
    png = display_png(data, max_pixels=get_settings().max_image_pixels) if data else None
    if png is None:
        abort(404)
    resp = Response(png, mimetype="image/png")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


@bp.route("/studies/<int:study_id>/heatmap.png")
@login_required
def heatmap(study_id: int) -> Response:
    """The Grad-CAM heat map (RGBA PNG) of the study's latest prediction; 404 while it is pending."""
    study = _study(study_id)
    row = study_report_row(get_db(), study=study)
    png = (
        heatmap_png(get_db(), study_id=study.id, model_version_id=row["model_version_id"])
        if row.get("model_version_id")
        else None
    )
    if not png:
        abort(404, description="No heat map (yet) for this study.")
    resp = Response(png, mimetype="image/png")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


def _safe_name(name: str, fallback: str) -> str:
    # The client's file name is metadata: keep its base name only, in plain characters.
    base = re.split(r"[\\/]", name)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or fallback


@bp.route("/studies/<int:study_id>/original")
@login_required
def original(study_id: int) -> Response:
    """The file as uploaded, as an attachment (never rendered inline; nosniff is set on every response)."""
    db = get_db()
    study = _study(study_id)
    data = image_data(db, sha256=study.image_sha256) if study.image_sha256 else None
    if data is None:
        abort(404, description="The original file of this study is not stored.")
    record_event(db, user_id=current_row().id, action="study.download", target=f"study:{study.id}")
    db.commit()
    return send_file(
        io.BytesIO(data),
        mimetype=MIME.get(study.format, "application/octet-stream"),
        as_attachment=True,
        download_name=_safe_name(study.original_filename, f"study-{study.id}"),
    )


@bp.route("/studies/<int:study_id>/report.pdf")
@login_required
def pdf(study_id: int) -> Response:
    """The study as a PDF (image, heat map, probabilities, band and legend, review, notice on every page)."""
    db = get_db()
    study = _study(study_id)
    row = study_report_row(db, study=study)
    data = image_data(db, sha256=study.image_sha256) if study.image_sha256 else None
    image_png = display_png(data, max_pixels=get_settings().max_image_pixels) if data else None
    heat = (
        heatmap_png(db, study_id=study.id, model_version_id=row["model_version_id"])
        if row.get("model_version_id")
        else None
    )
    body = study_pdf(
        row=row,
        batch=study.batch,
        image_png=image_png,
        heatmap_png=heat,
        legend=_legend_for(row),
        dicom=dicom_summary(data) if data else [],
        notice=NOTICE,
    )
    resp = Response(body, mimetype="application/pdf")
    resp.headers["Content-Disposition"] = f'attachment; filename="cxr-study-{study.id}.pdf"'
    return resp
