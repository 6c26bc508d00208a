"""Reviews: reviewers and admins confirm or correct finished studies (form and API); users cannot."""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from intake.deid import patient_pseudonym
from store.db import session_scope
from store.models_registry import promote, register_model_version
from store.studies import claim_studies, complete_studies
from store.tables import AuditEvent, Batch, Review, Role, Study, StudyStatus, User
from store.users import issue_api_token
from tests.conftest import make_user
from tests.web.conftest import corrupt_png, png_bytes, upload


def url_of(app: Flask) -> str:
    """The app's database URL."""
    return app.extensions["cxr_settings"].database_url


def add_model(
    url: str, version: str, *, serving: bool = False, metrics: dict | None = None, card: str = ""
) -> int:
    """Register a model version (optionally promoted to serve) and return its id."""
    with session_scope(url) as s:
        mv = register_model_version(
            s,
            version=version,
            artifact_path="/nonexistent",
            artifact_sha256="0" * 64,
            metrics=metrics or {},
            card=card,
            serve_if_none=False,
        )
        if serving:
            promote(s, model_version=mv, user_id=None)
        return mv.id


def finish(url: str, study_ids: list[int], model_id: int, label: str = "pneumonia") -> None:
    """Play the worker: claim and complete these studies with model_id through the real state machine."""
    token = secrets.token_hex(8)
    with session_scope(url) as s:
        claimed = claim_studies(s, study_ids=study_ids, token=token, lease_s=60, max_attempts=3)
        assert [c.id for c in claimed] == sorted(study_ids)
        for study in claimed:
            assert complete_studies(
                s,
                token=token,
                model_version_id=model_id,
                results=[
                    {
                        "study_id": study.id,
                        "label": label,
                        "p_covid": 0.1,
                        "p_normal": 0.2,
                        "p_pneumonia": 0.7,
                        "triage": "urgent review",
                        "elapsed_ms": 3.0,
                    }
                ],
            ) == [study.id]


def new_batch(
    app: Flask, client: FlaskClient, files: list[tuple[str, bytes]], **extra: str
) -> tuple[int, list[int]]:
    """Upload files through the form; returns the new batch id and its study ids."""
    assert upload(client, files, **extra).status_code == 302
    with session_scope(url_of(app)) as s:
        batch_id = s.scalar(select(Batch.id).order_by(Batch.id.desc()).limit(1))
        return batch_id, list(
            s.scalars(select(Study.id).where(Study.batch_id == batch_id).order_by(Study.id))
        )


def bearer(app: Flask, username: str) -> dict[str, str]:
    """An Authorization header with a fresh API token for username."""
    with session_scope(url_of(app)) as s:
        user = s.scalar(select(User).where(User.username == username))
        return {"Authorization": f"Bearer {issue_api_token(s, user=user)}"}


def test_reviewer_reviews_and_exports_show_it(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    url = url_of(app)
    make_user(url, "rita", Role.REVIEWER)
    rita, alice, root = login("rita"), login("alice"), login("root")
    mv = add_model(url, "v1", serving=True)
    batch_id, (s1, s2, s3) = new_batch(
        app, rita, [("a.png", png_bytes(seed=1)), ("b.png", png_bytes(seed=2)), ("c.png", corrupt_png())]
    )
    finish(url, [s1], mv)
    # The review form is on the study page, for DONE studies only.
    assert 'id="review-form"' in rita.get(f"/studies/{s1}").get_data(as_text=True)
    assert 'id="review-form"' not in rita.get(f"/studies/{s2}").get_data(as_text=True)
    assert (
        rita.post(f"/studies/{s1}/review", data={"label": "covid", "note": "=SUM(A1) GGO"}).status_code == 302
    )
    # Confirmations and corrections: the newest review is the one shown.
    assert rita.post(f"/studies/{s1}/review", data={"label": "pneumonia", "note": ""}).status_code == 302
    assert (
        rita.post(f"/studies/{s1}/review", data={"label": "covid", "note": "=SUM(A1) GGO"}).status_code == 302
    )
    assert rita.post(f"/studies/{s1}/review", data={"label": "cancer"}).status_code == 400
    rita.post(f"/studies/{s2}/review", data={"label": "normal"})  # still QUEUED: refused with a message
    assert "only studies that finished screening" in rita.get(f"/batches/{batch_id}").get_data(as_text=True)
    page = rita.get(f"/batches/{batch_id}").get_data(as_text=True)
    assert "corrected by rita" in page and "=SUM(A1) GGO" in page

    rows = list(csv.reader(io.StringIO(rita.get(f"/batches/{batch_id}/report.csv").get_data(as_text=True))))
    assert {"review_label", "review_note"} <= set(rows[0])
    by_id = {r[1]: dict(zip(rows[0], r, strict=True)) for r in rows[1:]}
    assert (by_id[str(s1)]["review_label"], by_id[str(s1)]["review_note"]) == ("covid", "'=SUM(A1) GGO")
    assert by_id[str(s3)]["review_label"] == ""
    studies = {x["study_id"]: x for x in rita.get(f"/batches/{batch_id}/report.json").get_json()["studies"]}
    assert studies[s1]["review_label"] == "covid" and studies[s1]["review_agrees"] is False
    assert studies[s1]["predicted_class"] == "pneumonia" and studies[s2]["review_label"] is None

    # A plain user cannot review, even their own batch; reviewers review every clinic's studies.
    alice_batch, (a1,) = new_batch(app, alice, [("x.png", png_bytes(seed=4))])
    finish(url, [a1], mv)
    assert alice.post(f"/studies/{a1}/review", data={"label": "normal"}).status_code == 403
    assert 'id="review-form"' not in alice.get(f"/studies/{a1}").get_data(as_text=True)
    assert rita.post(f"/studies/{a1}/review", data={"label": "normal"}).status_code == 302
    assert root.post(f"/studies/{a1}/review", data={"label": "pneumonia"}).status_code == 302
    assert "confirmed by root" in alice.get(f"/batches/{alice_batch}").get_data(as_text=True)
    with session_scope(url) as s:
        reviews = list(s.scalars(select(Review).where(Review.study_id == a1).order_by(Review.id)))
        assert [(r.label, r.agrees) for r in reviews] == [("normal", False), ("pneumonia", True)]
        assert len(list(s.scalars(select(Review).where(Review.study_id == s1)))) == 3
        assert len(list(s.scalars(select(AuditEvent).where(AuditEvent.action == "study.review")))) == 5


def test_api_review(app: Flask, users: dict[str, int]) -> None:
    url = url_of(app)
    make_user(url, "rita", Role.REVIEWER)
    mv = add_model(url, "v1", serving=True)
    client = app.test_client()
    rita, alice, root = bearer(app, "rita"), bearer(app, "alice"), bearer(app, "root")
    ids = {}
    for who, auth in (("rita", rita), ("alice", alice)):
        files = {
            "files": [(io.BytesIO(png_bytes(seed=7)), "a.png"), (io.BytesIO(png_bytes(seed=8)), "b.png")]
        }
        resp = client.post(
            "/api/v1/batches",
            data={**files, "start": "true"},
            headers=auth,
            content_type="multipart/form-data",
        )
        ids[who] = resp.get_json()["study_ids"]
        finish(url, ids[who][:1], mv)
    done, queued = ids["rita"]
    resp = client.post(f"/api/v1/studies/{done}/review", json={"label": "covid", "note": "n"}, headers=rita)
    assert resp.status_code == 201
    assert resp.get_json() | {"review_id": 0} == {
        "study_id": done,
        "review_id": 0,
        "label": "covid",
        "agrees": False,
        "note": "n",
        "reviewer": "rita",
        "notice": resp.get_json()["notice"],
    }
    post = client.post
    assert post(f"/api/v1/studies/{done}/review", json={"label": "flu"}, headers=rita).status_code == 400
    assert post(f"/api/v1/studies/{queued}/review", json={"label": "covid"}, headers=rita).status_code == 409
    assert (
        post(f"/api/v1/studies/{ids['alice'][0]}/review", json={"label": "covid"}, headers=rita).status_code
        == 201
    )
    assert (
        post(f"/api/v1/studies/{ids['alice'][0]}/review", json={"label": "covid"}, headers=alice).status_code
        == 403
    )
    assert (
        post(f"/api/v1/studies/{ids['alice'][0]}/review", json={"label": "covid"}, headers=root).status_code
        == 201
    )
    assert post("/api/v1/studies/99999/review", json={"label": "covid"}, headers=root).status_code == 404
    assert post(f"/api/v1/studies/{done}/review", json={"label": "covid"}).status_code == 401
    with session_scope(url) as s:
        batch_id = s.get(Study, done).batch_id
    studies = client.get(f"/api/v1/batches/{batch_id}/results", headers=rita).get_json()["studies"]
    assert [(x["study_id"], x["review_label"]) for x in studies] == [(done, "covid"), (queued, None)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_patient_id_at_upload_is_stored_hashed(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    _, (sid,) = new_batch(app, login("alice"), [("a.png", png_bytes(seed=5))], patient_id=" P-77 ")
    with session_scope(url_of(app)) as s:
        study = s.get(Study, sid)
        key = app.extensions["cxr_settings"].deid_key
        assert study.patient_key == patient_pseudonym(key, "P-77") and study.status == StudyStatus.QUEUED
