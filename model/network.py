"""Network builders: the tutorial baseline (reproduced exactly) and our compact from-scratch CNN."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras import layers  # noqa: E402

NUM_CLASSES = 3
FEATURE_LAYER = "features"  # penultimate (pooled) features, used by the source probe
LAST_CONV_LAYER = "last_conv"  # Grad-CAM target
LOGITS_LAYER = "logits"

# name -> (input size, widths per stage, separable from stage index, convs per stage)
ARCHS: dict[str, dict] = {
    "tiny": {"size": 64, "widths": (8, 16, 32), "sep_from": 9, "reps": (1, 1, 1)},
    "cxr_s": {"size": 192, "widths": (16, 32, 64, 96, 128), "sep_from": 9, "reps": (1, 1, 1, 2, 2)},
    "cxr_slim": {"size": 192, "widths": (16, 32, 64, 96, 128), "sep_from": 3, "reps": (1, 1, 1, 2, 2)},
    # session 2 candidate: the same network at a higher resolution (subtle opacities), 1.36x the FLOPs
    "cxr_slim224": {"size": 224, "widths": (16, 32, 64, 96, 128), "sep_from": 3, "reps": (1, 1, 1, 2, 2)},
    "cxr_m": {"size": 224, "widths": (16, 32, 64, 128, 192), "sep_from": 9, "reps": (1, 1, 2, 2, 2)},
    "cxr_sep": {"size": 224, "widths": (24, 48, 96, 192, 256), "sep_from": 2, "reps": (1, 1, 2, 2, 2)},
    # session 3 (issue 10): bigger networks, chosen by patient-grouped cross-validation (model/cv.py).
    # "plain": conv-BN-ReLU blocks, each stage ends in max-pooling; no strided stem (keeps fine detail).
    "plain5_224": {"kind": "plain", "size": 224, "widths": (16, 32, 64, 128, 256), "reps": (1, 1, 1, 1, 1)},
    "plain5w_224": {"kind": "plain", "size": 224, "widths": (24, 48, 96, 160, 256), "reps": (1, 1, 1, 2, 1)},
    "plain5_256": {"kind": "plain", "size": 256, "widths": (16, 32, 64, 128, 256), "reps": (1, 1, 1, 1, 1)},
    # the slim design (plain convolutions where the FLOPs are, separable where the parameters are), wider,
    # deeper and at 224 px
    "slim_w224": {"size": 224, "widths": (24, 48, 96, 128, 192), "sep_from": 3, "reps": (1, 1, 2, 2, 2)},
    # "res": strided stem, then basic residual blocks (two 3x3 convs) with a stride-2 first block per stage
    "res_256": {"kind": "res", "size": 256, "widths": (32, 64, 128, 256), "reps": (1, 1, 1, 1), "stem": 16},
}
DEFAULT_ARCH = "cxr_slim"


def make_baseline(
    input_shape: tuple[int, int, int] = (150, 150, 3), num_classes: int = NUM_CLASSES
) -> keras.Model:
    """The tutorial CNN exactly: Conv32-MaxPool-Conv64-MaxPool-Flatten-Dense(softmax); input 150x150x3."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, (3, 3), activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D((2, 2), name="pool1")(x)
    x = layers.Conv2D(64, (3, 3), activation="relu", name=LAST_CONV_LAYER)(x)
    x = layers.MaxPooling2D((2, 2), name="pool2")(x)
    x = layers.Flatten(name=FEATURE_LAYER)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="tutorial_cnn")


def _block(x, width: int, separable: bool, name: str):
    if separable:
        x = layers.SeparableConv2D(width, 3, padding="same", use_bias=False, name=f"{name}_sep")(x)
    else:
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def make_model(
    input_shape: tuple[int, int, int] = (192, 192, 1),
    num_classes: int = NUM_CLASSES,
    *,
    arch: str = DEFAULT_ARCH,
    dropout: float = 0.3,
) -> keras.Model:
    """Our from-scratch CNN: fixed input normalisation, conv/BN/ReLU stages, GAP, dropout, logits."""
    spec = ARCHS[arch]
    inputs = keras.Input(shape=input_shape, name="image")
    # input is preprocess() output in [0, 1]; centre and scale inside the model: the file carries the contract
    x = layers.Rescaling(4.0, offset=-2.0, name="normalise")(inputs)
    kind = spec.get("kind", "slim")
    if kind == "plain":
        x = _plain_body(x, spec)
    elif kind == "res":
        x = _res_body(x, spec)
    else:
        x = _slim_body(x, spec)
    x = layers.Activation("linear", name=LAST_CONV_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"{arch}")


def _plain_body(x, spec: dict):
    n_stages = len(spec["widths"])
    for s, (width, reps) in enumerate(zip(spec["widths"], spec["reps"], strict=True)):
        for r in range(reps):
            x = _block(x, width, False, f"s{s}b{r}")
        if s < n_stages - 1:
            # the stage output before pooling at 1/8 of the input is the fine Grad-CAM target (28 px at 224)
            x = layers.MaxPooling2D(2, name=f"s{s}_pool")(x)
    return x


def _res_block(x, width: int, stride: int, name: str):
    shortcut = x
    y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_c1")(x)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_c2")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != width:
        shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_bnp")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def _res_body(x, spec: dict):
    x = layers.Conv2D(spec["stem"], 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(2, name="stem_pool")(x)
    for s, (width, reps) in enumerate(zip(spec["widths"], spec["reps"], strict=True)):
        for r in range(reps):
            x = _res_block(x, width, 2 if (r == 0 and s > 0) else 1, f"s{s}b{r}")
    return x


def _slim_body(x, spec: dict):
    x = layers.Conv2D(spec["widths"][0], 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    n_stages = len(spec["widths"])
    for s, (width, reps) in enumerate(zip(spec["widths"], spec["reps"], strict=True)):
        for r in range(reps):
            x = _block(x, width, s >= spec["sep_from"], f"s{s}b{r}")
        if s < n_stages - 1:
            x = layers.MaxPooling2D(2, name=f"s{s}_pool")(x)
    return x


def conv_flops(model: keras.Model) -> int:
    """Multiply-adds x 2 of the Conv/SeparableConv/Dense layers for one image (the dominant FLOPs)."""
    total = 0
    for layer in _iter_layers(model):
        cls = type(layer).__name__
        if cls == "Conv2D":
            out = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2 * out[1] * out[2] * out[3] * kh * kw * cin
        elif cls == "SeparableConv2D":
            out = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2 * out[1] * out[2] * cin * kh * kw + 2 * out[1] * out[2] * cin * out[3]
        elif cls == "Dense":
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def _iter_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer)
        else:
            yield layer
