"""Drift watch: a batch of children's films (Kermany) or of inverted films is flagged, ordinary films are not.
Inverted films are refused at upload by the validity gate; the drift watch is the second line for any that
reach the worker another way (here: put straight into SQL)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from store.db import session_scope
from store.drift import batch_drift
from tests.conftest import SHARED_DATA, require_shared_data
from tests.integration.helpers import make_batch
from tests.procs import sample_images
from tests.worker.test_screening import _settings
from worker.drift import ensure_reference, reference_from_oof
from worker.screening import ServingModel, model_version_id, screen_chunk

pytestmark = pytest.mark.slow


def _screen(url: str, images: list[bytes], predictor) -> int:  # noqa: ANN001
    """A batch of these images screened by the real model in one chunk; its id."""
    batch_id, ids = make_batch(url, [(f"img{i}.png", d) for i, d in enumerate(images)])
    model = ServingModel(predictor, model_version_id(url, predictor), predictor.version)
    with session_scope(url) as session:
        screen_chunk(session, study_ids=ids, token=f"d{batch_id}", model=model, settings=_settings(url))
    return batch_id


def _inverted(data: bytes) -> bytes:
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    ok, buf = cv2.imencode(".png", 255 - gray)
    assert ok
    return buf.tobytes()


def _manifest(sources: set[str], n: int) -> list[bytes]:
    require_shared_data()
    with open(SHARED_DATA / "cxr" / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] in sources]
    rows.sort(key=lambda r: (r["label"], r["file"]))
    step = max(1, len(rows) // n)
    return [(SHARED_DATA / "cxr" / r["file"]).read_bytes() for r in rows[::step][:n]]


def test_inverted_films_warn_and_ordinary_ones_do_not(sqlite_url: str, predictor) -> None:  # noqa: ANN001
    """Upright films do not warn; a batch of inverted films (past intake) warns "inverted"; uploaded through
    intake, the same inverted films are refused by the validity gate and never get a finding."""
    from config import load_settings
    from intake.batches import ingest_files
    from store.studies import create_batch
    from store.tables import Study, StudyStatus, User
    from tests.conftest import make_user

    films = [d for _, d in sample_images(24)]
    plain = batch_drift_kinds(sqlite_url, _screen(sqlite_url, films, predictor))
    assert "inverted" not in plain, plain
    inverted = [_inverted(d) for d in films]
    assert "inverted" in batch_drift_kinds(sqlite_url, _screen(sqlite_url, inverted, predictor))
    owner_id = make_user(sqlite_url, "drift-uploader")
    settings = load_settings().__class__(**{**load_settings().__dict__, "database_url": sqlite_url})
    with session_scope(sqlite_url) as session:
        batch = create_batch(session, owner=session.get(User, owner_id), name="inverted upload")
        ids = ingest_files(
            session, batch=batch, files=[(f"i{i}.png", d) for i, d in enumerate(inverted)], settings=settings
        )
        studies = [session.get(Study, i) for i in ids]
        assert {s.status for s in studies} == {StudyStatus.FAILED}
        assert all("Not assessable" in (s.error or "") for s in studies)


def batch_drift_kinds(url: str, batch_id: int) -> dict[str, str]:
    """kind -> sentence of the batch's drift warnings."""
    with session_scope(url) as session:
        report = batch_drift(session, batch_id=batch_id)
    assert report.inputs["n"] > 0, "the worker stored each image's statistics"
    return dict(report.warnings)


def test_children_films_move_the_class_mix(sqlite_url: str, predictor, tmp_path: Path) -> None:  # noqa: ANN001
    """Reference: out-of-fold-like predictions on adult sources; a batch of Kermany children's films warns."""
    adult_sources = {"ieee8023", "cxnet", "nih", "mlwg", "actmed", "fig1"}
    adults = _manifest(adult_sources, 90)
    # The shape of the artifact's oof.csv: logits whose softmax(logits / T) are the calibrated probabilities.
    oof = tmp_path / "oof.csv"
    with open(oof, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "file",
                "patient_id",
                "source",
                "label",
                "fold",
                *("logit_" + c for c in ("covid", "normal", "pneumonia")),
            ]
        )
        for i, res in enumerate(predictor.predict_bytes(adults)):
            p = [max(res.p_covid, 1e-6), max(res.p_normal, 1e-6), max(res.p_pneumonia, 1e-6)]
            w.writerow(
                [
                    f"f{i}",
                    f"p{i}",
                    "adult",
                    res.label,
                    i % 5,
                    *(predictor.temperature * math.log(x) for x in p),
                ]
            )
    artifact = SimpleNamespace(
        artifact_dir=tmp_path, temperature=predictor.temperature, thresholds=predictor.thresholds, version="x"
    )
    reference = reference_from_oof(oof, temperature=predictor.temperature, thresholds=predictor.thresholds)
    assert math.isclose(sum(reference["classes"].values()), 1.0) and reference["n"] == len(adults)
    mv_id = model_version_id(sqlite_url, predictor)
    assert ensure_reference(sqlite_url, predictor=artifact, model_version_id=mv_id)
    assert not ensure_reference(sqlite_url, predictor=artifact, model_version_id=mv_id), "stored once"

    adult_kinds = batch_drift_kinds(sqlite_url, _screen(sqlite_url, _manifest(adult_sources, 30), predictor))
    child_kinds = batch_drift_kinds(sqlite_url, _screen(sqlite_url, _manifest({"kermany"}, 30), predictor))
    assert not {"classes", "bands", "inverted"} & set(adult_kinds), adult_kinds
    assert "classes" in child_kinds or "bands" in child_kinds, child_kinds
