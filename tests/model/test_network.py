"""Training, artifacts and the compiled serving path, on a tiny network and the committed sample images."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from model import CLASSES
from model.preprocess import ImageDecodeError, prepare

SIZE = 64


def _label(path: Path) -> int:
    return CLASSES.index(path.name.split("_", 1)[0])


@pytest.fixture(scope="module")
def sample_arrays(sample_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The six samples preprocessed at 64 px, and their labels."""
    x = np.stack([prepare(f.read_bytes(), SIZE) for f in sample_files])
    y = np.array([_label(f) for f in sample_files])
    return x, y


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, sample_arrays) -> Path:
    """A two-member ensemble artifact of the tiny network (briefly trained), written like the real one."""
    import keras

    from model.artifact import build_ensemble, write_artifact
    from model.network import make_model
    from model.pipeline import model_card
    from model.train import configure_tf

    configure_tf(2)
    x, y = sample_arrays
    members = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        m = make_model((SIZE, SIZE, 1), arch="tiny")
        m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x, y, epochs=2, verbose=0)
        members.append(m)
    ens = build_ensemble(members, 1.3, probs_output=False)
    from model.pipeline import Recipe, contract_meta

    meta = {
        **contract_meta(
            name="test",
            arch="tiny",
            size=SIZE,
            temperature=1.3,
            thresholds={"covid": 0.2, "pneumonia": 0.5, "normal": 0.6},
        ),
        "created": "2026-01-01T00:00:00+00:00",
        "recipe": {**asdict(Recipe(arch="tiny", epochs=2)), "members": [0, 1]},
        "reproduce": "pytest",
        "data": {
            "dataset_sha256": "0" * 64,
            "split_file": "x",
            "split_sha256": "0" * 64,
            "n_images": {},
            "pool_images": 6,
            "reviewed_images": 0,
        },
        "metrics": {
            "oof": {
                k: 0.0
                for k in (
                    "macro_f1_mean",
                    "macro_f1_sd",
                    "accuracy_mean",
                    "auroc_covid_mean",
                    "covid_sens_at_spec90_mean",
                    "covid_sens_at_spec95_mean",
                    "ece",
                )
            }
        },
    }
    out = tmp_path_factory.mktemp("artifact")
    write_artifact(out, ens, meta, model_card(meta))
    return out


def test_tiny_training_run_makes_loss_fall(sample_arrays) -> None:
    import keras

    from model.network import make_model
    from model.train import configure_tf, make_augmenter

    configure_tf(2)
    keras.utils.set_random_seed(0)
    x, y = sample_arrays
    m = make_model((SIZE, SIZE, 1), arch="tiny", dropout=0.0)
    m.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    hist = m.fit(x, y, epochs=25, batch_size=6, verbose=0, shuffle=False)
    losses = hist.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    # augmentation is active only in training and keeps shape/range
    aug = make_augmenter(0)
    xa = aug(x, training=True).numpy()
    assert xa.shape == x.shape and not np.allclose(xa, x)
    assert np.array_equal(aug(x, training=False).numpy(), x)


def test_train_network_writes_model_history_and_curves(sample_arrays, tmp_path: Path) -> None:
    from model.train import TrainConfig, train_network

    x, y = sample_arrays
    cfg = TrainConfig(arch="tiny", seed=3, epochs=2, batch_size=6, min_epochs=0, patience=5)
    train_network(cfg, x, y, x, y, tmp_path, progress=False)
    info = json.loads((tmp_path / "history.json").read_text())
    assert info["epochs_run"] == 2 and len(info["history"]["val_loss"]) == 2
    assert (tmp_path / "model.keras").exists() and (tmp_path / "curves.png").stat().st_size > 1000


def test_baseline_is_the_tutorial_network() -> None:
    from model.network import make_baseline

    m = make_baseline()
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds == ["InputLayer", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense"]
    assert m.input_shape == (None, 150, 150, 3) and m.output_shape == (None, 3)
    assert [layer.filters for layer in m.layers if type(layer).__name__ == "Conv2D"] == [32, 64]
    assert m.count_params() == 896 + 18496 + 36 * 36 * 64 * 3 + 3


def test_saved_artifact_reloads_to_same_outputs_and_compiled_matches_keras(
    tiny_artifact: Path, sample_arrays
):
    from model.artifact import load_keras
    from model.serve import Predictor

    x, _ = sample_arrays
    keras_probs = load_keras(tiny_artifact).predict(x, verbose=0)
    again = load_keras(tiny_artifact).predict(x, verbose=0)
    np.testing.assert_array_equal(keras_probs, again)
    pred = Predictor(tiny_artifact)
    lite = pred.predict_arrays(x)
    assert lite.shape == (6, 3)
    np.testing.assert_allclose(lite, keras_probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(lite.sum(axis=1), 1.0, atol=1e-5)
    # batch 1 through the same interpreter gives the same numbers
    np.testing.assert_allclose(pred.predict_arrays(x[:1]), lite[:1], atol=1e-5)


def test_predictor_interface_and_per_item_errors(tiny_artifact: Path, sample_files: list[Path]) -> None:
    from model.serve import StudyResult, load_predictor

    p = load_predictor(tiny_artifact)
    assert p.classes == ("covid", "normal", "pneumonia")
    assert p.version.startswith("test-20260101-") and len(p.artifact_sha256) == 64
    assert "not a medical device" in p.card
    items = [sample_files[0].read_bytes(), b"not an image", sample_files[1].read_bytes()]
    res = p.predict_bytes(items)
    assert isinstance(res[0], StudyResult) and isinstance(res[2], StudyResult)
    assert isinstance(res[1], ImageDecodeError) and "not a PNG, JPEG or DICOM" in str(res[1])
    assert res[0].label in CLASSES
    assert abs(res[0].p_covid + res[0].p_normal + res[0].p_pneumonia - 1) < 1e-5
    assert res[0].triage in (
        "COVID-19 suspected",
        "pneumonia suspected",
        "likely normal",
        "refer to a radiologist",
    )
    assert load_predictor(tiny_artifact) is p


def test_gradcam_png(tiny_artifact: Path, sample_files: list[Path]) -> None:
    import cv2

    from model.explain import gradcam_png

    png = gradcam_png(tiny_artifact, sample_files[0].read_bytes())
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("arch", ["cxr_slim", "res_256", "plain5_224"])
def test_gradcam_layer_is_24_cells_or_finer_but_not_the_input(arch: str) -> None:
    """The heat map comes from a block at least 24x24 wide, deeper than the first block."""
    from model.explain import cam_layer
    from model.train import build, input_size

    m = build(arch)
    grid = int(m.get_layer(cam_layer(m)).output.shape[1])
    assert 24 <= grid <= input_size(arch) // 4


def test_heatmap_lies_over_the_original_image(tiny_artifact: Path, sample_files: list[Path]) -> None:
    """The RGBA heat map has the aspect of the image (padding cropped away) and varies in strength."""
    import cv2

    from model.explain import explain_bytes
    from model.preprocess import decode_image

    data = sample_files[0].read_bytes()
    png, cls = explain_bytes(tiny_artifact, data, "covid")
    assert cls == "covid"
    heat = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    h, w = decode_image(data).shape
    assert heat.shape[2] == 4
    assert abs(heat.shape[0] / heat.shape[1] - h / w) < 0.05
    assert heat[:, :, 3].max() > heat[:, :, 3].min()
