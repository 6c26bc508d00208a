"""ops.logs: JSON lines with the bound ids, readable lines by default, one line per expected input error."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ops import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Root logging into a string for one test; the previous root level and handlers restored after."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    out = io.StringIO()
    yield out
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)
    logs.clear()


def test_json_lines_carry_bound_and_extra_ids(stream: io.StringIO) -> None:
    """One JSON object per line; ids bound by context and given by extra=; the service name."""
    logs.setup_logging("json", process="worker", stream=stream)
    with logs.context(batch_id=7, study_ids=[1, 2], task_id="t-1"):
        logging.getLogger("cxr.worker").info("chunk %s", "done", extra={"study_id": 2})
    logging.getLogger("cxr.worker").info("after")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "chunk done" and first["level"] == "INFO" and first["logger"] == "cxr.worker"
    assert (first["batch_id"], first["study_ids"], first["task_id"], first["study_id"]) == (
        7,
        [1, 2],
        "t-1",
        2,
    )
    assert first["service"] == "worker" and "time" in first
    assert "batch_id" not in second, "the context ends with its block"


def test_text_lines_are_readable_with_ids_appended(stream: io.StringIO) -> None:
    """The default: time LEVEL logger[pid]: message key=value."""
    logs.setup_logging("text", stream=stream)
    with logs.context(batch_id=3):
        logging.getLogger("cxr.web").warning("slow upload")
    line = stream.getvalue().strip()
    assert " WARNING cxr.web[" in line and line.endswith("slow upload batch_id=3"), line
    assert not line.startswith("{")


def test_setup_replaces_only_its_own_handler(stream: io.StringIO) -> None:
    """Called twice (web app factory, CLI): still one handler of ours; others' handlers stay."""
    logs.setup_logging("text", stream=stream)
    logs.setup_logging("json", stream=stream)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "cxr_handler", False)]
    assert len(ours) == 1


def test_a_corrupt_image_is_one_line_without_traceback(
    stream: io.StringIO,
    sqlite_url: str,
    predictor,  # noqa: ANN001
) -> None:
    """A decode failure in a real chunk: one INFO line with study and batch ids, no traceback."""
    from store.db import session_scope
    from tests.integration.helpers import CORRUPT_PNG
    from tests.procs import sample_images
    from tests.worker.conftest import seed
    from tests.worker.test_screening import _settings
    from worker.screening import ServingModel, model_version_id, screen_chunk

    s = seed(sqlite_url, [sample_images(1)[0][1], CORRUPT_PNG])
    model = ServingModel(predictor, model_version_id(sqlite_url, predictor), predictor.version)
    logs.setup_logging("json", stream=stream)
    with session_scope(sqlite_url) as session:
        screen_chunk(session, study_ids=s.study_ids, token="l1", model=model, settings=_settings(sqlite_url))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [r for r in lines if r["message"].startswith("study failed")]
    assert len(failed) == 1, lines
    assert failed[0]["study_id"] == s.study_ids[1] and failed[0]["batch_id"] == s.batch_id
    assert failed[0]["reason_kind"] == "decode" and failed[0]["level"] == "INFO"
    assert not any("exc_info" in r or "Traceback" in r["message"] for r in lines), lines
