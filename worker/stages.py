"""Screening a chunk stage by stage (decode, preprocess, infer), timed into ops.metrics.STAGE_SECONDS.

The same functions as model.serve.Predictor.predict_bytes (model.preprocess.decode_image, then preprocess,
then one predict_arrays call for the chunk), only called one at a time so each stage can be timed. Any other
predictor (a test's wrapper or fake) is called through its own predict_bytes, timed as a whole under infer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ops.metrics import STAGE_SECONDS


def _prepare_timed(predictor: Any, data: bytes, max_pixels: int) -> tuple[Any, float, float, Any]:
    """(array or ImageDecodeError, decode seconds, preprocess seconds, input statistics) for one image."""
    from model.preprocess import ImageDecodeError, decode_image, preprocess
    from worker.drift import image_stats

    t0 = time.perf_counter()
    try:
        gray = decode_image(data, max_pixels=max_pixels)
        t1 = time.perf_counter()
        arr = preprocess(gray, predictor.input_size)
    except ImageDecodeError as exc:
        return exc, time.perf_counter() - t0, 0.0, None
    except Exception as exc:  # noqa: BLE001 - never let one odd file fail the batch (as predict_bytes)
        return ImageDecodeError(f"image could not be read ({type(exc).__name__}: {exc})"), 0.0, 0.0, None
    t2 = time.perf_counter()
    try:
        stats = image_stats(data, gray)  # drift watch; best effort, never fails the image
    except Exception:  # noqa: BLE001
        stats = None
    return arr, t1 - t0, t2 - t1, stats


def predict_staged(
    predictor: Any, items: Sequence[bytes], *, max_pixels: int, stats_out: list[Any] | None = None
) -> list[Any]:
    """predict_bytes' results (a StudyResult or an ImageDecodeError per item), each stage timed.

    stats_out, when given, receives each item's input statistics (worker.drift.image_stats) or None.
    """
    from model.preprocess import ImageDecodeError
    from model.serve import Predictor

    if not isinstance(predictor, Predictor):
        started = time.perf_counter()
        results = predictor.predict_bytes(list(items), max_pixels=max_pixels)
        STAGE_SECONDS.labels("infer").observe(time.perf_counter() - started)
        if stats_out is not None:
            stats_out.extend([None] * len(items))
        return results
    # The predictor's own decode threads: OpenCV releases the GIL, so images overlap (as in predict_bytes).
    pool = predictor._decode_pool() if len(items) > 1 else None
    prepared = (
        list(pool.map(lambda d: _prepare_timed(predictor, d, max_pixels), items))
        if pool is not None
        else [_prepare_timed(predictor, d, max_pixels) for d in items]
    )
    out: list[Any] = [None] * len(items)
    arrays, idx = [], []
    for i, (item, decode_s, preprocess_s, stats) in enumerate(prepared):
        STAGE_SECONDS.labels("decode").observe(decode_s)
        if stats_out is not None:
            stats_out.append(stats)
        if isinstance(item, ImageDecodeError):
            out[i] = item
            continue
        STAGE_SECONDS.labels("preprocess").observe(preprocess_s)
        arrays.append(item)
        idx.append(i)
    if arrays:
        started = time.perf_counter()
        probs = predictor.predict_arrays(np.stack(arrays))
        for i, p in zip(idx, probs, strict=True):
            out[i] = predictor.result(p)
        STAGE_SECONDS.labels("infer").observe(time.perf_counter() - started)
    return out
