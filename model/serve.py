"""The compiled serving path shared by the Celery worker and `cxr predict` (LiteRT interpreter with XNNPACK).

Importing this module is cheap: the interpreter is imported inside `load_predictor`.
One Predictor per process; calls are serialised by a lock (the interpreter is not thread-safe).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model import PACKAGE_DIR
from model.artifact import artifact_sha256, read_meta
from model.calibrate import decide
from model.preprocess import DEFAULT_MAX_PIXELS, PREPROCESS_VERSION, ImageDecodeError, prepare

DEFAULT_ARTIFACT_DIR: Path = PACKAGE_DIR / "artifacts" / "default"


@dataclass
class StudyResult:
    """The prediction for one image."""

    label: str
    p_covid: float
    p_normal: float
    p_pneumonia: float
    triage: str

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - fallback when LiteRT is not installed
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter


class Predictor:
    """A loaded model version: calibrated probabilities, labels and triage bands from the compiled model."""

    def __init__(self, artifact_dir: Path, *, num_threads: int | None = None) -> None:
        self.artifact_dir = Path(artifact_dir)
        meta = read_meta(self.artifact_dir)
        if meta.get("preprocess_version") != PREPROCESS_VERSION:
            raise RuntimeError(
                f"model {self.artifact_dir} was trained with preprocessing "
                f"{meta.get('preprocess_version')!r}, "
                f"this code has {PREPROCESS_VERSION!r}"
            )
        self.meta = meta
        self.version: str = meta["version"]
        self.artifact_sha256: str = artifact_sha256(self.artifact_dir)
        self.metrics: dict = meta.get("metrics", {})
        self.card: str = (self.artifact_dir / "card.md").read_text()
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.input_size: int = int(meta["input_size"])
        self.input_channels: int = int(meta.get("input_channels", 1))
        self.thresholds: dict[str, float] = dict(meta["thresholds"])
        self.temperature: float = float(meta["temperature"])
        interpreter_cls = _interpreter_class()
        self._interp = interpreter_cls(
            model_path=str(self.artifact_dir / "model.tflite"), num_threads=num_threads or _default_threads()
        )
        self._in = self._interp.get_input_details()[0]["index"]
        self._out = self._interp.get_output_details()[0]["index"]
        self._batch = -1
        self._lock = threading.Lock()
        self._pool = None
        self._pool_pid = -1

    def predict_arrays(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N x classes) for preprocessed arrays (N, S, S, 1), run as one batch."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] == 1 and self.input_channels == 3:
            x = np.repeat(x, 3, axis=-1)
        expected = (self.input_size, self.input_size, self.input_channels)
        if x.shape[1:] != expected:
            raise ValueError(f"expected arrays of shape (N, {expected}), got {x.shape}")
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with self._lock:
            if self._batch != len(x):
                self._interp.resize_tensor_input(self._in, x.shape, strict=False)
                self._interp.allocate_tensors()
                self._batch = len(x)
            self._interp.set_tensor(self._in, np.ascontiguousarray(x))
            self._interp.invoke()
            return self._interp.get_tensor(self._out).copy()

    def _decode_pool(self):
        """A small thread pool for decoding, recreated in a forked child (threads do not survive fork)."""
        import os
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=_default_threads(), thread_name_prefix="cxr-decode")
            self._pool_pid = os.getpid()
        return self._pool

    def triage(self, probs: np.ndarray) -> str:
        """Triage band of one calibrated probability vector."""
        return decide(np.asarray(probs), self.thresholds)[1]

    def result(self, probs: np.ndarray) -> StudyResult:
        """StudyResult of one probability vector: the finding always agrees with its band (`decide`)."""
        p = {c: float(v) for c, v in zip(self.classes, probs, strict=True)}
        label, band = decide(np.asarray(probs), self.thresholds)
        return StudyResult(
            label=label,
            p_covid=p["covid"],
            p_normal=p["normal"],
            p_pneumonia=p["pneumonia"],
            triage=band,
        )

    def prepare(self, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode and preprocess one image for this model."""
        return prepare(data, self.input_size, max_pixels=max_pixels)

    def predict_bytes(
        self, items: list[bytes], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> list[StudyResult | ImageDecodeError]:
        """Decode every item; failures become the ImageDecodeError in that slot; the rest run as one batch."""
        out: list[StudyResult | ImageDecodeError | None] = [None] * len(items)

        def one(data: bytes) -> np.ndarray | ImageDecodeError:
            try:
                return self.prepare(data, max_pixels=max_pixels)
            except ImageDecodeError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - never let one odd file fail the batch
                return ImageDecodeError(f"image could not be read ({type(exc).__name__}: {exc})")

        # OpenCV releases the GIL while decoding and resizing, so a few threads overlap the per-image work
        prepared = list(self._decode_pool().map(one, items)) if len(items) > 1 else [one(d) for d in items]
        arrays, idx = [], []
        for i, item in enumerate(prepared):
            if isinstance(item, ImageDecodeError):
                out[i] = item
            else:
                arrays.append(item)
                idx.append(i)
        if arrays:
            probs = self.predict_arrays(np.stack(arrays))
            for i, p in zip(idx, probs, strict=True):
                out[i] = self.result(p)
        return out  # type: ignore[return-value]


def _default_threads() -> int:
    import os

    return int(os.environ.get("CXR_SERVE_THREADS", "0")) or min(4, os.cpu_count() or 1)


# The one predictor cache (worker, CLI), keyed by pid too: a forked child loads its own, never its parent's.
_CACHE: dict[tuple[int, Path], Predictor] = {}
_CACHE_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def load_predictor(artifact_dir: Path | None = None) -> Predictor:
    """Load (once per process and directory) an artifact's Predictor; None means the committed default."""
    path = Path(artifact_dir or DEFAULT_ARTIFACT_DIR).resolve()
    key = (os.getpid(), path)
    with _CACHE_LOCK:
        if key not in _CACHE:
            if not (path / "meta.json").exists():
                raise FileNotFoundError(f"no model artifact at {path} (meta.json missing)")
            started = time.perf_counter()
            _CACHE[key] = Predictor(path)
            log.info(
                "model %s loaded from %s in %.1f s (pid %d)",
                _CACHE[key].version,
                path,
                time.perf_counter() - started,
                os.getpid(),
            )
        return _CACHE[key]
