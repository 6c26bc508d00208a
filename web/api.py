"""JSON API under /api/v1 for scripts: per-user bearer tokens, no cookies, so no CSRF.

Described by flask-smorest (marshmallow schemas): requests are validated by the schemas below, and the OpenAPI
document is served at /api/openapi.json. A request the schemas refuse gets 400 with {"error": ...}.
"""

from __future__ import annotations

from typing import Any

from flask import abort, g, jsonify, request, url_for
from flask_smorest import Blueprint
from marshmallow import EXCLUDE, Schema, fields, validate
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from intake.batches import ingest_files, start_batch, submit_batch
from intake.files import upload_scope
from store.reports import BANDS, NOTICE, SORTS, STATUSES, ReportQuery, batch_payload
from store.reviews import LABELS, ReviewError, review_study
from store.studies import batch_progress, batches_visible_to, get_batch_for, get_study_for
from store.tables import Batch, User
from web.common import MAX_PAGE, MAX_PER_PAGE, NOTE_MAX, REVIEW_ROLES, uploaded_files
from web.db import get_db, get_settings
from web.extensions import limiter
from web.ratelimit import UPLOAD_SCOPE, api_limit, bearer_user, upload_limit, user_key


class _JsonOrFormParser(FlaskParser):
    """Body arguments documented as JSON, also read from form fields (a multipart upload sends both)."""

    def load_json(self, req, schema):  # noqa: ANN001, ANN201 - webargs' signature
        """The JSON body, or the form fields of a form or multipart request."""
        if req.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return self.load_form(req, schema)
        return super().load_json(req, schema)


class _Blueprint(Blueprint):
    ARGUMENTS_PARSER = _JsonOrFormParser()


bp = _Blueprint(
    "api", __name__, url_prefix="/api/v1", description="Batches, uploads, progress, results and reviews."
)
# One budget per user across the whole API (CXR_RATELIMIT_API), counted before the token is checked.
limiter.shared_limit(api_limit, scope="api", key_func=user_key)(bp)
# Uploads also count against CXR_RATELIMIT_UPLOAD, shared with the web form (override_defaults=False keeps
# the API budget above on these routes too).
_upload_limited = limiter.shared_limit(
    upload_limit, scope=UPLOAD_SCOPE, key_func=user_key, methods=["POST"], override_defaults=False
)
# Every refused request is a 400, as before the schemas described the API.
INVALID = 400
PER_PAGE_API = 100


class _Lenient(Schema):
    """Unknown fields are ignored, as they always were."""

    class Meta:
        unknown = EXCLUDE


class BatchCreateArgs(_Lenient):
    """POST /batches (JSON or form fields)."""

    name = fields.String(load_default="", validate=validate.Length(max=200))
    notes = fields.String(load_default="", validate=validate.Length(max=10_000))
    start = fields.Boolean(load_default=False, metadata={"description": "with files: start screening now"})
    patient_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=64))


class ResultsArgs(_Lenient):
    """GET /batches/<id>/results: filters, order and page (as on the report page)."""

    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=MAX_PAGE))
    per_page = fields.Integer(load_default=PER_PAGE_API, validate=validate.Range(min=1, max=MAX_PER_PAGE))
    sort = fields.String(load_default="id", validate=validate.OneOf(SORTS))
    dir = fields.String(load_default="asc", validate=validate.OneOf(("asc", "desc")))
    band = fields.String(load_default=None, validate=validate.OneOf(BANDS))
    label = fields.String(load_default=None, validate=validate.OneOf(LABELS))
    status = fields.String(load_default=None, validate=validate.OneOf(STATUSES))
    reviewed = fields.Boolean(load_default=None, allow_none=True)
    q = fields.String(load_default="", validate=validate.Length(max=200))


class PatientArgs(_Lenient):
    """Optional form field of an upload."""

    patient_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=64))


class ReviewArgs(_Lenient):
    """POST /studies/<id>/review (JSON or form fields)."""

    label = fields.String(required=True, validate=validate.OneOf(LABELS))
    note = fields.String(load_default="", validate=validate.Length(max=NOTE_MAX))


def _files() -> list[tuple[str, bytes]]:
    """The multipart file parts (field "files", repeatable: PNG, JPEG, DICOM, or zips of them)."""
    return uploaded_files(request.files.getlist("files"))


@bp.before_request
def _authenticate() -> Response | None:
    user = bearer_user()
    if user is None:
        resp = jsonify({"error": "a valid API token is required (Authorization: Bearer <token>)"})
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Bearer realm="cxr"'
        return resp
    g.api_user = user
    return None


@bp.errorhandler(HTTPException)
def _json_error(exc: HTTPException) -> tuple[Response, int]:
    messages = (getattr(exc, "data", None) or {}).get("messages")
    if messages:  # refused by a schema: say which field and why
        flat = {f: m for by_location in messages.values() for f, m in by_location.items()}
        text = "; ".join(f"{f}: {' '.join(m) if isinstance(m, list) else m}" for f, m in flat.items())
        return jsonify({"error": f"invalid request ({text})", "fields": flat}), exc.code or INVALID
    return jsonify({"error": exc.description or exc.name}), exc.code or 500


def _user() -> User:
    return g.api_user


def _batch_or_404(batch_id: int, *, manage: bool = False) -> Batch:
    batch = get_batch_for(get_db(), user=_user(), batch_id=batch_id, manage=manage)
    if batch is None:
        abort(404, description="no such batch")
    return batch


def _summary(batch: Batch) -> dict[str, Any]:
    progress = batch_progress(get_db(), batch_ids=[batch.id])[batch.id]
    return {
        "id": batch.id,
        "name": batch.name,
        "notes": batch.notes,
        "created_at": batch.created_at.isoformat(),
        "progress": progress.as_dict(),
        "notice": NOTICE,
    }


@bp.get("/batches")
def list_batches() -> Response:
    """Every batch the token's user may see."""
    batches = batches_visible_to(get_db(), user=_user())
    progress = batch_progress(get_db(), batch_ids=[b.id for b in batches])
    return jsonify(
        {
            "notice": NOTICE,
            "batches": [{"id": b.id, "name": b.name, "progress": progress[b.id].as_dict()} for b in batches],
        }
    )


@bp.post("/batches")
@bp.arguments(BatchCreateArgs, location="json", error_status_code=INVALID)
@_upload_limited
def create(params: dict[str, Any]) -> tuple[Response, int]:
    """Create a batch; with multipart files and start=true it is also uploaded and started in one call.

    JSON, or multipart form fields with the images as repeatable file parts named "files".
    """
    name, notes = params["name"], params["notes"]
    db = get_db()
    files = _files()
    if not files and params["start"]:
        # Started empty, a batch would be "finished" at once with nothing in it: refuse it with the reason.
        abort(400, description='no files to start: send the images as multipart form field "files"')
    start = bool(files) and params["start"]
    # One path with or without start (the same audit event); started: committed, then enqueued.
    with upload_scope(get_settings()):  # inflated bytes stay counted until the batch is stored
        result = submit_batch(
            db,
            owner=_user(),
            name=name,
            notes=notes,
            files=files,
            settings=get_settings(),
            patient_id=params["patient_id"] or None,
            start=start,
        )
    body = _summary(result.batch)
    body.update(study_ids=result.study_ids, queued=result.start.queued)
    if start:
        body["enqueue_error"] = result.start.enqueue_error
    return jsonify(body), 201


@bp.post("/batches/<int:batch_id>/files")
@bp.arguments(PatientArgs, location="json", error_status_code=INVALID)
@_upload_limited
def upload(form: dict[str, Any], batch_id: int) -> tuple[Response, int]:
    """Add files (multipart field "files", repeatable; zips expanded) to a batch; they wait for start."""
    batch = _batch_or_404(batch_id, manage=True)
    files = _files()
    if not files:
        abort(400, description='send the images as multipart form field "files"')
    db = get_db()
    with upload_scope(get_settings()):
        ids = ingest_files(
            db,
            batch=batch,
            files=files,
            settings=get_settings(),
            patient_id=form["patient_id"] or None,
        )
        db.commit()
    body = _summary(batch)
    body["study_ids"] = ids
    return jsonify(body), 201


@bp.post("/batches/<int:batch_id>/start")
def start(batch_id: int) -> Response:
    """Queue every RECEIVED study of the batch (committed before it is enqueued)."""
    batch = _batch_or_404(batch_id, manage=True)
    if not batch_progress(get_db(), batch_ids=[batch.id])[batch.id].total:
        abort(400, description="the batch has no files yet: POST them to /batches/<id>/files first")
    result = start_batch(get_db(), batch=batch, settings=get_settings())
    body = _summary(batch)
    body.update(queued=result.queued, enqueue_error=result.enqueue_error)
    return jsonify(body)


@bp.get("/batches/<int:batch_id>")
def progress(batch_id: int) -> Response:
    """A batch with its progress (poll this)."""
    return jsonify(_summary(_batch_or_404(batch_id)))


@bp.get("/batches/<int:batch_id>/results")
@bp.arguments(ResultsArgs, location="query", error_status_code=INVALID)
def results(params: dict[str, Any], batch_id: int) -> Response:
    """One page of the studies with their predictions or errors (the JSON export's shape, paginated).

    `next`/`prev` hold the URLs of the neighbouring pages (null at the ends), also sent as a `Link` header.
    """
    query = ReportQuery(
        band=params["band"],
        label=params["label"],
        status=params["status"],
        reviewed=params["reviewed"],
        search=params["q"],
        sort=params["sort"],
        desc=params["dir"] == "desc",
        page=params["page"],
        per_page=params["per_page"],
    )
    body = batch_payload(get_db(), batch=_batch_or_404(batch_id), query=query)
    links = []
    for rel, number in (("prev", body["page"] - 1), ("next", body["page"] + 1)):
        url = None
        if 1 <= number <= body["pages"]:
            args = {k: v for k, v in request.args.items() if k != "page"}
            url = url_for("api.results", batch_id=batch_id, page=number, _external=True, **args)
            links.append(f'<{url}>; rel="{rel}"')
        body[rel] = url
    resp = jsonify(body)
    if links:
        resp.headers["Link"] = ", ".join(links)
    return resp


@bp.post("/studies/<int:study_id>/review")
@bp.arguments(ReviewArgs, location="json", error_status_code=INVALID)
def review(params: dict[str, Any], study_id: int) -> tuple[Response, int]:
    """Confirm or correct a finished study's label (JSON {label, note}); reviewers and admins only."""
    user = _user()
    if user.role not in REVIEW_ROLES:
        abort(403, description="only reviewers and admins may review studies")
    db = get_db()
    study = get_study_for(db, user=user, study_id=study_id)
    if study is None:
        abort(404, description="no such study")
    label, note = params["label"], params["note"] or ""
    try:
        saved = review_study(db, study=study, reviewer=user, label=label, note=note)
    except ReviewError as exc:
        db.rollback()
        abort(409, description=str(exc))
    db.commit()
    body = {
        "study_id": study.id,
        "review_id": saved.id,
        "label": saved.label,
        "agrees": saved.agrees,
        "note": saved.note,
        "reviewer": user.username,
        "notice": NOTICE,
    }
    return jsonify(body), 201
