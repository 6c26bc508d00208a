"""Reviewers confirm or correct the label of a finished study (form on the batch report)."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, request, url_for
from flask_login import login_required
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import SelectField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional

from store.reviews import LABELS, ReviewError, review_study
from store.studies import get_study_for
from web.auth import current_row, safe_next
from web.common import NOTE_MAX, REVIEW_ROLES
from web.db import get_db

bp = Blueprint("review", __name__)


class ReviewForm(FlaskForm):
    """The reviewer's label for one study and an optional note."""

    label = SelectField("Label", choices=[(x, x) for x in LABELS], validators=[DataRequired()])
    note = TextAreaField("Note", validators=[Optional(), Length(max=NOTE_MAX)])


@bp.route("/studies/<int:study_id>/review", methods=["POST"])
@login_required
def review(study_id: int) -> Response:
    """Record a confirmation or correction, then go back (to the study page it came from, or the report)."""
    user = current_row()
    if user.role not in REVIEW_ROLES:
        abort(403, description="Only reviewers and administrators may review studies.")
    db = get_db()
    study = get_study_for(db, user=user, study_id=study_id)
    if study is None:
        abort(404)
    back = redirect(
        safe_next(request.form.get("next"))
        or url_for("reports.report", batch_id=study.batch_id, _anchor=f"study-{study.id}")
    )
    form = ReviewForm()
    if not form.validate_on_submit():
        errors = "; ".join(f"{name}: {e}" for name, errs in form.errors.items() for e in errs)
        abort(400, description=f"The review was not saved ({errors or 'invalid form'}).")
    try:
        saved = review_study(db, study=study, reviewer=user, label=form.label.data, note=form.note.data or "")
    except ReviewError as exc:
        db.rollback()
        flash(f"Review of study {study.id} not saved: {exc}.", "error")
        return back
    db.commit()
    verdict = "confirmed" if saved.agrees else "corrected to"
    flash(f"Study {study.id} {verdict} {saved.label}.", "info")
    return back
