"""Upload validation and ingestion: every file becomes a study, bad ones FAILED with a readable reason."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from store.config import load_settings
from store.db import session_scope
from store.studies import create_batch
from store.tables import Batch, Image, Study, StudyStatus, User
from tests.conftest import SHARED_DATA, make_user
from tests.web.conftest import corrupt_png, huge_png_header, jpeg_bytes, png_bytes, upload
from web import uploads
from web.uploads import clean_filename, ingest_files, submit_batch, validate_file

DICOM_DIR = SHARED_DATA / "dicom"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Default settings with a private data dir."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    return load_settings()


def test_valid_png_and_jpeg(settings) -> None:  # noqa: ANN001
    for name, data, fmt in (("a.png", png_bytes(300, 200), "png"), ("b.jpg", jpeg_bytes(), "jpeg")):
        v = validate_file(name, data, settings)
        assert v.ok, v.error
        assert v.fmt == fmt and v.data == data
        assert v.thumbnail_png is not None and v.thumbnail_png.startswith(b"\x89PNG")
    assert validate_file("a.png", png_bytes(300, 200), settings).width == 300


def test_format_by_content_not_name(settings) -> None:  # noqa: ANN001
    v = validate_file("photo.png", jpeg_bytes(), settings)
    assert v.ok and v.fmt == "jpeg"
    text = validate_file("notes.png", b"just some text, not an image\n" * 10, settings)
    assert not text.ok and "Not a PNG, JPEG or DICOM image" in text.error


def test_empty_file(settings) -> None:  # noqa: ANN001
    v = validate_file("empty.png", b"", settings)
    assert not v.ok and v.error == "The file is empty."


def test_corrupt_png(settings) -> None:  # noqa: ANN001
    v = validate_file("broken.png", corrupt_png(), settings)
    assert not v.ok and v.fmt == "png"
    assert v.error.startswith("Unreadable PNG file")


def test_huge_png_is_refused_before_decoding(settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    def no_decode(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("decode_image must not be called for an image over the pixel cap")

    monkeypatch.setattr(uploads, "decode_image", no_decode)
    data = huge_png_header(30000, 30000)
    assert len(data) < 200
    t0 = time.perf_counter()
    v = validate_file("bomb.png", data, settings)
    assert time.perf_counter() - t0 < 0.5
    assert not v.ok and (v.width, v.height) == (30000, 30000)
    assert "30000×30000" in v.error and "megapixel limit" in v.error


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def batch_session(db_url: str):  # noqa: ANN201
    """(session, batch) on a fresh database."""
    make_user(db_url, "zed")
    with session_scope(db_url) as s:
        user = s.scalar(select(User).where(User.username == "zed"))
        yield s, create_batch(s, owner=user, name="z")


def _studies(session, batch: Batch) -> dict[str, Study]:  # noqa: ANN001
    return {
        st.original_filename: st for st in session.scalars(select(Study).where(Study.batch_id == batch.id))
    }


def test_zip_with_traversal_paths(batch_session, settings) -> None:  # noqa: ANN001
    session, batch = batch_session
    data = _zip(
        {
            "ok/one.png": png_bytes(seed=1),
            "../../etc/evil.png": png_bytes(seed=2),
            "/abs/evil2.png": png_bytes(seed=3),
            "inner.zip": _zip({"x.png": png_bytes()}),
            "__MACOSX/._one.png": b"resource fork",
        }
    )
    ids = ingest_files(session, batch=batch, files=[("scans.zip", data)], settings=settings)
    rows = _studies(session, batch)
    assert len(ids) == 4 and len(rows) == 4
    assert rows["scans.zip/ok/one.png"].status == StudyStatus.RECEIVED
    for name in ("scans.zip/../../etc/evil.png", "scans.zip//abs/evil2.png"):
        assert rows[name].status == StudyStatus.FAILED and "Unsafe path" in rows[name].error
    assert "inside a zip archive are not accepted" in rows["scans.zip/inner.zip"].error


def test_zip_bomb_caps(batch_session, settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    session, batch = batch_session
    bomb = _zip({"zeros.png": b"\x00" * 5_000_000})
    assert len(bomb) < 50_000
    small = settings.__class__(**{**settings.__dict__, "max_upload_bytes": 1_000_000})
    ingest_files(session, batch=batch, files=[("bomb.zip", bomb)], settings=small)
    few = settings.__class__(**{**settings.__dict__, "max_files_per_upload": 2})
    ingest_files(
        session,
        batch=batch,
        files=[("many.zip", _zip({f"{i}.png": png_bytes() for i in range(3)}))],
        settings=few,
    )
    rows = _studies(session, batch)
    assert "would expand to 5 MB" in rows["bomb.zip"].error
    assert "holds 3 files, over the limit of 2" in rows["many.zip"].error
    corrupt = ingest_files(session, batch=batch, files=[("bad.zip", b"PK\x03\x04garbage")], settings=settings)
    assert session.get(Study, corrupt[0]).error == "The zip archive is corrupt and could not be opened."


def test_failed_files_keep_no_bytes_and_names_are_metadata(batch_session, settings) -> None:  # noqa: ANN001
    session, batch = batch_session
    ids = ingest_files(
        session,
        batch=batch,
        files=[
            ("C:\\fakepath\\<img src=x onerror=alert(1)>\x07.png", b"nope"),
            ("ok.png", png_bytes()),
            ("dup.png", png_bytes()),
        ],
        settings=settings,
    )
    bad, ok, dup = (session.get(Study, i) for i in ids)
    assert (
        bad.original_filename == "<img src=x onerror=alert(1)>.png"
        and bad.image_sha256 is None
        and bad.size_bytes == 4
    )
    assert ok.image_sha256 == dup.image_sha256  # content-addressed: stored once
    assert session.scalar(select(Image).where(Image.sha256 == ok.image_sha256)) is not None
    assert clean_filename("../../x.png") == "x.png"


def _dicom(name: str) -> bytes:
    path = DICOM_DIR / name
    if not path.exists():
        pytest.skip(f"{path} is not present beside this checkout")
    return path.read_bytes()


def test_dicom_valid_and_corrupt(batch_session, settings) -> None:  # noqa: ANN001
    session, batch = batch_session
    good = _dicom("nih_cxr14_gcp_dx_chest_mono2_8bit_implicit.dcm")
    bad_name = next((p.name for p in DICOM_DIR.glob("pydicom966_*badCOM.dcm")), "pydicom966_badCOM.dcm")
    bad = _dicom(bad_name)
    v = validate_file("x.dcm", good, settings)
    assert v.ok and v.fmt == "dicom" and (v.width, v.height) == (1024, 1024)
    siim = _dicom("siim_acr_pneumothorax_cr_chest_mono2_8bit_jpeg_baseline.dcm")
    jpeg_dicom = validate_file("y.dcm", siim, settings)
    assert jpeg_dicom.ok and jpeg_dicom.patient_key is not None  # PatientID present, stored hashed only
    ids = ingest_files(session, batch=batch, files=[("good.dcm", good), (bad_name, bad)], settings=settings)
    ok, failed = (session.get(Study, i) for i in ids)
    assert ok.status == StudyStatus.RECEIVED and ok.format == "dicom"
    assert failed.status == StudyStatus.FAILED and failed.format == "dicom"
    assert "DICOM pixel data could not be decoded" in failed.error and "JPEG 2000" in failed.error


def test_patient_key_is_hashed(settings) -> None:  # noqa: ANN001
    v = validate_file("a.png", png_bytes(), settings, patient_id="P-123")
    assert v.patient_key and len(v.patient_key) == 64 and "P-123" not in v.patient_key
    assert validate_file("a.png", png_bytes(), settings).patient_key is None


def test_submit_commits_before_sending(db_url: str, settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    make_user(db_url, "zoe")
    calls: list[list[int]] = []

    def fake_send(ids: list[int]) -> None:
        with session_scope(db_url) as other:
            assert set(other.scalars(select(Study.status).where(Study.id.in_(ids)))) == {StudyStatus.QUEUED}
        calls.append(ids)

    monkeypatch.setattr(uploads, "send_screen_chunks", fake_send)
    with session_scope(db_url) as s:
        owner = s.scalar(select(User).where(User.username == "zoe"))
        res = submit_batch(
            s,
            owner=owner,
            name="b",
            notes="",
            files=[("a.png", png_bytes()), ("b.txt", b"x")],
            settings=settings,
        )
    assert calls == [res.start.queued] and len(res.start.queued) == 1 and res.failed == 1


def test_broker_down_keeps_the_batch(db_url: str, settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    make_user(db_url, "yan")

    def broken(_ids: list[int]) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(uploads, "send_screen_chunks", broken)
    with session_scope(db_url) as s:
        owner = s.scalar(select(User).where(User.username == "yan"))
        res = submit_batch(
            s, owner=owner, name="b", notes="", files=[("a.png", png_bytes())], settings=settings
        )
    assert res.start.enqueue_error and "broker unreachable" in res.start.enqueue_error
    with session_scope(db_url) as s:
        assert s.get(Study, res.study_ids[0]).status == StudyStatus.QUEUED  # the reconciler will resend it


def test_upload_20_files_one_corrupt(
    app: Flask, login: Callable[[str], FlaskClient], sent: list[list[int]]
) -> None:
    files = [(f"img{i:02d}.png", png_bytes(64, 64, seed=i)) for i in range(19)] + [
        ("img19.png", corrupt_png())
    ]
    resp = upload(login("alice"), files, name="twenty")
    assert resp.status_code == 302
    with session_scope(app.extensions["cxr_settings"].database_url) as s:
        studies = list(s.scalars(select(Study).order_by(Study.id)))
    assert len(studies) == 20
    assert sum(st.status == StudyStatus.QUEUED for st in studies) == 19
    failed = [st for st in studies if st.status == StudyStatus.FAILED]
    assert [st.original_filename for st in failed] == ["img19.png"]
    assert failed[0].error.startswith("Unreadable PNG file")
    assert sorted(i for call in sent for i in call) == [
        st.id for st in studies if st.status == StudyStatus.QUEUED
    ]


def test_upload_without_files_is_a_form_error(login: Callable[[str], FlaskClient]) -> None:
    resp = login("alice").post("/batches/new", data={"name": "x"}, content_type="multipart/form-data")
    assert resp.status_code == 400 and "Choose at least one file" in resp.get_data(as_text=True)
