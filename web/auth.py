"""Sign in and out (Flask-Login, CSRF-protected forms) and the current-user wrapper."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, flash, make_response, redirect, render_template, request, url_for
from flask_login import UserMixin, current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length

from store.audit import record_event
from store.tables import User
from store.users import (
    MIN_PASSWORD,
    UserError,
    authenticate,
    change_own_password,
    end_sessions,
    get_user,
    issue_api_token,
    revoke_api_token,
)
from web.common import ActionForm
from web.db import get_db
from web.extensions import login_manager
from web.ratelimit import client_address, login_throttle

bp = Blueprint("auth", __name__)


class LoginUser(UserMixin):
    """Flask-Login view of a store User; the ORM row is in .row."""

    def __init__(self, row: User) -> None:
        self.row = row
        self.id = row.id
        self.username = row.username
        self.role = row.role

    @property
    def is_active(self) -> bool:  # type: ignore[override]
        """Disabled accounts cannot use their session."""
        return bool(self.row.is_active)

    @property
    def is_admin(self) -> bool:
        """True for administrators."""
        return self.row.is_admin

    def get_id(self) -> str:
        """Session id: changes with the password and the user's session generation (logout, disable, revoke
        and password changes bump it), so every session issued before ends at its next request."""
        return f"{self.row.id}:{self.row.password_hash[-12:]}:{self.row.session_generation or 0}"


@login_manager.user_loader
def _load_user(session_id: str) -> LoginUser | None:
    user_id, _, rest = session_id.partition(":")
    fingerprint, _, generation = rest.rpartition(":")
    if not user_id.isdigit():
        return None
    row = get_user(get_db(), user_id=int(user_id))
    if row is None or not row.is_active or row.password_hash[-12:] != fingerprint:
        return None
    if generation != str(row.session_generation or 0):
        return None
    return LoginUser(row)


def current_row() -> User:
    """The signed-in user's ORM row (views are behind login_required)."""
    return current_user.row  # type: ignore[attr-defined]


class LoginForm(FlaskForm):
    """Username and password."""

    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


def safe_next(target: str | None) -> str | None:
    """target if it is a same-site relative path, else None."""
    # Only same-site relative paths: an open redirect would let a link send users elsewhere after sign-in.
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


class PasswordForm(FlaskForm):
    """Change one's own password."""

    current = PasswordField("Current password", validators=[DataRequired(), Length(max=1024)])
    new = PasswordField(
        f"New password ({MIN_PASSWORD} characters or more)",
        validators=[DataRequired(), Length(min=MIN_PASSWORD, max=1024)],
    )
    confirm = PasswordField(
        "New password again", validators=[DataRequired(), EqualTo("new", message="the two entries differ")]
    )


# Where a user who must change their password may still go (everything else redirects to the form).
_OPEN_WHILE_FORCED = {"auth.password", "auth.logout", "static"}


@bp.before_app_request
def _force_password_change() -> Response | None:
    """A temporary password (first admin, admin reset) must be replaced before anything else."""
    if not current_user.is_authenticated or not current_user.row.must_change_password:
        return None
    if request.endpoint in _OPEN_WHILE_FORCED or request.blueprint == "api":
        return None
    return redirect(url_for("auth.password"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def password() -> str | Response | tuple[str, int]:
    """Change one's own password; the other sessions of this account end (the session id changes)."""
    form = PasswordForm()
    forced = current_row().must_change_password
    if form.validate_on_submit():
        db = get_db()
        try:
            change_own_password(
                db, user=current_row(), current=form.current.data or "", new=form.new.data or ""
            )
        except UserError as exc:
            db.rollback()
            form.current.errors = [str(exc)]
            return render_template("password.html", form=form, forced=forced), 400
        db.commit()
        login_user(LoginUser(current_row()))  # the new fingerprint keeps this session signed in
        flash("Password changed.", "info")
        return redirect(url_for("auth.account"))
    status = 400 if form.is_submitted() else 200
    return render_template("password.html", form=form, forced=forced), status


@bp.route("/login", methods=["GET", "POST"])
def login() -> str | Response | tuple[str, int]:
    """Show and process the sign-in form."""
    if current_user.is_authenticated:
        return redirect(url_for("batches.dashboard"))
    form = LoginForm()
    if form.validate_on_submit():
        username, address = form.username.data or "", client_address()
        throttle = login_throttle()
        # Checked before any hash: a refused try costs a storage read, and is the same for every name.
        wait = throttle.wait_s(username, address)
        if wait:
            msg = f"Too many failed sign-ins for this name or from this address. Try again in {wait} s."
            flash(msg, "error")
            resp = make_response(render_template("login.html", form=form), 429)
            resp.headers["Retry-After"] = str(wait)
            return resp
        db = get_db()
        user = authenticate(db, username=username, password=form.password.data or "")
        if user is None:
            record_event(db, user_id=None, action="auth.login_failed", target=username[:64])
            db.commit()
            wait = throttle.failed(username, address)
            later = f" Wait {wait} s before the next try." if wait else ""
            flash("Wrong username or password." + later, "error")
            return render_template("login.html", form=form), 401
        throttle.succeeded(username, address)
        login_user(LoginUser(user))
        record_event(db, user_id=user.id, action="auth.login", target=f"user:{user.id}")
        db.commit()
        return redirect(safe_next(request.args.get("next")) or url_for("batches.dashboard"))
    return render_template("login.html", form=form)


@bp.route("/logout", methods=["POST"])
@login_required
def logout() -> Response:
    """Sign out (POST only, CSRF-checked)."""
    form = ActionForm()
    if form.validate_on_submit():
        db = get_db()
        record_event(db, user_id=current_user.id, action="auth.logout", target=f"user:{current_user.id}")
        # A copied session cookie must not outlive the logout: every session of this user ends.
        end_sessions(db, user=current_row())
        db.commit()
        logout_user()
        flash("Signed out.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/account", methods=["GET", "POST"])
@login_required
def account() -> str:
    """The signed-in user's account: issue (or replace) a personal API token, shown once."""
    form = ActionForm()
    token = None
    if form.validate_on_submit():
        db = get_db()
        token = issue_api_token(db, user=current_row())
        db.commit()
    return render_template(
        "account.html", form=form, token=token, has_token=bool(current_row().api_token_hash)
    )


@bp.route("/account/token/revoke", methods=["POST"])
@login_required
def revoke_token() -> Response:
    """Revoke one's own API token (POST, CSRF-checked): it stops working at the next request."""
    form = ActionForm()
    if form.validate_on_submit():
        db = get_db()
        revoked = revoke_api_token(db, user=current_row())
        db.commit()
        flash("API token revoked." if revoked else "There was no API token to revoke.", "info")
    return redirect(url_for("auth.account"))
