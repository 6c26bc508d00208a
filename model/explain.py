"""Grad-CAM overlays from the Keras ensemble in an artifact (mean of the members' class-activation maps)."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from model.preprocess import decode_image, preprocess

_MODELS: dict[Path, tuple] = {}
_LOCK = threading.Lock()


def _load(artifact_dir: Path | None):
    import keras

    from model.artifact import load_keras, read_meta
    from model.network import LAST_CONV_LAYER
    from model.serve import DEFAULT_ARTIFACT_DIR

    path = Path(artifact_dir or DEFAULT_ARTIFACT_DIR).resolve()
    with _LOCK:
        if path not in _MODELS:
            meta = read_meta(path)
            ens = load_keras(path)
            members = [layer for layer in ens.layers if isinstance(layer, keras.Model)]
            grad_models = [
                keras.Model(m.inputs, [m.get_layer(LAST_CONV_LAYER).output, m.outputs[0]]) for m in members
            ]
            _MODELS[path] = (meta, ens, grad_models)
        return _MODELS[path]


def gradcam(
    artifact_dir: Path | None, x: np.ndarray, class_index: int | None = None
) -> tuple[np.ndarray, int]:
    """Grad-CAM heat map in [0, 1] (input size) for one preprocessed image, and the explained class index."""
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
