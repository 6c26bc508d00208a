"""Admin pages: accounts (create, reset, disable, API tokens), the audit log, operations and drift by week."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, Length

from store.audit import list_events
from store.drift import (
    MAX_BRIGHT_BORDER_SHARE,
    MAX_MIX_DISTANCE,
    MEAN_INTENSITY_RANGE,
    MIN_SHORT_SIDE,
    MIN_STUDIES,
    weekly_drift,
)
from store.ops import ops_summary
from store.tables import Role
from store.users import (
    UserError,
    create_user,
    get_user,
    issue_api_token,
    list_users,
    reset_password,
    set_active,
)
from web.auth import current_row
from web.common import ActionForm, admin_required
from web.db import get_db, get_settings

bp = Blueprint("admin", __name__, url_prefix="/admin")
DRIFT_WEEKS = 8  # calendar weeks of the drift roll-up on the operations page


class NewUserForm(FlaskForm):
    """A new account."""

    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField(
        "Password (10 characters or more)", validators=[DataRequired(), Length(min=10, max=1024)]
    )
    role = SelectField("Role", choices=[(r.value, r.value) for r in Role], default=Role.USER.value)


def _page(
    form: NewUserForm,
    token: tuple[str, str] | None = None,
    status: int = 200,
    temporary: tuple[str, str] | None = None,
) -> tuple[str, int]:
    return (
        render_template(
            "admin/users.html",
            users=list_users(get_db()),
            form=form,
            token_form=ActionForm(),
            token=token,
            temporary=temporary,
            me=current_row().id,
        ),
        status,
    )


@bp.route("/users", methods=["GET", "POST"])
@admin_required
def users() -> tuple[str, int] | Response:
    """List accounts and create one."""
    form = NewUserForm()
    if form.validate_on_submit():
        db = get_db()
        try:
            user = create_user(
                db,
                username=form.username.data or "",
                password=form.password.data or "",
                role=Role(form.role.data),
                created_by=current_row().id,
            )
        except UserError as exc:
            db.rollback()
            flash(str(exc), "error")
            return _page(form, status=400)
        db.commit()
        flash(f"Created {user.role.value} account “{user.username}”.", "info")
        return redirect(url_for("admin.users"))
    return _page(form, status=400 if form.is_submitted() else 200)


@bp.route("/users/<int:user_id>/token", methods=["POST"])
@admin_required
def token(user_id: int) -> tuple[str, int]:
    """Issue (or replace) a user's API token and show it once; it is never stored in the session cookie."""
    if not ActionForm().validate_on_submit():
        abort(400)
    db = get_db()
    user = get_user(db, user_id=user_id)
    if user is None:
        abort(404)
    plain = issue_api_token(db, user=user)
    db.commit()
    return _page(NewUserForm(formdata=None), token=(user.username, plain))


def _target_user(user_id: int):  # noqa: ANN202 - a store User
    if not ActionForm().validate_on_submit():
        abort(400)
    user = get_user(get_db(), user_id=user_id)
    if user is None:
        abort(404)
    return user


@bp.route("/users/<int:user_id>/reset", methods=["POST"])
@admin_required
def reset(user_id: int) -> tuple[str, int]:
    """Give a user a temporary password (shown once) that must be changed at the next sign-in."""
    user = _target_user(user_id)
    db = get_db()
    temporary = reset_password(db, user=user, admin=current_row())
    db.commit()
    return _page(NewUserForm(formdata=None), temporary=(user.username, temporary))


@bp.route("/users/<int:user_id>/active", methods=["POST"])
@admin_required
def active(user_id: int) -> Response:
    """Disable or re-enable an account (form field active=0|1); a disabled user is signed out at once."""
    user = _target_user(user_id)
    db = get_db()
    want = request.form.get("active") == "1"
    try:
        set_active(db, user=user, active=want, admin=current_row())
    except UserError as exc:
        db.rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.users"))
    db.commit()
    flash(f"Account “{user.username}” {'enabled' if want else 'disabled'}.", "info")
    return redirect(url_for("admin.users"))


@bp.route("/audit")
@admin_required
def audit() -> str:
    """Who did what when, newest first; filter by user and by batch (?user=<id>&batch=<id>)."""
    db = get_db()
    user_id = request.args.get("user", type=int)
    batch_id = request.args.get("batch", type=int)
    page = max(1, request.args.get("page", 1, type=int))
    per_page = 100
    events, total = list_events(db, user_id=user_id, batch_id=batch_id, page=page, per_page=per_page)
    return render_template(
        "admin/audit.html",
        events=events,
        total=total,
        page=page,
        pages=max(1, -(-total // per_page)),
        users=list_users(db),
        user_id=user_id,
        batch_id=batch_id,
    )


@bp.route("/ops")
@admin_required
def ops() -> str:
    """Queue depth, studies per minute, recent failures, readiness and drift by week, without Prometheus."""
    from web.health import celery_for, readiness
    from worker.app import queue_depths

    settings = get_settings()
    app = celery_for(settings)
    depths: dict[str, int] | str
    try:
        depths = queue_depths(app)
    except Exception as exc:  # noqa: BLE001 - the page shows what it can
        depths = f"{type(exc).__name__}: {exc}"
    bounds = {
        "bright_border": MAX_BRIGHT_BORDER_SHARE,
        "intensity": MEAN_INTENSITY_RANGE,
        "short_side": MIN_SHORT_SIDE,
        "mix": MAX_MIX_DISTANCE,
        "min_studies": MIN_STUDIES,
    }
    return render_template(
        "admin/ops.html",
        depths=depths,
        summary=ops_summary(get_db()),
        checks=readiness(settings, app, model_files_here=False),
        weeks=weekly_drift(get_db(), weeks=DRIFT_WEEKS),
        bounds=bounds,
        drift_weeks=DRIFT_WEEKS,
    )
