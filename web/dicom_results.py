"""Downloads of a study's results as DICOM: /studies/<id>/sr.dcm (Structured Report), /sc.dcm (Grad-CAM)."""

from __future__ import annotations

from flask import Blueprint, abort
from flask_login import login_required
from werkzeug.wrappers import Response

from store.dicom_results import dicom_result_for
from web.auth import current_row
from web.db import get_db

bp = Blueprint("dicom_results", __name__)


@bp.route("/studies/<int:study_id>/<any(sr, sc):kind>.dcm")
@login_required
def download(study_id: int, kind: str) -> Response:
    """The newest SR or SC of a study the user may see; 404 until the worker has made it."""
    result = dicom_result_for(get_db(), user=current_row(), study_id=study_id, kind=kind)
    if result is None:
        abort(404)
    resp = Response(result.data, mimetype="application/dicom")
    resp.headers["Content-Disposition"] = f'attachment; filename="study-{study_id}-{kind}.dcm"'
    resp.headers["Cache-Control"] = "private, no-store"
    return resp
