"""Grad-CAM heat maps from the Keras ensemble in an artifact (mean of the members' class-activation maps).

The map is taken at the deepest block whose grid is at least CAM_MIN_GRID cells wide (24x24 or finer), not at
the last convolution (6x6 to 8x8 here), so it can point at a region of a lung rather than a quarter of the
film. `heatmap_png` crops the zero padding away, so the map lies exactly over the original image.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from model.preprocess import decode_image, preprocess

_MODELS: dict[Path, tuple] = {}
_LOCK = threading.Lock()
CAM_MIN_GRID = 24


def cam_layer(member) -> str:
    """Name of the deepest block output of a member network whose grid is at least CAM_MIN_GRID wide."""
    best = None
    for layer in member.layers:
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is None or len(shape) != 4 or shape[1] is None:
            continue
        if layer.name.endswith(("_relu", "_out")) and int(shape[1]) >= CAM_MIN_GRID:
            best = layer.name  # layers are in graph order: the last match is the deepest
    if best is None:
        from model.network import LAST_CONV_LAYER

        return LAST_CONV_LAYER
    return best


def _load(artifact_dir: Path | None):
    import keras

    from model.artifact import load_keras, read_meta
    from model.serve import DEFAULT_ARTIFACT_DIR

    path = Path(artifact_dir or DEFAULT_ARTIFACT_DIR).resolve()
    with _LOCK:
        if path not in _MODELS:
            meta = read_meta(path)
            ens = load_keras(path)
            members = [layer for layer in ens.layers if isinstance(layer, keras.Model)]
            grad_models = [
                keras.Model(m.inputs, [m.get_layer(cam_layer(m)).output, m.outputs[0]]) for m in members
            ]
            _MODELS[path] = (meta, ens, grad_models)
        return _MODELS[path]


def gradcam(
    artifact_dir: Path | None, x: np.ndarray, class_index: int | None = None
) -> tuple[np.ndarray, int]:
    """Grad-CAM heat map in [0, 1] (input size) for one preprocessed image, and the explained class index.

    `class_index` None explains the most probable class; the worker passes the reported finding's class.
    """
    import tensorflow as tf

    meta, ens, grad_models = _load(artifact_dir)
    xin = x[None].astype(np.float32)
    if int(meta.get("input_channels", 1)) == 3 and xin.shape[-1] == 1:
        xin = np.repeat(xin, 3, axis=-1)
    if class_index is None:
        class_index = int(np.argmax(ens(xin, training=False).numpy()[0]))
    size = xin.shape[1]
    cams = []
    for gm in grad_models:
        with tf.GradientTape() as tape:
            inp = tf.convert_to_tensor(xin)
            feats, out = gm(inp, training=False)
            score = out[:, class_index]
        grads = tape.gradient(score, feats)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # (1, C)
        cam = tf.nn.relu(tf.reduce_sum(feats * weights[:, None, None, :], axis=-1))[0].numpy()
        cams.append(cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR))
    cam = np.mean(cams, axis=0)
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam.astype(np.float32), class_index


def content_box(x: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside preprocess()'s zero padding."""
    mask = x[:, :, 0] > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows) or not len(cols):
        return 0, 0, x.shape[0], x.shape[1]
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def heatmap_png(cam: np.ndarray, box: tuple[int, int, int, int]) -> bytes:
    """RGBA PNG of a heat map (jet colours, alpha = strength), cropped to the image's content box.

    The browser lays it over the original image at the same size and sets its opacity.
    """
    top, left, h, w = box
    crop = cam[top : top + h, left : left + w]
    heat = cv2.applyColorMap(np.clip(crop * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = np.clip(crop * 255.0 * 0.9 + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.dstack([heat, alpha]))
    if not ok:
        raise RuntimeError("heat map could not be encoded")
    return buf.tobytes()


def explain_bytes(artifact_dir: Path | None, data: bytes, class_name: str | None = None) -> tuple[bytes, str]:
    """Heat map PNG (see heatmap_png) of one image's bytes for `class_name` (default: most probable)."""
    meta, _, _ = _load(artifact_dir)
    x = preprocess(decode_image(data), int(meta["input_size"]))
    idx = meta["classes"].index(class_name) if class_name else None
    cam, cls = gradcam(artifact_dir, x, idx)
    return heatmap_png(cam, content_box(x)), meta["classes"][cls]


def gradcam_png(artifact_dir: Path | None, data: bytes) -> bytes:
    """PNG bytes: the preprocessed image with the Grad-CAM map of the predicted class overlaid."""
    meta, _, _ = _load(artifact_dir)
    size = int(meta["input_size"])
    x = preprocess(decode_image(data), size)
    cam, cls = gradcam(artifact_dir, x)
    gray = np.clip(x[:, :, 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap(np.clip(cam * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (0.55 * cam)[:, :, None]
    overlay = (base * (1 - alpha) + heat * alpha).astype(np.uint8)
    label = f"Grad-CAM: {meta['classes'][cls]}"
    cv2.putText(overlay, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", overlay)
    if not ok:
        raise RuntimeError("Grad-CAM overlay could not be encoded")
    return buf.tobytes()
