"""The input-validity gate: is this image a chest X-ray the classifier may score at all?

The classifier gives a confident finding for anything it is shown (an all-black PNG scored COVID 0.89), so the
worker asks this gate first. An image is refused, with a sentence a clinician can read, when it is:

- `corrupt`: a JPEG whose entropy-coded data holds bytes no encoder writes (libjpeg only warns and decodes
  garbage, so the decoder's complaint is re-derived here from the markers);
- `colour`: a colour picture (photographs, figures, slides); every film in the training data is grey;
- `blank`: near-constant (all black, all white, a flat grey);
- `noise`: neighbouring pixels uncorrelated, as in random data (radiographs are smooth at this scale);
- `document`: mostly one bright background with sharp dark strokes (text, scanned pages);
- `orientation`: not shaped like an upright, bone-bright frontal chest film (rotated, inverted, or another
  kind of grey picture): a linear score on a 16 x 16 standardised thumbnail, fitted on the training split's
  films against their own rotations and inversions (scripts/fit_validity.py writes
  intake/validity_weights.py).

numpy and OpenCV only; of ours it imports intake.formats (the decoder) and its weights. The measured refusal
rates (real films, and each kind of non-film) are in docs/validity.md.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np

from intake.formats import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    check_pixel_cap,
    decode_image,
    image_dimensions,
    sniff_format,
)
from intake.validity_weights import BIAS, THRESHOLD, WEIGHTS

log = logging.getLogger("cxr.validity")
K = TypeVar("K", bound=Hashable)

GATE_SIDE = 256  # the gate looks at a thumbnail whose longest side is about this
THUMB = 32  # resized to THUMB x THUMB, standardised, then 2 x 2 mean-pooled to 16 x 16 for the linear score

# Thresholds, measured on the 1,701 films of shared/data/cxr and on made non-films (docs/validity.md).
COLOUR_CHROMA = 0.10  # a pixel is coloured when its channels differ by more than this (of 1.0)
COLOUR_FRACTION = 0.02  # ... and an image is colour when more than this share of its pixels are
BLANK_SPREAD = 0.04  # 1st-99th percentile spread below this: blank or near-constant
NOISE_CORRELATION = 0.55  # neighbour correlation below this: noise
FLOOR = -3.0  # under THRESHOLD a film scoring above this is taken if it beats all its turns (assess_gray)
FLAT_TOLERANCE, FLAT_SHARE = 0.05, 0.95  # a border row is flat when 95 % of it is within 0.05 of its median
DOCUMENT_BACKGROUND = 0.45  # share of pixels in the brightest 1/16 of the range ...
DOCUMENT_EDGES = 0.04  # ... and share of pixels on a sharp edge: text on a page

NOT_ASSESSABLE = "Not assessable, no finding given: "
REASONS = {
    "corrupt": "the JPEG image data is corrupt (it holds bytes no encoder writes, so parts of the picture "
    "are garbage). Export the image again and upload the new file.",
    "colour": "it is a colour picture (a photograph, figure or slide), not a chest X-ray.",
    "blank": "the image is blank or almost uniform; it holds no chest X-ray to assess.",
    "noise": "the image looks like random noise, not a radiograph.",
    "document": "the image looks like a document or text, not a chest X-ray.",
    "orientation": "it does not look like an upright frontal chest X-ray with bones bright (it may be "
    "rotated, upside down, inverted, or another kind of picture). Export it upright, bones bright, and "
    "upload it again.",
}


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: kind is "ok" or why the image is refused; reason is the user-readable sentence."""

    kind: str
    reason: str | None = None
    score: float | None = None

    @property
    def ok(self) -> bool:
        """True when the classifier may score this image."""
        return self.kind == "ok"


def _refuse(kind: str, score: float | None = None) -> Verdict:
    return Verdict(kind=kind, reason=NOT_ASSESSABLE + REASONS[kind], score=score)


# Markers that may follow a scan inside a JPEG: tables, restart interval, another scan, APPn/COM, DNL.
_BETWEEN_SCANS = {0xC4, 0xCC, 0xDB, 0xDD, 0xDA, 0xDC, 0xFE, *range(0xE0, 0xF0)}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


def jpeg_data_problem(data: bytes) -> str | None:
    """Where a JPEG's entropy-coded data breaks the format (stray markers, restarts out of order), or None.

    libjpeg meets such bytes with a warning ("Corrupt JPEG data") and decodes grey or smeared blocks, which
    the classifier then scores. A sequential JPEG has one scan per component group and restart markers only
    in order and only when a restart interval is set; random bytes break these rules within a few hundred
    bytes, since about one byte in 256 is 0xFF and almost any byte after it is a forbidden marker.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return "no start-of-image marker"
    pos, restart_interval, components, scans, progressive = 2, 0, 1, 0, False
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            return f"no marker where one is expected (byte {pos})"
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            return None
        if pos + 4 > n:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return f"a segment runs past the end of the file (byte {pos})"
        body = data[pos + 4 : pos + 2 + length]
        if marker in _SOF:
            progressive = marker in _PROGRESSIVE
            components = body[5] if len(body) > 5 else 1
        elif marker == 0xDD and len(body) >= 2:
            restart_interval = int.from_bytes(body[:2], "big")
        elif scans and marker not in _BETWEEN_SCANS:
            return f"an unexpected marker 0xFF{marker:02X} after the image data (byte {pos})"
        pos += 2 + length
        if marker != 0xDA:
            continue
        scans += 1
        if not progressive and scans > components:
            return "more scans than colour components in a sequential JPEG"
        # Walk the entropy-coded data to the next real marker.
        expected_rst = 0
        while True:
            ff = data.find(b"\xff", pos)
            if ff < 0 or ff + 1 >= n:
                return "the image data ends without an end-of-image marker"
            nxt = data[ff + 1]
            if nxt == 0x00 or nxt == 0xFF:  # a stuffed 0xFF, or fill bytes before a marker
                pos = ff + 1 if nxt == 0xFF else ff + 2
                continue
            if 0xD0 <= nxt <= 0xD7:
                if restart_interval == 0 or nxt - 0xD0 != expected_rst:
                    return f"a restart marker out of place inside the image data (byte {ff})"
                expected_rst = (expected_rst + 1) % 8
                pos = ff + 2
                continue
            pos = ff
            break
    return "the file ends before its end-of-image marker"


def _small_bgr(data: bytes) -> np.ndarray | None:
    """A reduced decode for the gate (JPEG decodes at 1/2..1/8 scale in the DCT: cheap); None if DICOM."""
    fmt = sniff_format(data)
    if fmt not in ("png", "jpeg"):
        return None
    w, h = image_dimensions(data)
    flag = cv2.IMREAD_COLOR
    for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4)):
        if max(w, h) // factor >= GATE_SIDE:
            flag = reduced
            break
    else:
        if max(w, h) // 2 >= GATE_SIDE:
            flag = cv2.IMREAD_REDUCED_COLOR_2
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if img is None or img.size == 0:
        raise ImageDecodeError(
            f"{fmt.upper()} pixel data could not be decoded (file is corrupt or truncated)"
        )
    return img


def _fit_side(gray: np.ndarray, side: int = GATE_SIDE) -> np.ndarray:
    h, w = gray.shape
    scale = side / max(h, w)
    if scale >= 1:
        return gray
    return cv2.resize(
        gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )


def colour_fraction(bgr: np.ndarray) -> float:
    """Share of pixels whose channels differ by more than COLOUR_CHROMA (0 for a grey image)."""
    if bgr.ndim != 3 or bgr.shape[2] < 3:
        return 0.0
    # OpenCV's per-pixel max/min: the same numbers as numpy's axis-2 reductions at a tenth of the time
    b, g, r = cv2.split(np.ascontiguousarray(bgr[:, :, :3]))
    chroma = cv2.subtract(cv2.max(cv2.max(b, g), r), cv2.min(cv2.min(b, g), r))
    return float(cv2.countNonZero((chroma > COLOUR_CHROMA * 255).view(np.uint8)) / chroma.size)


def _flat(line: np.ndarray) -> bool:
    """True when nearly all of a row's (column's) pixels sit at its median (a padding bar, a label strip)."""
    med = np.median(line)
    return bool(np.count_nonzero(np.abs(line - med) < FLAT_TOLERANCE) > FLAT_SHARE * line.size)


def trim_borders(gray: np.ndarray) -> np.ndarray:
    """Drop flat rows and columns at the edges (black bars, padding), keeping at least half of each side."""
    g = np.asarray(gray, dtype=np.float32)
    h, w = g.shape

    def span(line, n: int) -> tuple[int, int]:  # noqa: ANN001 - line(i) -> the i-th row or column
        # Lines are tested one by one from each edge inwards, stopping at the first that is not flat: on an
        # ordinary film that is a handful of medians, not one per row and column (this runs for every upload).
        start, stop = 0, n
        while start < n // 4 and _flat(line(start)):
            start += 1
        while stop > n - n // 4 and _flat(line(stop - 1)):
            stop -= 1
        return start, stop

    top, bottom = span(lambda i: g[i], h)
    left, right = span(lambda j: g[:, j], w)
    return g[top:bottom, left:right]


def shape_features(gray: np.ndarray) -> np.ndarray:
    """The 256 inputs of the linear orientation score: 32 x 32 thumbnail of the trimmed image, standardised,
    2 x 2 mean-pooled."""
    t = cv2.resize(trim_borders(gray), (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    t = t.astype(np.float64)
    t = (t - t.mean()) / (t.std() + 1e-6)
    return t.reshape(THUMB // 2, 2, THUMB // 2, 2).mean(axis=(1, 3)).ravel()


def shape_score(gray: np.ndarray) -> float:
    """The linear score: above THRESHOLD for an upright, bone-bright frontal chest film."""
    return float(shape_features(gray) @ np.asarray(WEIGHTS) + BIAS)


def assess_gray(gray: np.ndarray, *, colour: float = 0.0) -> Verdict:
    """Judge a decoded grey image in [0, 1] (bone bright); colour is colour_fraction of the original."""
    if colour > COLOUR_FRACTION:
        return _refuse("colour", colour)
    g = _fit_side(np.asarray(gray, dtype=np.float32))
    lo, hi = np.percentile(g, (1, 99))
    spread = float(hi - lo)
    if spread < BLANK_SPREAD:
        return _refuse("blank", spread)
    corr = min(_neighbour_correlation(g, 1), _neighbour_correlation(g, 0))
    if corr < NOISE_CORRELATION:
        return _refuse("noise", corr)
    background, edges = _document_features(g)
    if background > DOCUMENT_BACKGROUND and edges > DOCUMENT_EDGES:
        return _refuse("document", background)
    score = shape_score(g)
    if score < THRESHOLD:
        # Below the threshold a film is still taken when it is upright by comparison: it scores better than
        # each of its own turns and its inversion (a rotated film does not: one of its turns is upright).
        best_turn = max(shape_score(np.ascontiguousarray(t)) for t in turns(g))
        if score < FLOOR or best_turn >= score:
            return _refuse("orientation", score)
    return Verdict(kind="ok", score=score)


def turns(gray: np.ndarray) -> list[np.ndarray]:
    """What a film must not be taken for: inverted, rotated a quarter, half, three quarters, upside down."""
    return [1.0 - gray, np.rot90(gray, 1), np.rot90(gray, 2), np.rot90(gray, 3), gray[::-1]]


def _neighbour_correlation(g: np.ndarray, axis: int = 1) -> float:
    """Correlation of each pixel with its right (axis 1) or lower (axis 0) neighbour."""
    a, b = (g[:, :-1], g[:, 1:]) if axis == 1 else (g[:-1, :], g[1:, :])
    # views, not copies (this runs for every study in the worker); float64 accumulation keeps the numbers
    sa, sb = float(a.std(dtype=np.float64)), float(b.std(dtype=np.float64))
    if sa < 1e-9 or sb < 1e-9:
        return 1.0
    am, bm = float(a.mean(dtype=np.float64)), float(b.mean(dtype=np.float64))
    return float(((a - am) * (b - bm)).mean(dtype=np.float64) / (sa * sb))


def _document_features(g: np.ndarray) -> tuple[float, float]:
    """(share of pixels near the brightest level, share of pixels on a sharp edge)."""
    lo, hi = float(g.min()), float(g.max())
    norm = (g - lo) / (hi - lo)
    background = float((norm > 15 / 16).mean())
    grad = np.abs(np.diff(norm, axis=1))
    return background, float((grad > 0.3).mean())


def gate_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, float]:
    """(grey thumbnail in [0, 1], colour fraction) of image bytes, as the gate sees them."""
    fmt = sniff_format(data)
    if fmt in ("png", "jpeg"):
        check_pixel_cap(*image_dimensions(data), max_pixels)  # before any pixel is decoded
    bgr = _small_bgr(data)
    if bgr is None:  # DICOM: the full decode gives the grey levels (modality LUT, window, MONOCHROME1)
        return _fit_side(decode_image(data, max_pixels=max_pixels)), 0.0
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
    return _fit_side(gray), colour_fraction(bgr)


def assess_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Verdict:
    """Judge image bytes (PNG, JPEG, DICOM); decode failures raise ImageDecodeError as decode_image does."""
    if sniff_format(data) == "jpeg" and jpeg_data_problem(data) is not None:
        return _refuse("corrupt")
    gray, colour = gate_image(data, max_pixels=max_pixels)
    return assess_gray(gray, colour=colour)


def refusals(images: Mapping[K, bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[K, str]:
    """{key: readable reason} for the images the gate refuses (the worker and `cxr predict` both ask it).

    An image the gate cannot decode is left to the model, whose decoder gives the reason (the same words as
    before the gate existed); an unexpected error in the gate refuses the image rather than score it.
    """
    refused: dict[K, str] = {}
    for key, data in images.items():
        try:
            verdict = assess_bytes(data, max_pixels=max_pixels)
        except ImageDecodeError:
            continue
        except Exception as exc:  # noqa: BLE001 - one odd file must not take the chunk down
            log.warning("validity gate failed on %s: %s: %s", key, type(exc).__name__, exc)
            refused[key] = NOT_ASSESSABLE + f"the image could not be checked ({type(exc).__name__})."
            continue
        if not verdict.ok:
            refused[key] = verdict.reason or NOT_ASSESSABLE
    return refused
