"""A model version as one self-describing directory: Keras ensemble, compiled TFLite, meta.json, card.md.

Layout:
    model.keras   the ensemble (mean member logits / temperature, softmax), for Grad-CAM and evaluation
    model.tflite  the same graph compiled for serving (LiteRT interpreter, XNNPACK)
    meta.json     version, preprocess version, input size, classes, temperature, thresholds, hashes, metrics
    card.md       the model card
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ARTIFACT_FILES = ("model.keras", "model.tflite", "meta.json", "card.md")


def artifact_sha256(artifact_dir: Path) -> str:
    """sha256 over the artifact's files (name and content, sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(ARTIFACT_FILES):
        p = Path(artifact_dir) / name
        if p.exists():
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def read_meta(artifact_dir: Path) -> dict:
    """Load meta.json."""
    return json.loads((Path(artifact_dir) / "meta.json").read_text())


def _custom_objects() -> dict:
    from model import layers_ext

    return layers_ext.CUSTOM_OBJECTS


def load_keras(artifact_dir: Path):
    """Load the artifact's Keras ensemble model."""
    import keras

    return keras.saving.load_model(
        Path(artifact_dir) / "model.keras", custom_objects=_custom_objects(), compile=False
    )


def build_ensemble(members: list, temperature: float, *, probs_output: bool):
    """One Keras model: average the members' logits (log-probs for softmax members), divide by T, softmax."""
    import keras
    from keras import layers

    from model.layers_ext import LogProb

    shape = tuple(members[0].input_shape[1:])
    inp = keras.Input(shape=shape, name="image")
    zs = []
    for i, member in enumerate(members):
        m = member.__class__.from_config(member.get_config())  # no optimizer state: keeps the file small
        m.set_weights(member.get_weights())
        m.name = f"member_{i}"
        z = m(inp)
        if probs_output:
            z = LogProb(name=f"member_{i}_logprob")(z)
        zs.append(z)
    z = layers.Average(name="mean_logits")(zs) if len(zs) > 1 else zs[0]
    z = layers.Rescaling(1.0 / temperature, name="temperature")(z)
    out = layers.Softmax(name="probs")(z)
    return keras.Model(inp, out, name="ensemble")


def ensemble_logits(members: list, x: np.ndarray, *, probs_output: bool, batch_size: int = 64) -> np.ndarray:
    """Mean member logits (or log-probabilities) for x, before temperature scaling."""
    zs = []
    for m in members:
        z = m.predict(x, batch_size=batch_size, verbose=0)
        zs.append(np.log(np.clip(z, 1e-7, 1.0)) if probs_output else z)
    return np.mean(zs, axis=0)


def to_tflite(model) -> bytes:
    """Convert a Keras model to a float32 TFLite flatbuffer (dynamic batch)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    return conv.convert()


def write_artifact(out_dir: Path, ensemble, meta: dict, card: str) -> Path:
    """Write model.keras, model.tflite, meta.json (with version filled in) and card.md into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensemble.save(out_dir / "model.keras")
    tfl = to_tflite(ensemble)
    (out_dir / "model.tflite").write_bytes(tfl)
    weights_hash = hashlib.sha256(tfl).hexdigest()
    meta = dict(meta)
    meta["tflite_sha256"] = weights_hash
    meta["version"] = f"{meta.get('name', 'cnn')}-{meta['created'][:10].replace('-', '')}-{weights_hash[:8]}"
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    (out_dir / "card.md").write_text(card.replace("{version}", meta["version"]))
    return out_dir
