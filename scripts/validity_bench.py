"""Measure the validity gate (intake.validity) and write the results table into docs/validity.md.

Real films: all 1,701 of shared/data/cxr (and the validation + test films the gate's weights never saw).
Non-films, made here: scikit-image's sample pictures (colour and grey, as PNG and JPEG), rendered text pages,
noise, blank images, and the held-out films inverted, rotated and turned upside down, and real films with
5,000 random bytes written into their JPEG image data. tests/intake/test_validity.py runs the same
measurement and asserts its bounds.

    .venv/bin/python scripts/validity_bench.py [--data ../shared/data/cxr] [--write docs/validity.md]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from intake.validity import assess_bytes  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cxr"
_PICTURES = (
    "astronaut camera coins moon page text horse clock coffee chelsea rocket hubble_deep_field "
    "immunohistochemistry retina brick grass gravel cell logo microaneurysms checkerboard colorwheel cat "
    "shepp_logan_phantom binary_blobs"
)
SKIMAGE_PICTURES = _PICTURES.split()


def png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (grey or BGR)."""
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 image (grey or BGR)."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _u8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        return np.clip((img - lo) / (hi - lo or 1.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img


def skimage_pictures() -> Iterator[tuple[str, str, bytes]]:
    """(kind, name, bytes): each sample picture shipped inside scikit-image, colour and grey, PNG and JPEG."""
    import skimage.data

    for name in SKIMAGE_PICTURES:
        try:
            img = _u8(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001, S112 - pictures that need a download are not shipped: skip them
            continue
        if img.ndim == 3:
            bgr = cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)
            yield "photograph (colour)", name, png(bgr)
            yield "photograph (colour)", name, jpeg(bgr)
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        yield "photograph (grey)", name, png(img)
        yield "photograph (grey)", name, jpeg(img)


def text_pages(n: int = 24, seed: int = 1) -> Iterator[tuple[str, str, bytes]]:
    """Rendered documents: lines of text in several fonts and sizes on light paper, PNG and JPEG."""
    rng = np.random.default_rng(seed)
    fonts = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX]
    words = "patient study report chest radiograph findings impression normal opacity left right lung"
    words = words.split()
    for i in range(n):
        h, w = int(rng.integers(400, 1100)), int(rng.integers(400, 900))
        page = np.full((h, w), int(rng.integers(215, 256)), np.uint8)
        scale = float(rng.uniform(0.5, 1.4))
        y = int(30 * scale) + 10
        while y < h - 10:
            line = " ".join(rng.choice(words, size=int(rng.integers(3, 9))))
            ink = int(rng.integers(0, 60))
            cv2.putText(page, line, (10, y), fonts[i % len(fonts)], scale, ink, 1 + i % 2)
            y += int(rng.uniform(28, 45) * scale)
        yield "document (text)", f"page{i}", png(page) if i % 2 else jpeg(page)


def noise_images(n: int = 24, seed: int = 2) -> Iterator[tuple[str, str, bytes]]:
    """Uniform, Gaussian and salt-and-pepper noise of several sizes, PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(64, 1024)), int(rng.integers(64, 1024))
        kind = i % 3
        if kind == 0:
            img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        elif kind == 1:
            img = np.clip(rng.normal(128, 40, (h, w)), 0, 255).astype(np.uint8)
        else:
            img = (rng.random((h, w)) < 0.5).astype(np.uint8) * 255
        yield "noise", f"noise{i}", png(img) if i % 2 else jpeg(img)


def blank_images() -> Iterator[tuple[str, str, bytes]]:
    """All black, all white, flat greys, and flat grey with a little noise, PNG and JPEG."""
    rng = np.random.default_rng(3)
    for level in (0, 255, 128, 40, 200):
        for shape in ((512, 512), (1024, 800), (300, 400)):
            flat = np.full(shape, level, np.uint8)
            yield "blank", f"flat{level}", png(flat)
            yield "blank", f"flat{level}", jpeg(flat)
            noisy = np.clip(flat.astype(np.int16) + rng.integers(-2, 3, shape), 0, 255).astype(np.uint8)
            yield "blank", f"flat{level}+noise", png(noisy)


def film_rows(data: Path) -> list[dict[str, str]]:
    """The split file's rows (file, label, source, patient_id, split)."""
    return list(csv.DictReader((REPO / "model" / "splits" / "cxr_split_v1.csv").open()))


def transformed_films(data: Path, rows: list[dict[str, str]]) -> Iterator[tuple[str, str, bytes]]:
    """The held-out films (validation and test splits) inverted, rotated and turned upside down, as JPEG."""
    for row in rows:
        if row["split"] == "train":
            continue
        film = cv2.imdecode(np.frombuffer((data / row["file"]).read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        yield "film inverted", row["file"], jpeg(255 - film)
        yield "film rotated 90", row["file"], jpeg(np.ascontiguousarray(np.rot90(film, 1)))
        yield "film rotated 180", row["file"], jpeg(np.ascontiguousarray(np.rot90(film, 2)))
        yield "film rotated 270", row["file"], jpeg(np.ascontiguousarray(np.rot90(film, 3)))
        yield "film upside down", row["file"], jpeg(np.ascontiguousarray(film[::-1]))


def corrupt_films(data: Path, rows: list[dict[str, str]], n: int = 100) -> Iterator[tuple[str, str, bytes]]:
    """Real films with 5,000 random bytes written into the middle of their JPEG image data."""
    rng = np.random.default_rng(4)
    for row in rows[:: max(1, len(rows) // n)][:n]:
        raw = bytearray((data / row["file"]).read_bytes())
        start = len(raw) // 3
        junk = rng.integers(0, 256, min(5000, len(raw) // 2), dtype=np.uint8).tobytes()
        raw[start : start + len(junk)] = junk
        yield "JPEG with random bytes", row["file"], bytes(raw)


@dataclass
class Tally:
    """Refusals per kind of input, and why."""

    total: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    why: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, name: str, data: bytes) -> None:
        """Run the gate on one input (a decode error counts as refused: no finding either)."""
        try:
            verdict = assess_bytes(data)
            reason = verdict.kind
        except ValueError:
            reason = "decode error"
        self.total[kind] += 1
        self.why.setdefault(kind, Counter())[reason] += 1
        if reason != "ok":
            self.refused[kind] += 1
            self.examples.setdefault(kind, []).append(f"{name}: {reason}")

    def rate(self, kind: str) -> float:
        """Share of this kind refused."""
        return self.refused[kind] / self.total[kind] if self.total[kind] else 0.0


def measure(data: Path = DEFAULT_DATA) -> tuple[Tally, float]:
    """Run every case through the gate; (tally, seconds)."""
    started = time.perf_counter()
    rows = film_rows(data)
    tally = Tally()
    for row in rows:
        raw = (data / row["file"]).read_bytes()
        tally.add("real film (all 1,701)", row["file"], raw)
        if row["split"] != "train":
            tally.add("real film (held out: val + test)", row["file"], raw)
    cases = [skimage_pictures(), text_pages(), noise_images(), blank_images()]
    cases += [transformed_films(data, rows), corrupt_films(data, rows)]
    for source in cases:
        for kind, name, raw in source:
            tally.add(kind, name, raw)
    return tally, time.perf_counter() - started


def table(tally: Tally) -> str:
    """The markdown results table."""
    lines = ["| input | images | refused | refused % | gate's reasons |", "|---|---:|---:|---:|---|"]
    for kind in tally.total:
        reasons = ", ".join(f"{k} {v}" for k, v in tally.why[kind].most_common())
        lines.append(
            f"| {kind} | {tally.total[kind]} | {tally.refused[kind]} | {100 * tally.rate(kind):.1f} "
            f"| {reasons} |"
        )
    return "\n".join(lines)


BEGIN, END = "<!-- validity-bench:begin -->", "<!-- validity-bench:end -->"


def write_into(doc: Path, tally: Tally, seconds: float) -> None:
    """Replace the table between the markers in doc (the rest of the page is hand-written)."""
    text = doc.read_text()
    n = sum(tally.total.values())
    block = (
        f"{BEGIN}\n{table(tally)}\n\n"
        f"{n} images in {seconds:.0f} s ({1000 * seconds / n:.1f} ms each, decoding included), written by "
        f"`scripts/validity_bench.py`.\n{END}"
    )
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + block + tail)


def main() -> None:
    """Measure and print (and with --write, update the doc's table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    tally, seconds = measure(args.data)
    print(table(tally))
    for kind, examples in tally.examples.items():
        if kind.startswith("real"):
            print(kind, examples[:20])
    if args.write:
        write_into(args.write, tally, seconds)


if __name__ == "__main__":
    main()
