"""What several blueprints share: role checks, the empty CSRF-checked form, review limits, uploaded files.

Blueprints import from here and from below (intake, store, worker.app), never from each other.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import abort
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from werkzeug.datastructures import FileStorage

from store.tables import Role

F = TypeVar("F", bound=Callable[..., Any])

REVIEW_ROLES = (Role.REVIEWER, Role.ADMIN)
NOTE_MAX = 2000


class ActionForm(FlaskForm):
    """An empty form: a button that changes something (sign out, issue a token, promote, re-screen) is a
    CSRF-checked POST."""


def role_required(*roles: Role) -> Callable[[F], F]:
    """Signed in (else the sign-in page) with one of these roles (else 403)."""

    def decorator(view: F) -> F:
        @wraps(view)
        @login_required
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if getattr(current_user, "role", None) not in roles:
                abort(403)
            return view(*args, **kwargs)

        return cast(F, wrapped)

    return decorator


admin_required = role_required(Role.ADMIN)
reviewer_required = role_required(*REVIEW_ROLES)


def uploaded_files(storages: list[FileStorage]) -> list[tuple[str, bytes]]:
    """(client file name, bytes) for every non-blank file part of a multipart request."""
    out = []
    for fs in storages:
        data = fs.read()
        # A form submitted with no file selected still sends one empty part without a name.
        if not fs.filename and not data:
            continue
        out.append((fs.filename or "unnamed", data))
    return out
