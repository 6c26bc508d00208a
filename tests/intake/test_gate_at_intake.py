"""The validity gate runs at intake: what is not a chest X-ray ends FAILED at upload with a reason, is never
queued and never reaches the model; its bytes are kept so the study page can show what was refused."""

from __future__ import annotations

import numpy as np
import pytest

from config import load_settings
from intake.batches import submit_batch
from intake.validity import NOT_ASSESSABLE
from scripts import validity_bench as bench
from store.db import session_scope
from store.tables import Study, StudyStatus, User
from tests.conftest import make_user
from tests.procs import sample_images


def _corrupt_jpeg(film: bytes) -> bytes:
    corrupt = bytearray(film)
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 5000] = (
        np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    )
    return bytes(corrupt)


@pytest.mark.parametrize("start", [False, True])
def test_blank_noise_corrupt_and_rotated_images_are_refused_at_upload(
    sqlite_url: str, start: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abuse run's cases (a black PNG and a JPEG with random bytes got findings) and a rotated film."""
    import cv2

    from intake import batches

    sent: list[list[int]] = []
    monkeypatch.setattr(batches.queue, "enqueue_after_commit", lambda session, ids: sent.append(list(ids)))
    film = sample_images(1)[0][1]
    gray = cv2.imdecode(np.frombuffer(film, np.uint8), cv2.IMREAD_GRAYSCALE)
    files = [
        ("film.jpg", film),
        ("black.png", bench.png(np.zeros((512, 512), np.uint8))),
        ("corrupt.jpg", _corrupt_jpeg(film)),
        ("noise.png", bench.png(np.random.default_rng(2).integers(0, 256, (300, 300), dtype=np.uint8))),
        ("rotated.png", bench.png(np.ascontiguousarray(np.rot90(gray)))),
    ]
    settings = load_settings().__class__(**{**load_settings().__dict__, "database_url": sqlite_url})
    owner_id = make_user(sqlite_url, "gatekeeper")
    with session_scope(sqlite_url) as session:
        owner = session.get(User, owner_id)
        result = submit_batch(
            session, owner=owner, name="gate", notes="", files=files, settings=settings, start=start
        )
        studies = [session.get(Study, i) for i in result.study_ids]
        assert studies[0].status == (StudyStatus.QUEUED if start else StudyStatus.RECEIVED)
        assert result.failed == 4
        for study, words in zip(studies[1:], ("blank", "corrupt", "noise", "upright"), strict=True):
            assert study.status == StudyStatus.FAILED, study.original_filename
            assert study.error.startswith(NOT_ASSESSABLE) and words in study.error, study.error
            assert study.image_sha256 is not None  # kept: the study page shows what was refused
    # only the film was sent to the inference queue
    assert sent == ([[result.study_ids[0]]] if start else [])
