"""/studies/<id>/sr.dcm and /sc.dcm: owner-checked downloads of the DICOM results (issue 12)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from store.db import session_scope
from store.dicom_results import save_dicom_result
from store.models_registry import register_model_version
from store.studies import claim_studies, complete_studies
from store.tables import Prediction, Study
from tests.web.conftest import png_bytes, upload


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_owner_downloads_sr_and_sc_others_get_404(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    alice = login("alice")
    resp = upload(alice, [("a.png", png_bytes())])
    assert resp.status_code == 302
    url = app.extensions["cxr_settings"].database_url
    with session_scope(url) as s:
        sid = s.scalar(select(Study.id))
        mv = register_model_version(s, version="v", artifact_path="/x", artifact_sha256="0" * 64)
        claim_studies(s, study_ids=[sid], token="t", lease_s=60, max_attempts=3)
        row = {"study_id": sid, "label": "normal", "p_covid": 0.1, "p_normal": 0.8, "p_pneumonia": 0.1}
        complete_studies(
            s, token="t", model_version_id=mv.id, results=[row | {"triage": "x", "elapsed_ms": 1}]
        )
        pid = s.scalar(select(Prediction.id))
        save_dicom_result(
            s, study_id=sid, prediction_id=pid, kind="sr", sop_instance_uid="2.25.1", data=b"SR!"
        )
        s.commit()
    got = alice.get(f"/studies/{sid}/sr.dcm")
    assert got.status_code == 200 and got.data == b"SR!" and got.mimetype == "application/dicom"
    assert "attachment" in got.headers["Content-Disposition"]
    assert alice.get(f"/studies/{sid}/sc.dcm").status_code == 404  # not made yet
    assert alice.get(f"/studies/{sid}/xx.dcm").status_code == 404
    assert login("bob").get(f"/studies/{sid}/sr.dcm").status_code == 404
