"""Fixtures for the worker's unit tests: a user, a batch of studies, a registered model version."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from store.db import session_scope
from store.models_registry import register_model_version
from store.studies import add_studies, create_batch, mark_queued
from store.tables import Prediction, Study
from store.users import create_user


@dataclass
class Seeded:
    """What the seeded fixture created."""

    url: str
    batch_id: int
    study_ids: list[int]
    model_version_id: int


def seed(url: str, images: list[bytes | None], *, queued: bool = True) -> Seeded:
    """A user, a batch with one study per image (QUEUED unless told), and a model version."""
    with session_scope(url) as session:
        user = create_user(session, username="seed", password="correct horse battery")
        batch = create_batch(session, owner=user, name="seeded")
        ids = add_studies(
            session, batch=batch, files=[{"filename": f"img{i}.png", "data": d} for i, d in enumerate(images)]
        )
        if queued:
            mark_queued(session, study_ids=ids, lease_s=3600)
        mv = register_model_version(
            session, version="unit-v1", artifact_path="/nowhere", artifact_sha256="0" * 64
        )
        return Seeded(url, batch.id, ids, mv.id)


@pytest.fixture
def seeded(db_url: str) -> Seeded:
    """Four QUEUED studies with distinct (fake, never decoded) bytes, on SQLite and on PostgreSQL."""
    return seed(db_url, [f"image-{i}".encode() for i in range(4)])


def mark_predicted_normal(url: str, study_id: int, model_version_id: int) -> None:
    """One 'likely normal' prediction for the study and every study DONE (what an explain task expects)."""
    with session_scope(url) as session:
        session.execute(
            Prediction.__table__.insert().values(
                study_id=study_id,
                model_version_id=model_version_id,
                label="normal",
                p_covid=0.1,
                p_normal=0.8,
                p_pneumonia=0.1,
                triage="likely normal",
                elapsed_ms=1.0,
            )
        )
        session.execute(Study.__table__.update().values(status="DONE"))
