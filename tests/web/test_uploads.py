"""Upload validation and ingestion: every file becomes a study, bad ones FAILED with a readable reason."""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from config import load_settings
from intake import batches as intake_batches
from intake import files as intake_files
from intake.batches import ingest_files, submit_batch
from intake.files import clean_filename, validate_file
from store.db import session_scope
from store.studies import create_batch, mark_queued
from store.tables import Batch, Image, Study, StudyStatus, User
from tests.conftest import SHARED_DATA, make_user
from tests.web.conftest import corrupt_png, huge_png_header, jpeg_bytes, png_bytes, png_chunk, upload

DICOM_DIR = SHARED_DATA / "dicom"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Default settings with a private data dir."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    return load_settings()


def test_valid_png_and_jpeg(settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Real films pass: structure checked, the validity gate's reduced decode only (no full decode, no preview
    at upload: the thumbnail route makes it on first request)."""
    from tests.procs import sample_images

    film = sample_images(1)[0][1]
    ok, png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(film, np.uint8), cv2.IMREAD_GRAYSCALE))
    assert ok
    files = (("a.png", png.tobytes(), "png"), ("b.jpg", film, "jpeg"))

    def no_decode(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("no full decode and no preview at upload")

    monkeypatch.setattr(intake_files, "decode_image", no_decode)
    monkeypatch.setattr(intake_batches, "make_thumbnail", no_decode)
    for name, data, fmt in files:
        v = validate_file(name, data, settings)
        assert v.ok, v.error
        assert v.fmt == fmt and v.data == data
        assert v.thumbnail_png is None  # made on first request by the thumbnail route
    padded = validate_file("c.jpg", film + b"\x00" * 16, settings)  # trailing zero padding is fine
    assert padded.ok, padded.error
    # a synthetic gradient is well-formed but no chest film: the gate refuses it, readably
    ok, grad = cv2.imencode(".png", np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1)))
    gradient = validate_file("g.png", grad.tobytes(), settings)
    assert gradient.width == 300 and gradient.error.startswith("Not assessable"), gradient.error


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


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, body) for kind, body in chunks)


_IHDR_64 = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _broken_pngs() -> list[tuple[str, bytes, str]]:
    good = png_bytes(128, 128, seed=3)
    idat = zlib.compress(b"\x00" * 65 * 64)
    return [
        ("bit flip in the pixel data", _flip(good, len(good) - 20), "IDAT chunk fails its CRC check"),
        ("bit flip in the header", _flip(good, 26), "IHDR chunk fails its CRC check"),
        ("cut inside the data", good[: len(good) // 2], "truncated (it ends inside its IDAT chunk)"),
        ("cut before IEND", good[:-12], "truncated (it ends before its IEND chunk)"),
        ("cut inside IEND", good[:-3], "truncated (it ends before its IEND chunk)"),
        ("cut inside IEND's CRC", good[:-1] + b"\x00", "IEND chunk fails its CRC check"),
        ("no IDAT", _png([(b"IHDR", _IHDR_64), (b"IEND", b"")]), "no image data (no IDAT chunk)"),
        (
            "IHDR not first",
            _png([(b"tEXt", b"a\x00b"), (b"IHDR", _IHDR_64), (b"IDAT", idat), (b"IEND", b"")]),
            "has no image header",
        ),
        (
            "invalid bit depth",
            _png(
                [(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 7, 0, 0, 0, 0)), (b"IDAT", idat), (b"IEND", b"")]
            ),
            "invalid bit depth or colour type",
        ),
        ("garbage after the header", corrupt_png(), "truncated"),
    ]


@pytest.mark.parametrize(("case", "data", "reason"), _broken_pngs(), ids=[c[0] for c in _broken_pngs()])
def test_structurally_broken_png(settings, case: str, data: bytes, reason: str) -> None:  # noqa: ANN001
    """Corrupt or truncated PNGs fail at upload, from their chunk lengths and CRCs, with a readable reason."""
    v = validate_file("broken.png", data, settings)
    assert not v.ok and v.fmt == "png" and v.data is None, case
    assert v.error.startswith("Unreadable PNG file: ") and reason in v.error, v.error


def test_structurally_broken_jpeg(settings) -> None:  # noqa: ANN001
    """A truncated JPEG, one without image data, and one with garbage after its end fail at upload."""
    good = jpeg_bytes(200, 150)
    sos = good.index(b"\xff\xda")
    cases = {
        "truncated.jpg": (good[: len(good) * 2 // 3], "no end-of-image marker"),
        "cut-header.jpg": (good[: good.index(b"\xff\xc4") + 10], "runs past its end"),
        "no-sos.jpg": (good[:sos] + b"\xff\xd9", "ends before any image data"),
        "tail.jpg": (good + b"trailing junk", "no end-of-image marker"),
    }
    for name, (data, reason) in cases.items():
        v = validate_file(name, data, settings)
        assert not v.ok and v.fmt == "jpeg", name
        assert v.error.startswith("Unreadable JPEG file: ") and reason in v.error, (name, v.error)


def test_tiny_image_is_refused(settings) -> None:  # noqa: ANN001
    v = validate_file("tiny.png", png_bytes(4, 4), settings)
    assert not v.ok and "too small to read (4×4 pixels)" in v.error


def test_huge_png_is_refused_before_decoding(settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    def no_decode(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("decode_image must not be called for an image over the pixel cap")

    monkeypatch.setattr(intake_files, "decode_image", no_decode)
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


def test_same_image_again_in_a_later_upload(batch_session, settings) -> None:  # noqa: ANN001
    """Bytes stored by an earlier upload (and twice in this one) are stored once, without a key violation."""
    session, batch = batch_session
    first = ingest_files(session, batch=batch, files=[("a.png", png_bytes(seed=7))], settings=settings)
    session.commit()
    again = ingest_files(
        session,
        batch=batch,
        files=[("b.png", png_bytes(seed=7)), ("c.png", png_bytes(seed=8)), ("d.png", png_bytes(seed=8))],
        settings=settings,
    )
    session.commit()
    shas = [session.get(Study, i).image_sha256 for i in first + again]
    assert shas[0] == shas[1] and shas[2] == shas[3] and shas[0] != shas[2]
    assert session.scalar(select(func.count()).select_from(Image)) == 2


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

    monkeypatch.setattr("worker.app.send_screen_chunks", fake_send)
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

    monkeypatch.setattr("worker.app.send_screen_chunks", broken)
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


def garbage_idat_png() -> bytes:
    """A 64×64 PNG with valid chunks and CRCs around compressed data that is garbage: passes upload checks."""
    garbage = b"\x78\x9c" + bytes(range(7, 250, 3)) * 4  # a zlib header, then nothing deflate can read
    return _png([(b"IHDR", _IHDR_64), (b"IDAT", garbage), (b"IEND", b"")])


def test_valid_structure_garbage_pixels_fails_at_upload_and_in_the_worker(
    batch_session,
    settings,
    predictor,  # noqa: ANN001
) -> None:
    """The validity gate decodes at upload: undecodable pixel data behind a valid structure ends FAILED there,
    readably; a study that reaches the worker some other way (straight into SQL) fails readably too."""
    from store.studies import add_studies
    from tests.procs import sample_images
    from worker.screening import ServingModel, model_version_id, screen_chunk

    session, batch = batch_session
    url = session.get_bind().url.render_as_string(hide_password=False)
    good = sample_images(1)[0][1]  # a real film: a gradient would be refused by the validity gate
    ids = ingest_files(
        session, batch=batch, files=[("ok.jpg", good), ("bad.png", garbage_idat_png())], settings=settings
    )
    ok, bad = (session.get(Study, i) for i in ids)
    assert ok.status == StudyStatus.RECEIVED
    assert bad.status == StudyStatus.FAILED
    assert bad.error.startswith("Unreadable PNG file: PNG pixel data could not be decoded"), bad.error
    # the worker's own decode stays the second line
    direct = add_studies(session, batch=batch, files=[{"filename": "direct.png", "data": garbage_idat_png()}])
    work = [ids[0], *direct]
    mark_queued(session, study_ids=work, lease_s=3600)
    session.commit()
    worker_settings = settings.__class__(**{**settings.__dict__, "database_url": url})
    model = ServingModel(predictor, model_version_id(url, predictor), predictor.version)
    with session_scope(url) as ws:
        result = screen_chunk(ws, study_ids=work, token="t1", model=model, settings=worker_settings)
    assert (result.done, result.failed) == ([ids[0]], direct)
    with session_scope(url) as s:
        failed = s.get(Study, direct[0])
        assert failed.status == StudyStatus.FAILED
        assert failed.error.startswith("PNG pixel data could not be decoded"), failed.error
