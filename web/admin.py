"""Admin page: create accounts, list them, issue API tokens."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, Length

from store.tables import Role
from store.users import UserError, create_user, get_user, issue_api_token, list_users
from web.auth import current_row
from web.common import ActionForm, admin_required
from web.db import get_db

bp = Blueprint("admin", __name__, url_prefix="/admin")


class NewUserForm(FlaskForm):
    """A new account."""

    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField(
        "Password (10 characters or more)", validators=[DataRequired(), Length(min=10, max=1024)]
    )
    role = SelectField("Role", choices=[(r.value, r.value) for r in Role], default=Role.USER.value)


def _page(form: NewUserForm, token: tuple[str, str] | None = None, status: int = 200) -> tuple[str, int]:
    return (
        render_template(
            "admin/users.html", users=list_users(get_db()), form=form, token_form=ActionForm(), token=token
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
