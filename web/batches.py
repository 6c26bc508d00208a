"""Dashboard, new-batch upload, progress polling and owner-checked thumbnails."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import login_required
from flask_wtf import FlaskForm
from flask_wtf.file import MultipleFileField
from werkzeug.wrappers import Response
from wtforms import StringField, TextAreaField
from wtforms.validators import Length, Optional

from intake.batches import study_thumbnail, submit_batch
from intake.files import upload_scope
from store.retraining import retraining_progress
from store.studies import batch_progress, batches_visible_to, get_batch_for, get_study_for
from web.auth import current_row
from web.common import row_ids, uploaded_files
from web.db import get_db, get_settings
from web.extensions import limiter
from web.ratelimit import UPLOAD_SCOPE, upload_limit, user_key

bp = Blueprint("batches", __name__)


class NewBatchForm(FlaskForm):
    """Name, notes and many files (PNG, JPEG, DICOM, or zips of them)."""

    name = StringField("Batch name", validators=[Optional(), Length(max=200)])
    notes = TextAreaField("Notes", validators=[Optional(), Length(max=10_000)])
    patient_id = StringField(
        "Patient ID (optional; only if every file is from one patient)",
        validators=[Optional(), Length(max=64)],
    )
    files = MultipleFileField("Images")


@bp.route("/")
@login_required
def dashboard() -> str:
    """Every batch the user may see, with progress."""
    db = get_db()
    batches = batches_visible_to(db, user=current_row())
    progress = batch_progress(db, batch_ids=[b.id for b in batches])
    return render_template(
        "dashboard.html",
        batches=batches,
        progress=progress,
        form=NewBatchForm(),
        retraining=retraining_progress(db),
    )


@bp.route("/batches/new", methods=["GET", "POST"])
@login_required
@limiter.shared_limit(upload_limit, scope=UPLOAD_SCOPE, key_func=user_key, methods=["POST"])
def new_batch() -> str | Response | tuple[str, int]:
    """Upload form; on submit the batch is stored, committed, then queued."""
    form = NewBatchForm()
    if form.validate_on_submit():
        files = uploaded_files(request.files.getlist(form.files.name))
        if not files:
            flash("Choose at least one file to upload.", "error")
            return render_template("new_batch.html", form=form), 400
        settings = get_settings()
        # Inflated and decoded bytes stay counted until the batch is stored (intake.files.upload_scope).
        with upload_scope(settings):
            result = submit_batch(
                get_db(),
                owner=current_row(),
                name=form.name.data or "",
                notes=form.notes.data or "",
                files=files,
                settings=settings,
                patient_id=form.patient_id.data or None,
            )
        n = len(result.study_ids)
        msg = f"Batch “{result.batch.name}” received: {n} studies, {len(result.start.queued)} queued"
        msg += f", {result.failed} rejected (see the report)." if result.failed else "."
        flash(msg, "info")
        if result.start.enqueue_error:
            flash(
                "The work queue could not be reached; the studies are saved and will be queued again "
                "automatically.",
                "error",
            )
        return redirect(url_for("batches.dashboard"))
    if request.method == "POST":
        return render_template("new_batch.html", form=form), 400
    return render_template("new_batch.html", form=form)


@bp.route("/batches/progress.json")
@login_required
def progress_many() -> Response:
    """Progress of the requested batches (?ids=1,2,3) the user may see; ?retraining=1 adds the active run."""
    db = get_db()
    user = current_row()
    wanted = row_ids(request.args.get("ids", ""), limit=200)
    visible = [b.id for b in (get_batch_for(db, user=user, batch_id=i) for i in wanted) if b is not None]
    progress = batch_progress(db, batch_ids=visible)
    body: dict[str, Any] = {str(bid): p.as_dict() for bid, p in progress.items()}
    if request.args.get("retraining") == "1":
        body["retraining"] = retraining_progress(db)
    return jsonify(body)


@bp.route("/batches/<int:batch_id>/progress.json")
@login_required
def progress_one(batch_id: int) -> Response:
    """Progress of one batch."""
    db = get_db()
    batch = get_batch_for(db, user=current_row(), batch_id=batch_id)
    if batch is None:
        abort(404)
    return jsonify(batch_progress(db, batch_ids=[batch.id])[batch.id].as_dict())


@bp.route("/studies/<int:study_id>/thumbnail.png")
@login_required
def thumbnail(study_id: int) -> Response:
    """A study's preview, for users who may see its batch; made from the stored image on first request."""
    db = get_db()
    study = get_study_for(db, user=current_row(), study_id=study_id)
    if study is None:
        abort(404)
    png = study_thumbnail(db, study=study)
    if not png:
        abort(404)
    resp = Response(png, mimetype="image/png")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp
