"""Web test fixtures: an app on a throwaway SQLite database, signed-in clients, a recording task sender."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from store.db import session_scope
from store.tables import Role, Study
from tests.conftest import make_user
from tests.procs import film_gray
from web import create_app

PASSWORD = "correct horse battery"


def png_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A small valid grayscale PNG of a real chest film (distinct bytes per seed)."""
    ok, buf = cv2.imencode(".png", film_gray(w, h, seed))
    assert ok
    return buf.tobytes()


def jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    """A small valid JPEG of a real chest film."""
    ok, buf = cv2.imencode(".jpg", film_gray(w, h, 1))
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and a correct CRC32."""
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def huge_png_header(w: int = 30000, h: int = 30000) -> bytes:
    """A valid-looking PNG claiming w x h pixels with only a tiny IDAT (a decompression bomb stand-in)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A real PNG whose pixel data is cut off and scrambled after the header."""
    good = png_bytes(128, 128, seed=3)
    return good[:60] + b"\x00\x13garbage" * 20


@pytest.fixture
def sent() -> list[list[int]]:
    """Calls recorded by the fake send_screen_chunks."""
    return []


@pytest.fixture
def app(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: list[list[int]]) -> Flask:
    """The web app on a migrated SQLite, then PostgreSQL, database; CSRF off; tasks recorded, not sent."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_ENV", "test")

    def fake_send(study_ids: list[int]) -> None:
        # Proves commit-before-send: a second, independent session already sees the studies QUEUED.
        with session_scope(db_url) as s:
            states = set(s.scalars(select(Study.status).where(Study.id.in_(study_ids))))
        assert states == {"QUEUED"}, states
        sent.append(list(study_ids))

    monkeypatch.setattr("worker.app.send_screen_chunks", fake_send)
    return create_app({"DATABASE_URL": db_url, "TESTING": True, "WTF_CSRF_ENABLED": False})


@pytest.fixture
def users(app: Flask) -> dict[str, int]:
    """alice and bob (users) and root (admin)."""
    url = app.extensions["cxr_settings"].database_url
    return {
        "alice": make_user(url, "alice"),
        "bob": make_user(url, "bob"),
        "root": make_user(url, "root", role=Role.ADMIN),
    }


def sign_in(client: FlaskClient, username: str, password: str = PASSWORD) -> None:
    """Sign client in and check it worked."""
    resp = client.post("/login", data={"username": username, "password": password})
    assert resp.status_code == 302, resp.get_data(as_text=True)


@pytest.fixture
def login(app: Flask, users: dict[str, int]) -> Callable[[str], FlaskClient]:
    """A factory of signed-in test clients."""

    def _login(username: str) -> FlaskClient:
        client = app.test_client()
        sign_in(client, username)
        return client

    return _login


def upload(client: FlaskClient, files: list[tuple[str, bytes]], name: str = "test batch", **extra: str):  # noqa: ANN201
    """POST the new-batch form with these files."""
    data = {"name": name, "notes": "", **extra, "files": [(io.BytesIO(b), n) for n, b in files]}
    return client.post("/batches/new", data=data, content_type="multipart/form-data")
