"""Smaller hardening from issue 13: bidi controls out of file names, HSTS only when CXR_TLS says HTTPS."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.files import clean_filename
from web import create_app


@pytest.mark.parametrize("control", ["\u202e", "\u202a", "\u202d", "\u2066", "\u2069", "\u200e", "\u200f"])
def test_bidi_controls_are_removed_from_file_names(control: str) -> None:
    """'evil<RLO>gnp.exe' would display as 'evilexe.png': the control is removed, the letters kept."""
    assert clean_filename(f"evil{control}gnp.exe") == "evilgnp.exe"
    assert clean_filename(f"scans/{control}a.png", keep_dirs=True) == "scans/a.png"


@pytest.mark.parametrize("tls", [True, False])
def test_hsts_only_behind_tls(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    """CXR_TLS=true adds Strict-Transport-Security and secure cookies; without it neither is sent."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_TLS", "true" if tls else "false")
    app = create_app({"DATABASE_URL": sqlite_url, "TESTING": True})
    resp = app.test_client().get("/login")
    assert resp.status_code == 200
    assert ("Strict-Transport-Security" in resp.headers) is tls
    assert app.config["SESSION_COOKIE_SECURE"] is tls
    if tls:
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=31536000")
