"""The one image preprocessing used by training, evaluation and serving (OpenCV, numpy; no TF).

Pipeline: bytes -> `decode_image` (intake.formats, which owns image formats and pixel limits: PNG 8/16-bit,
JPEG, DICOM with modality LUT, VOI LUT / window and MONOCHROME1 inversion; a pixel cap checked from the
headers before any pixel is decoded) -> 2-D float32 in [0, 1], bone bright -> `preprocess` (resize keeping
the aspect ratio, zero padding to a square; no contrast stretch: it did not measurably help) -> float32
(size, size, 1).
"""

from __future__ import annotations

import cv2
import numpy as np

# Decoding lives in intake.formats; these names stay importable from here for the model code that uses them.
from intake.formats import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, sniff_format

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PREPROCESS_VERSION",
    "ImageDecodeError",
    "decode_image",
    "prepare",
    "preprocess",
    "sniff_format",
]

PREPROCESS_VERSION = "pp2-gray-pad"
_STRETCH_PERCENTILES = (1.0, 99.0)
CLAHE_CLIP = 2.0  # OpenCV's default clip limit
CLAHE_TILES = 8  # 8x8 tiles: the usual choice for chest films at 192-320 px


def _fit(gray: np.ndarray, size: int) -> np.ndarray:
    h, w = gray.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(gray, (nw, nh), interpolation=interp)


def _stretch(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, _STRETCH_PERCENTILES)
    if hi - lo < 1e-6:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _clahe(img: np.ndarray) -> np.ndarray:
    # OpenCV's CLAHE takes 8- or 16-bit images; 16 bits keeps the 12-15 bit DICOM films' depth.
    u16 = np.clip(img * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
    out = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(u16)
    return out.astype(np.float32) / 65535.0


def preprocess(gray: np.ndarray, size: int, *, contrast: bool = False, clahe: bool = False) -> np.ndarray:
    """Resize keeping the aspect ratio and zero-pad to (size, size, 1) float32 in [0, 1]; deterministic.

    `contrast=True` (a 1st-99th percentile stretch) exists only for the ablation that measured it: it did not
    measurably help (docs/model.md), so training, evaluation and serving all use the default.
    `clahe=True` (contrast-limited adaptive histogram equalisation on the resized image, before padding, so
    the padding stays black) is the issue-10 ablation; it is cross-validated, not assumed to help.
    """
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim == 3 and gray.shape[2] == 1:
        gray = gray[:, :, 0]
    if gray.ndim != 2:
        raise ValueError(f"preprocess expects a 2-D grayscale image, got shape {gray.shape}")
    fitted = _fit(gray, size)
    if contrast:
        fitted = _stretch(fitted)
    if clahe:
        fitted = _clahe(fitted)
    out = np.zeros((size, size), dtype=np.float32)
    h, w = fitted.shape
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = fitted
    return out[:, :, None]


def prepare(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and preprocess image bytes: preprocess(decode_image(data), size)."""
    return preprocess(decode_image(data, max_pixels=max_pixels), size)
