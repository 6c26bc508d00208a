"""Study page, report filters/order/pages, PDFs rendered to PNG, downloads, accounts, audit, deletion."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape
from sqlalchemy import func, select

from store.db import session_scope
from store.heatmaps import save_heatmap
from store.models_registry import register_model_version
from store.reports import GENERIC_BAND_LEGEND
from store.studies import claim_studies, complete_studies
from store.tables import AuditEvent, Image, Study, User
from store.users import issue_api_token
from tests.conftest import IN_CI
from tests.web.conftest import PASSWORD, corrupt_png, png_bytes, sign_in, upload
from web.reports import NOTICE

COVID, PNEU, NORMAL, REFER = (
    "COVID-19 suspected",
    "pneumonia suspected",
    "likely normal",
    "refer to a radiologist",
)
# (file name, finding, band, p_covid): the order "needs review first" must produce is refer, covid by
# p_covid descending, pneumonia, normal, then the failed upload.
PLAN = [
    ("n.png", "normal", NORMAL, 0.05),
    ("c1.png", "covid", COVID, 0.60),
    ("r.png", "pneumonia", REFER, 0.20),
    ("c2.png", "covid", COVID, 0.90),
    ("p.png", "pneumonia", PNEU, 0.10),
]
LEGEND = {
    COVID: "custom covid meaning",
    PNEU: "custom pneumonia",
    NORMAL: "custom normal",
    REFER: "custom refer",
}


def _url(app: Flask) -> str:
    return app.extensions["cxr_settings"].database_url


def _screened_batch(app: Flask, client: FlaskClient, legend: dict | None = LEGEND) -> tuple[int, dict, int]:
    """Upload PLAN's files and a corrupt one, finish them with the bands above; (batch, ids by name, mv)."""
    files = [(name, png_bytes(seed=i)) for i, (name, *_rest) in enumerate(PLAN)] + [
        ("bad.png", corrupt_png())
    ]
    assert upload(client, files).status_code == 302
    url = _url(app)
    with session_scope(url) as s:
        mv = register_model_version(
            s, version="v-test", artifact_path="/nowhere", artifact_sha256="0" * 64, band_legend=legend
        )
        studies = list(s.scalars(select(Study).order_by(Study.id)))
        ids = {st.original_filename: st.id for st in studies}
        todo = [ids[name] for name, *_ in PLAN]
        claim_studies(s, study_ids=todo, token="tk", lease_s=60, max_attempts=3)
        results = []
        for name, label, band, p_covid in PLAN:
            rest = (1 - p_covid) / 2
            results.append(
                {
                    "study_id": ids[name],
                    "label": label,
                    "p_covid": p_covid,
                    "p_normal": rest,
                    "p_pneumonia": rest,
                    "triage": band,
                    "elapsed_ms": 5.0,
                }
            )
        assert len(complete_studies(s, token="tk", model_version_id=mv.id, results=results)) == len(PLAN)
        return studies[0].batch_id, ids, mv.id


def _row_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr data-study-id="(\d+)"', html)]


def test_report_summary_legend_order_filters_pages(app: Flask, login: Callable[[str], FlaskClient]) -> None:
    alice = login("alice")
    batch_id, ids, _ = _screened_batch(app, alice)
    html = alice.get(f"/batches/{batch_id}?sort=priority").get_data(as_text=True)
    expected = [ids[n] for n in ("r.png", "c2.png", "c1.png", "p.png", "n.png", "bad.png")]
    assert _row_ids(html) == expected
    # Summary: band counts, the failure with its reason, and the model version's own legend.
    assert f'data-band-count="{COVID}">2<' in html and f'data-band-count="{REFER}">1<' in html
    assert "Unreadable PNG file" in html and "custom covid meaning" in html
    assert NOTICE in html
    # Filters and search.
    covid_only = alice.get(f"/batches/{batch_id}", query_string={"band": COVID}).get_data(as_text=True)
    assert sorted(_row_ids(covid_only)) == sorted([ids["c1.png"], ids["c2.png"]])
    failed = alice.get(f"/batches/{batch_id}?status=FAILED").get_data(as_text=True)
    assert _row_ids(failed) == [ids["bad.png"]]
    assert _row_ids(alice.get(f"/batches/{batch_id}?q=C2").get_data(as_text=True)) == [ids["c2.png"]]
    assert len(_row_ids(alice.get(f"/batches/{batch_id}?reviewed=yes").get_data(as_text=True))) == 0
    # Server-side sort and pages.
    by_covid = alice.get(f"/batches/{batch_id}?sort=p_covid&dir=desc").get_data(as_text=True)
    assert _row_ids(by_covid)[:2] == [ids["c2.png"], ids["c1.png"]]
    page2 = alice.get(f"/batches/{batch_id}?sort=priority&per_page=2&page=2").get_data(as_text=True)
    assert _row_ids(page2) == expected[2:4] and "page 2 of 3" in page2 and 'rel="next"' in page2


def test_api_results_are_paginated_with_next_and_link(
    app: Flask, login: Callable[[str], FlaskClient]
) -> None:
    alice = login("alice")
    batch_id, ids, _ = _screened_batch(app, alice)
    with session_scope(_url(app)) as s:
        token = issue_api_token(s, user=s.scalar(select(User).where(User.username == "alice")))
    auth = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    first = client.get(f"/api/v1/batches/{batch_id}/results?per_page=4&sort=priority", headers=auth)
    body = first.get_json()
    assert (body["total"], body["pages"], body["page"]) == (6, 2, 1) and len(body["studies"]) == 4
    assert body["studies"][0]["study_id"] == ids["r.png"] and body["prev"] is None
    assert 'rel="next"' in first.headers["Link"] and "page=2" in body["next"]
    second = client.get(body["next"], headers=auth).get_json()
    assert len(second["studies"]) == 2 and second["next"] is None
    assert body["summary"]["bands"][COVID] == 2
    bad = client.get(f"/api/v1/batches/{batch_id}/results?per_page=0", headers=auth)
    assert bad.status_code == 400
    # Starting a batch without files is refused with a reason (it would be an empty, finished batch).
    empty = client.post("/api/v1/batches", data={"name": "e", "start": "true"}, headers=auth)
    assert empty.status_code == 400 and "files" in empty.get_json()["error"]


def test_study_page_navigation_legend_heat_map_and_original(
    app: Flask, login: Callable[[str], FlaskClient]
) -> None:
    alice = login("alice")
    batch_id, ids, mv_id = _screened_batch(app, alice, legend=None)
    sid = ids["c2.png"]
    html = alice.get(f"/studies/{sid}?sort=priority").get_data(as_text=True)
    # Previous/next follow the report's order: refer (r) before, c1 after.
    assert f'href="/studies/{ids["r.png"]}?sort=priority" id="prev-study"' in html
    assert f'href="/studies/{ids["c1.png"]}?sort=priority" id="next-study"' in html
    # No legend stored with the version: the generic text, kept in one place.
    assert str(escape(GENERIC_BAND_LEGEND[COVID])) in html and 'data-heat-state="pending"' in html
    assert alice.get(f"/studies/{sid}/heatmap.png").status_code == 404
    img = alice.get(f"/studies/{sid}/image.png")
    assert img.status_code == 200 and img.data.startswith(b"\x89PNG")
    with session_scope(_url(app)) as s:
        save_heatmap(s, study_id=sid, model_version_id=mv_id, class_name="covid", png=png_bytes(seed=9))
    assert 'data-heat-state="ready"' in alice.get(f"/studies/{sid}").get_data(as_text=True)
    assert alice.get(f"/studies/{sid}/heatmap.png").data == png_bytes(seed=9)
    # The original, as an attachment that is never sniffed into something else.
    orig = alice.get(f"/studies/{sid}/original")
    assert orig.status_code == 200 and orig.data == png_bytes(seed=3)
    assert (
        orig.headers["Content-Disposition"].startswith("attachment;")
        and "c2.png" in orig.headers["Content-Disposition"]
    )
    assert orig.headers["X-Content-Type-Options"] == "nosniff"
    assert "study.download" in alice.get(f"/studies/{sid}").get_data(as_text=True)  # the audit trail
    # Someone else's study does not exist for bob.
    bob = login("bob")
    for path in ("", "/image.png", "/heatmap.png", "/original", "/report.pdf"):
        assert bob.get(f"/studies/{sid}{path}").status_code == 404, path


def _pdf_pages(pdf: bytes, tmp_path: Path, name: str) -> list[tuple[Path, str]]:
    """Each page rendered to PNG by pdftoppm, with its text from pdftotext."""
    for tool in ("pdftoppm", "pdftotext"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"{tool} (Debian poppler-utils) is required under CI=true")
            pytest.skip(f"{tool} not installed (apt-get install poppler-utils)")
    src = tmp_path / f"{name}.pdf"
    src.write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "50", "-png", str(src), str(tmp_path / name)], check=True)
    pngs = sorted(tmp_path.glob(f"{name}-*.png"))
    pages = []
    for i, png in enumerate(pngs, start=1):
        text = subprocess.run(
            ["pdftotext", "-f", str(i), "-l", str(i), "-layout", str(src), "-"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        pages.append((png, text))
    return pages


def test_pdfs_render_with_notice_on_every_page(
    app: Flask, login: Callable[[str], FlaskClient], tmp_path: Path
) -> None:
    import cv2
    import numpy as np

    alice = login("alice")
    batch_id, ids, mv_id = _screened_batch(app, alice)
    # A long batch name and many thumbnails: the batch PDF has more than one page.
    for sid in ids.values():
        alice.get(f"/studies/{sid}/thumbnail.png")
    resp = alice.get(f"/batches/{batch_id}/report.pdf")
    assert resp.status_code == 200 and resp.mimetype == "application/pdf" and resp.data.startswith(b"%PDF")
    assert "attachment" in resp.headers["Content-Disposition"]
    pages = _pdf_pages(resp.data, tmp_path, "batch")
    assert pages
    for png, text in pages:
        assert "not a medical device" in text and "v-test" in text, text
        img = cv2.imread(str(png))
        assert img is not None and img.shape[1] > img.shape[0]  # landscape, really drawn
        assert float(np.std(img)) > 5  # not a blank page
    every = " ".join(text for _png, text in pages)
    assert COVID in every and "custom covid meaning" in every and "c2.png" in every

    with session_scope(_url(app)) as s:
        heat = np.zeros((48, 64, 4), np.uint8)
        heat[:, :32] = (0, 0, 255, 255)  # a solid red left half: visible in the rendered page
        save_heatmap(
            s,
            study_id=ids["c2.png"],
            model_version_id=mv_id,
            class_name="covid",
            png=cv2.imencode(".png", heat)[1].tobytes(),
        )
    study = alice.get(f"/studies/{ids['c2.png']}/report.pdf")
    assert study.status_code == 200
    spages = _pdf_pages(study.data, tmp_path, "study")
    for _png, text in spages:
        assert "not a medical device" in text
    text = spages[0][1]
    assert COVID in text and "custom covid meaning" in text and "Calibrated probabilities" in text
    page = cv2.imread(str(spages[0][0]))
    red = (page[:, :, 2] > 150) & (page[:, :, 1] < 100) & (page[:, :, 0] < 100)
    assert red.sum() > 50  # the heat-map overlay is drawn


def test_change_own_password_and_admin_reset_forces_change(
    app: Flask, login: Callable[[str], FlaskClient]
) -> None:
    alice = login("alice")
    wrong = alice.post(
        "/account/password",
        data={"current": "nope", "new": "another long pass", "confirm": "another long pass"},
    )
    assert wrong.status_code == 400 and "current password is wrong" in wrong.get_data(as_text=True)
    ok = alice.post(
        "/account/password",
        data={"current": PASSWORD, "new": "another long pass", "confirm": "another long pass"},
    )
    assert ok.status_code == 302 and alice.get("/").status_code == 200  # this session stays signed in
    fresh = app.test_client()
    assert fresh.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 401
    sign_in(fresh, "alice", "another long pass")

    root = login("root")
    bob = login("bob")
    page = root.post(f"/admin/users/{_uid(app, 'bob')}/reset").get_data(as_text=True)
    temporary = re.search(r'<code id="api-token">([^<]+)</code>', page).group(1)
    assert bob.get("/").status_code == 302  # the old session ended with the old password
    newbob = app.test_client()
    sign_in(newbob, "bob", temporary)
    forced = newbob.get("/")
    assert forced.status_code == 302 and forced.headers["Location"].endswith("/account/password")
    newbob.post(
        "/account/password", data={"current": temporary, "new": "bobs own pass", "confirm": "bobs own pass"}
    )
    assert newbob.get("/").status_code == 200


def _uid(app: Flask, name: str) -> int:
    with session_scope(_url(app)) as s:
        return s.scalar(select(User.id).where(User.username == name))


def test_disable_stops_sessions_and_tokens_at_once_then_enable(
    app: Flask, login: Callable[[str], FlaskClient]
) -> None:
    root, alice = login("root"), login("alice")
    with session_scope(_url(app)) as s:
        token = issue_api_token(s, user=s.get(User, _uid(app, "alice")))
    api = {"Authorization": f"Bearer {token}"}
    assert app.test_client().get("/api/v1/batches", headers=api).status_code == 200
    assert root.post(f"/admin/users/{_uid(app, 'alice')}/active", data={"active": "0"}).status_code == 302
    assert alice.get("/").status_code == 302
    assert app.test_client().get("/api/v1/batches", headers=api).status_code == 401
    # An admin cannot lock themselves out.
    root.post(f"/admin/users/{_uid(app, 'root')}/active", data={"active": "0"})
    assert root.get("/").status_code == 200
    root.post(f"/admin/users/{_uid(app, 'alice')}/active", data={"active": "1"})
    assert app.test_client().get("/api/v1/batches", headers=api).status_code == 200
    # The audit log page, filtered by user, shows who did it.
    log = root.get(f"/admin/audit?user={_uid(app, 'root')}").get_data(as_text=True)
    assert "user.disable" in log and "user.enable" in log and "auth.login" in log
    assert alice.get("/admin/audit").status_code in (302, 403)


def test_delete_batch_soft_audited_and_unshared_bytes_removed(
    app: Flask, login: Callable[[str], FlaskClient]
) -> None:
    alice, bob, root = login("alice"), login("bob"), login("root")
    shared = png_bytes(seed=42)
    upload(alice, [("a.png", png_bytes(seed=41)), ("shared.png", shared)], name="to delete")
    upload(alice, [("shared-again.png", shared)], name="kept")
    with session_scope(_url(app)) as s:
        first = s.scalar(select(Study.batch_id).where(Study.original_filename == "a.png"))
        assert s.scalar(select(func.count()).select_from(Image)) == 2
    assert bob.post(f"/batches/{first}/delete").status_code == 404  # not his
    assert alice.post(f"/batches/{first}/delete").status_code == 302
    assert alice.get(f"/batches/{first}").status_code == 404
    assert "to delete" not in alice.get("/").get_data(as_text=True)
    with session_scope(_url(app)) as s:
        # The shared image stays for the other batch; the other one is gone.
        assert s.scalar(select(func.count()).select_from(Image)) == 1
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "batch.delete"))
        assert event.target == f"batch:{first}" and event.details["images_removed"] == 1
    log = root.get(f"/admin/audit?batch={first}").get_data(as_text=True)
    assert "batch.delete" in log and "batch.create" in log
