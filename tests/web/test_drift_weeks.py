"""Drift by week (issue 14, point 7): two weeks of studies, one of ordinary films and one of the same films
inverted; only the inverted week warns, in store.drift.weekly_drift, on the admin operations page and in the
cxr_drift_week metric; on SQLite and PostgreSQL (the week is one portable GROUP BY key).

The statistics are what the worker stores (worker.drift.image_stats on the decoded image). Real inverted
films are refused by the validity gate at upload: they are written here directly into SQL, as the drift
watch is the second line behind the gate (as in tests/worker/test_drift.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import cv2
import numpy as np
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import insert, select

from intake.formats import decode_image
from store.db import session_scope
from store.drift import MIN_STUDIES, save_input_stats, set_reference, this_week_drift, weekly_drift
from store.tables import Batch, ModelVersion, Prediction, Study, StudyStatus
from tests.procs import sample_images
from worker.drift import image_stats

# A Wednesday; its week starts on Monday 2026-11-30, the week before on 2026-11-23.
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
THIS_MONDAY = datetime(2026, 11, 30, tzinfo=UTC)
COPIES = 4  # each sample film 4 times: 24 studies a week, above MIN_STUDIES, so the mix is compared too
MIX = ("normal", "likely normal")  # every prediction; the reference below has the same mix


def _films() -> list[bytes]:
    return [data for _, data in sample_images(6)]


def _inverted(data: bytes) -> bytes:
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    ok, buf = cv2.imencode(".png", 255 - gray)
    assert ok
    return buf.tobytes()


def _model_version(url: str) -> int:
    """A model version whose training reference is all 'normal' / 'likely normal' (the mix used here)."""
    with session_scope(url) as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.version == "v-weeks"))
        if mv is None:
            mv = ModelVersion(version="v-weeks", artifact_path="-", artifact_sha256="0" * 64, is_serving=True)
            s.add(mv)
            s.flush()
            set_reference(
                s, model_version_id=mv.id, reference={"classes": {MIX[0]: 1.0}, "bands": {MIX[1]: 1.0}}
            )
        return mv.id


def add_week(url: str, owner_id: int, images: list[bytes], received: list[datetime]) -> int:
    """One batch: a DONE study per image received at the given times, its prediction and input statistics."""
    mv_id = _model_version(url)
    with session_scope(url) as s:
        conn = s.connection()
        batch_id = conn.execute(
            insert(Batch)
            .values(owner_id=owner_id, name="week", notes="", created_at=received[0])
            .returning(Batch.id)
        ).scalar_one()
        rows = [
            {
                "batch_id": batch_id,
                "original_filename": f"film{i}.png",
                "status": StudyStatus.DONE,
                "created_at": at,
                "updated_at": at,
                "finished_at": at,
            }
            for i, at in enumerate(received)
        ]
        ids = (
            conn.execute(insert(Study).returning(Study.id, sort_by_parameter_order=True), rows)
            .scalars()
            .all()
        )
        conn.execute(
            insert(Prediction),
            [
                {
                    "study_id": sid,
                    "model_version_id": mv_id,
                    "label": MIX[0],
                    "p_covid": 0.05,
                    "p_normal": 0.9,
                    "p_pneumonia": 0.05,
                    "triage": MIX[1],
                    "elapsed_ms": 1.0,
                    "created_at": at,
                }
                for sid, at in zip(ids, received, strict=True)
            ],
        )
        save_input_stats(
            s,
            rows=[
                {"study_id": sid, **image_stats(data, decode_image(data))}
                for sid, data in zip(ids, images, strict=True)
            ],
        )
    return batch_id


def _two_weeks(url: str, owner_id: int) -> None:
    """Last week: ordinary films; this week: the same films inverted; and inverted films 9 weeks ago."""
    films = _films() * COPIES
    last_week = [THIS_MONDAY - timedelta(days=7) + timedelta(hours=5 * i) for i in range(len(films))]
    add_week(url, owner_id, films, last_week)
    inverted = [_inverted(d) for d in films]
    this_week = [THIS_MONDAY + timedelta(hours=2 * i) for i in range(len(films))]
    add_week(url, owner_id, inverted, this_week)
    add_week(url, owner_id, inverted, [THIS_MONDAY - timedelta(weeks=9)] * len(films))


def test_only_the_inverted_week_warns(db_url: str) -> None:
    """Newest week first; the inverted week has the 'inverted' warning, the ordinary week none at all, and the
    study from 9 weeks ago is outside the 8 weeks shown."""
    with session_scope(db_url) as s:
        from store.users import create_user

        owner = create_user(s, username="clinic", password="correct horse battery").id
    _two_weeks(db_url, owner)
    with session_scope(db_url) as s:
        weeks = weekly_drift(s, weeks=8, now=NOW)
        metric = this_week_drift(s, now=NOW)
    assert [w.week for w in weeks] == ["2026-11-30", "2026-11-23"]
    this, last = weeks
    n = len(_films()) * COPIES
    assert this.report.inputs["n"] == last.report.inputs["n"] == n >= MIN_STUDIES
    assert [k for k, _ in this.report.warnings] == ["inverted"], this.report.warnings
    assert last.report.warnings == [], last.report.warnings
    assert last.report.inputs["bright_border_share"] < 0.5 < this.report.inputs["bright_border_share"]
    assert this.report.classes == last.report.classes == {MIX[0]: 1.0}, (
        "the mix was compared: same as reference"
    )
    assert this.report.reference is not None
    assert metric == {"inverted": 1, "intensity": 0, "size": 0, "classes": 0, "bands": 0}


def test_weeks_start_on_monday_utc(db_url: str) -> None:
    """Sunday 23:59:59 UTC is the old week, Monday 00:00:00 UTC the new one (the same on both databases)."""
    with session_scope(db_url) as s:
        from store.users import create_user

        owner = create_user(s, username="clinic", password="correct horse battery").id
    film = _films()[0]
    add_week(db_url, owner, [film], [THIS_MONDAY - timedelta(seconds=1)])
    add_week(db_url, owner, [film, film], [THIS_MONDAY, THIS_MONDAY + timedelta(days=6, hours=23)])
    with session_scope(db_url) as s:
        weeks = {w.week: w.report.inputs["n"] for w in weekly_drift(s, weeks=2, now=NOW)}
    assert weeks == {"2026-11-30": 2, "2026-11-23": 1}


def test_ops_page_shows_the_weekly_warning(
    app: Flask, users: dict[str, int], login: Callable[[str], FlaskClient]
) -> None:
    """The admin operations page has a row per week; only the inverted week's row carries the warning."""
    url = app.extensions["cxr_settings"].database_url
    films = _films() * COPIES
    now = datetime.now(UTC)
    monday = datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=now.weekday())
    add_week(url, users["alice"], films, [monday - timedelta(days=7)] * len(films))
    add_week(url, users["alice"], [_inverted(d) for d in films], [monday] * len(films))
    html = login("root").get("/admin/ops").get_data(as_text=True)
    # once, in the page body (a merge once pasted the table into the <title> block too)
    assert html.count('id="ops-drift-weeks"') == 1
    assert "<title>Operations · CXR screening</title>" in html
    table = html[html.index('id="ops-drift-weeks"') :]
    this_row = table[table.index(f'data-week="{monday.date()}"') :].split("</tr>")[0]
    last_row = table[table.index(f'data-week="{(monday - timedelta(days=7)).date()}"') :].split("</tr>")[0]
    assert 'data-drift="inverted"' in this_row and "drift-warn" in this_row, this_row
    assert "data-drift" not in last_row and "drift-warn" not in last_row, last_row
    assert login("alice").get("/admin/ops").status_code == 403, "admins only"


def test_metric_names_this_weeks_drift(app: Flask, users: dict[str, int]) -> None:
    """/metrics has cxr_drift_week{kind="inverted"} 1 while this week's studies are inverted."""
    url = app.extensions["cxr_settings"].database_url
    films = _films() * COPIES
    add_week(url, users["alice"], [_inverted(d) for d in films], [datetime.now(UTC)] * len(films))
    body = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'cxr_drift_week{kind="inverted"} 1.0' in body, [ln for ln in body.splitlines() if "drift" in ln]
    assert 'cxr_drift_week{kind="size"} 0.0' in body
