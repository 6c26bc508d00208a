"""The worker refuses what is not a chest X-ray before the model runs: FAILED with a reason, no prediction."""

from __future__ import annotations

import numpy as np

from intake.validity import NOT_ASSESSABLE
from scripts import validity_bench as bench
from store.db import session_scope
from store.tables import StudyStatus
from tests.integration.helpers import outcome
from tests.procs import sample_images
from tests.worker.conftest import seed
from tests.worker.test_screening import _settings
from worker.screening import ServingModel, model_version_id, screen_chunk


def test_blank_noise_and_corrupt_images_get_no_finding(db_url: str, predictor) -> None:  # noqa: ANN001
    """The abuse run's cases: a black PNG and a JPEG with random bytes got findings; now refused."""
    film = sample_images(1)[0][1]
    corrupt = bytearray(film)
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 5000] = (
        np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    )
    black = bench.png(np.zeros((512, 512), np.uint8))
    noise = bench.png(np.random.default_rng(2).integers(0, 256, (300, 300), dtype=np.uint8))
    s = seed(db_url, [film, black, bytes(corrupt), noise])
    model = ServingModel(predictor, model_version_id(db_url, predictor), predictor.version)
    settings = _settings(db_url)
    with session_scope(db_url) as session:
        result = screen_chunk(session, study_ids=s.study_ids, token="t", model=model, settings=settings)
    assert result.done == s.study_ids[:1]
    assert sorted(result.failed) == s.study_ids[1:]
    states = outcome(db_url, s.batch_id)
    for sid, words in zip(s.study_ids[1:], ("blank", "corrupt", "noise"), strict=True):
        status, error, _, n_predictions = states[sid]
        assert status == StudyStatus.FAILED and n_predictions == 0
        assert error.startswith(NOT_ASSESSABLE) and words in error, error
    assert states[s.study_ids[0]][0] == StudyStatus.DONE and states[s.study_ids[0]][3] == 1
