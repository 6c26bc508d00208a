"""Retraining controls and progress, and re-screening a batch with the serving model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from store.db import session_scope
from store.retraining import finish_run, set_progress, start_run
from store.tables import Prediction, RetrainRun, Role, RunStatus, Study, StudyStatus
from tests.conftest import make_user
from tests.web.conftest import corrupt_png, png_bytes
from tests.web.test_review import add_model, finish, new_batch, url_of


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_retrain_button_is_admin_only_and_sends_the_task(
    app: Flask, login: Callable[[str], FlaskClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr("worker.app.send_retrain", calls.append, raising=False)
    make_user(url_of(app), "rita", Role.REVIEWER)
    assert login("alice").post("/models/retrain").status_code == 403
    assert login("rita").post("/models/retrain").status_code == 403
    root = login("root")
    assert root.post("/models/retrain").status_code == 302 and calls == ["admin"]
    assert "Retraining requested" in root.get("/models").get_data(as_text=True)
    with session_scope(url_of(app)) as s:
        assert s.scalar(select(func.count(RetrainRun.id))) == 0  # the task itself opens the run

    def broken(trigger: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr("worker.app.send_retrain", broken)
    assert root.post("/models/retrain").status_code == 302
    assert "could not be queued (ConnectionError)" in root.get("/models").get_data(as_text=True)


def test_retraining_progress_on_dashboard_and_registry(
    app: Flask, login: Callable[[str], FlaskClient]
) -> None:
    url = url_of(app)
    alice, root = login("alice"), login("root")
    assert 'id="retraining"' in alice.get("/").get_data(as_text=True)
    assert alice.get("/batches/progress.json?retraining=1").get_json() == {"retraining": None}
    with session_scope(url) as s:
        run = start_run(
            s, holder="h1", trigger="schedule", lease_s=600, epochs_total=5, current_version_id=None
        )
        run_id = run.id
        set_progress(s, run_id=run_id, epoch=2, epochs_total=5)
    assert "Retraining: epoch 2 of 5" in alice.get("/").get_data(as_text=True)
    body = alice.get("/batches/progress.json?retraining=1").get_json()
    assert body["retraining"]["epoch"] == 2 and body["retraining"]["epochs_total"] == 5
    assert "retraining" not in alice.get("/batches/progress.json").get_json()  # old shape unless asked
    assert "epoch 2 of 5" in root.get("/models").get_data(as_text=True)
    with session_scope(url) as s:
        finish_run(
            s,
            run_id=run_id,
            status=RunStatus.REJECTED,
            reasons="macro-F1 0.61 is 0.14 below the serving 0.75",
        )
    assert alice.get("/batches/progress.json?retraining=1").get_json() == {"retraining": None}
    assert "Retraining: epoch" not in alice.get("/").get_data(as_text=True)
    page = root.get("/models").get_data(as_text=True)
    assert (
        "REJECTED" in page and "macro-F1 0.61 is 0.14 below the serving 0.75" in page and "schedule" in page
    )


def test_rescreen_keeps_old_predictions_and_enqueues_after_commit(
    app: Flask, login: Callable[[str], FlaskClient], sent: list[list[int]]
) -> None:
    url = url_of(app)
    alice, bob = login("alice"), login("bob")
    v1 = add_model(url, "v1", serving=True)
    batch_id, (s1, s2, bad) = new_batch(
        app, alice, [("a.png", png_bytes(seed=1)), ("b.png", png_bytes(seed=2)), ("c.png", corrupt_png())]
    )
    assert sent == [[s1, s2]]
    finish(url, [s1], v1)
    # Not finished yet: nothing is re-queued.
    assert alice.post(f"/batches/{batch_id}/rescreen").status_code == 302
    assert (
        "still being screened" in alice.get(f"/batches/{batch_id}").get_data(as_text=True) and len(sent) == 1
    )
    finish(url, [s2], v1)
    assert "Re-screen with the serving model" in alice.get(f"/batches/{batch_id}").get_data(as_text=True)
    v2 = add_model(url, "v2", serving=True)
    assert bob.post(f"/batches/{batch_id}/rescreen").status_code == 404
    make_user(url, "rev", role=Role.REVIEWER)
    rev = login("rev")
    assert rev.get(f"/batches/{batch_id}").status_code == 200  # reviewers see every clinic's batches...
    assert rev.post(f"/batches/{batch_id}/rescreen").status_code == 404  # ...only owner or admin change it
    assert alice.post(f"/batches/{batch_id}/rescreen").status_code == 302
    assert sent[-1] == [s1, s2]  # the fake sender saw them QUEUED from its own session: committed first
    with session_scope(url) as s:
        assert s.get(Study, bad).status == StudyStatus.FAILED  # no image, nothing to re-screen
        assert s.scalar(select(func.count(Prediction.id))) == 2  # old predictions kept
    finish(url, [s1, s2], v2, label="normal")
    data = alice.get(f"/batches/{batch_id}/report.json").get_json()
    by_id = {x["study_id"]: x for x in data["studies"]}
    assert by_id[s1]["model_version"] == "v2" and by_id[s1]["predicted_class"] == "normal"
    assert [(p["model_version"], p["predicted_class"]) for p in by_id[s1]["predictions"]] == [
        ("v1", "pneumonia"),
        ("v2", "normal"),
    ]
    assert by_id[bad]["predictions"] == []
    assert "by model v2" in alice.get(f"/batches/{batch_id}").get_data(as_text=True)
