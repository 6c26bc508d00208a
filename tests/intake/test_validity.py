"""The input-validity gate (intake.validity): what is not a chest X-ray is refused with a reason.

The unit cases are made here; the measurement over all 1,701 real films and every kind of made non-film is the
same code as scripts/validity_bench.py (which writes docs/validity.md), with its bounds asserted.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from intake.validity import NOT_ASSESSABLE, assess_bytes, jpeg_data_problem
from scripts import validity_bench as bench
from tests.procs import sample_images


def _film() -> np.ndarray:
    """A real chest film (8-bit grey) from model/samples or the shared data."""
    _, data = sample_images(2)[1]
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def test_real_films_pass() -> None:
    """The committed sample films (or the first shared ones) are all taken."""
    for name, data in sample_images(6):
        verdict = assess_bytes(data)
        assert verdict.ok, (name, verdict)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: bench.png(np.zeros((512, 512), np.uint8)), "blank"),
        (lambda: bench.jpeg(np.full((600, 500), 255, np.uint8)), "blank"),
        (lambda: bench.png(np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)), "noise"),
        (lambda: bench.png(np.dstack([_film(), _film() // 2, _film()])), "colour"),
        (lambda: next(bench.text_pages(1)).__getitem__(2), "document"),
        (lambda: bench.jpeg(255 - _film()), "orientation"),
        (lambda: bench.jpeg(np.ascontiguousarray(np.rot90(_film()))), "orientation"),
        (lambda: bench.jpeg(np.ascontiguousarray(np.rot90(_film(), 2))), "orientation"),
    ],
    ids=["black-png", "white-jpeg", "noise", "colour", "document", "inverted", "rotated-90", "rotated-180"],
)
def test_non_films_are_refused_with_a_reason(make, kind: str) -> None:  # noqa: ANN001
    """Each kind of non-film is refused as that kind, with a sentence that says no finding is given."""
    verdict = assess_bytes(make())
    assert not verdict.ok
    assert verdict.kind == kind
    assert verdict.reason is not None and verdict.reason.startswith(NOT_ASSESSABLE)


def test_jpeg_with_random_bytes_in_its_image_data_is_corrupt() -> None:
    """5,000 random bytes inside the scan data: libjpeg decodes garbage, the gate says corrupt."""
    data = bytearray(bench.jpeg(_film()))
    assert jpeg_data_problem(bytes(data)) is None
    rng = np.random.default_rng(7)
    data[len(data) // 3 : len(data) // 3 + 5000] = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    decoded = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert decoded is not None, "OpenCV still decodes it: the gate is what catches it"
    verdict = assess_bytes(bytes(data))
    assert verdict.kind == "corrupt" and "corrupt" in (verdict.reason or "")


def test_progressive_and_restart_jpegs_are_not_called_corrupt() -> None:
    """Valid JPEG variants (progressive, restart markers) pass the marker walk."""
    film = _film()
    for params in ([cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 4]):
        ok, buf = cv2.imencode(".jpg", film, params)
        assert ok and jpeg_data_problem(buf.tobytes()) is None, params


@pytest.mark.slow
def test_measured_refusal_rates(shared_data) -> None:  # noqa: ANN001
    """All 1,701 real films: at most 1 % refused; every kind of made non-film refused at its stated rate."""
    started = time.perf_counter()
    tally, _ = bench.measure(shared_data / "cxr")
    assert time.perf_counter() - started < 600
    assert tally.total["real film (all 1,701)"] == 1701
    assert tally.rate("real film (all 1,701)") <= 0.01
    floors = {
        "photograph (colour)": 1.0,
        "noise": 1.0,
        "blank": 1.0,
        "JPEG with random bytes": 1.0,
        "document (text)": 0.9,
        "photograph (grey)": 0.7,
        "film inverted": 0.98,
        "film rotated 90": 0.97,
        "film rotated 180": 0.98,
        "film rotated 270": 0.97,
        "film upside down": 0.98,
    }
    for kind, floor in floors.items():
        assert tally.total[kind] > 0, kind
        assert tally.rate(kind) >= floor, (kind, tally.rate(kind), tally.why[kind])
