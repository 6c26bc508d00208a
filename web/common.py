"""What several blueprints share: role checks, the empty CSRF-checked form, review limits, uploaded files.

Blueprints import from here and from below (intake, store, worker.app), never from each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar, cast

from flask import abort
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from markupsafe import Markup
from werkzeug.datastructures import FileStorage

from store.reports import ReportQuery, legend_of
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


PER_PAGE = 50
MAX_PER_PAGE = 500
MAX_PAGE = 10**6  # a larger page number would overflow SQL's OFFSET (schemathesis found the 500)
MAX_ROW_ID = 2**63 - 1  # the largest id SQL holds (a BIGINT); a larger one names nothing


def row_ids(text: str, *, limit: int) -> list[int]:
    """At most limit row ids from comma-separated text; anything not an id is ignored."""
    # ASCII digits only: "²".isdigit() is true, and int("²") raises
    digits = [x.strip() for x in text.split(",") if re.fullmatch(r"[0-9]{1,19}", x.strip())]
    return [n for n in map(int, digits) if n <= MAX_ROW_ID][:limit]


# Query-string keys of a report view, carried to a study page and back (its previous/next follow them).
REPORT_ARGS = ("band", "label", "status", "reviewed", "q", "sort", "dir", "page", "per_page")


def _int(value: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return min(hi, max(lo, int(value))) if value is not None else default
    except ValueError:
        return default


def report_query(args: Mapping[str, str], *, default_sort: str = "id") -> ReportQuery:
    """The filters, search, order and page of a report from a query string (unknown values ignored)."""
    reviewed = {"yes": True, "no": False}.get(args.get("reviewed", ""))
    return ReportQuery(
        band=args.get("band") or None,
        label=args.get("label") or None,
        status=args.get("status") or None,
        reviewed=reviewed,
        search=args.get("q", ""),
        sort=args.get("sort") or default_sort,
        desc=args.get("dir") == "desc",
        page=_int(args.get("page"), 1, 1, MAX_PAGE),
        per_page=_int(args.get("per_page"), PER_PAGE, 1, MAX_PER_PAGE),
    ).normalised()


def report_args(args: Mapping[str, str], **changes: object) -> dict[str, str]:
    """The report's query-string keys from args, with changes applied (None removes a key)."""
    out = {k: v for k, v in args.items() if k in REPORT_ARGS and v}
    for key, value in changes.items():
        if value is None or value == "":
            out.pop(key, None)
        else:
            out[key] = str(value)
    return out


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


def band_legend(stored: dict[str, str] | None) -> list[tuple[str, str]]:
    """(band, meaning) in the bands' order: a model version's own legend, else the generic one."""
    return list(legend_of(stored).items())


def band_slug(band: str | None) -> str:
    """A CSS class name for a band ("COVID-19 suspected" -> "band-covid-19-suspected")."""
    return "band-" + "".join(c if c.isalnum() else "-" for c in (band or "none").lower())


def time_tag(value: datetime | None) -> Markup:
    """A <time> element for a stored (UTC) datetime: UTC text that app.js shows in the local zone."""
    if value is None:
        return Markup("")
    if value.tzinfo is None:  # SQLite hands back naive datetimes; every stored one is UTC
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return Markup('<time datetime="{}">{}</time>').format(
        value.isoformat(), value.strftime("%Y-%m-%d %H:%M UTC")
    )
