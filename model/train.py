"""Training of one network (one seed): augmentation, class weights, early stopping, curves."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure_tf(threads: int | None = None) -> None:
    """Limit TensorFlow's CPU threads (default: CXR_TF_THREADS or all cores) and silence its logging."""
    import tensorflow as tf

    n = threads or int(os.environ.get("CXR_TF_THREADS", "0")) or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    arch: str = "cxr_slim"  # or "baseline"
    seed: int = 1
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 10
    # Early stopping cannot fire before this epoch (an early val-loss spike is not convergence).
    # 30 of 40 was tried (docs/model.md): better on validation, no better on test, not adopted.
    min_epochs: int = 15
    augment: bool = True
    class_weights: bool = True
    schedule: str = "cosine"  # "cosine" (warm-up + cosine decay over `epochs`) or "plateau"
    weight_decay: float = 1e-4
    ema: float = 0.99  # Polyak averaging of weights per step; validation and the saved model use the average
    # False: train the whole cosine schedule and keep the last (EMA) weights. Cross-validation uses this, so
    # the held-out fold only scores the model and never picks its epoch.
    early_stopping: bool = True
    label_smoothing: float = 0.0
    extra: dict = field(default_factory=dict)


def class_weights(y: np.ndarray, n_classes: int = 3) -> dict[int, float]:
    """Balanced class weights n / (k * count_c)."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    return {c: float(len(y) / (n_classes * max(counts[c], 1.0))) for c in range(n_classes)}


def make_augmenter(seed: int):
    """CXR-safe training augmentation: small rotation/shift/zoom, brightness/contrast; no flips."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomRotation(0.02, fill_mode="constant", fill_value=0.0, seed=seed),  # about +-7 degrees
            layers.RandomTranslation(0.05, 0.05, fill_mode="constant", fill_value=0.0, seed=seed + 1),
            layers.RandomZoom((-0.1, 0.1), fill_mode="constant", fill_value=0.0, seed=seed + 2),
            layers.RandomBrightness(0.08, value_range=(0.0, 1.0), seed=seed + 3),
            layers.RandomContrast(0.15, value_range=(0.0, 1.0), seed=seed + 4),
        ],
        name="augment",
    )


def to_model_input(x: np.ndarray, arch: str) -> np.ndarray:
    """Adapt preprocess() output (N,S,S,1) to a network: the tutorial net takes 3 identical channels."""
    return np.repeat(x, 3, axis=-1) if arch == "baseline" else x


def input_size(arch: str) -> int:
    """The square input size of an architecture."""
    from model.network import ARCHS

    return 150 if arch == "baseline" else int(ARCHS[arch]["size"])


def build(arch: str):
    """Build an untrained network by name ("baseline" = the tutorial CNN)."""
    from model.network import make_baseline, make_model

    size = input_size(arch)
    return make_baseline((size, size, 3)) if arch == "baseline" else make_model((size, size, 1), arch=arch)


def _progress_callback(epochs: int, steps: int, desc: str):
    import keras
    from tqdm.auto import tqdm

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=epochs * steps, desc=desc, unit="batch", dynamic_ncols=True)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            self.bar.set_postfix(
                ep=epoch + 1,
                loss=f"{logs.get('loss', 0):.3f}",
                val_loss=f"{logs.get('val_loss', 0):.3f}",
                val_acc=f"{logs.get('val_accuracy', 0):.3f}",
            )

        def on_train_end(self, logs=None):
            self.bar.total = self.bar.n
            self.bar.refresh()
            self.bar.close()

    return Progress()


def save_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    """Save per-epoch loss and accuracy curves (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ep = np.arange(1, len(history[key]) + 1)
        ax.plot(ep, history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(ep, history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train_network(
    cfg: TrainConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    out_dir: Path,
    *,
    progress: bool = True,
    callbacks: list | None = None,
):
    """Train one network with one seed; save model.keras, history.json and curves.png in out_dir."""
    import keras
    import tensorflow as tf

    configure_tf()
    keras.utils.set_random_seed(cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build(cfg.arch)
    from_logits = cfg.arch != "baseline"
    steps = int(np.ceil(len(x_train) / cfg.batch_size))
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            cfg.lr / 10,
            decay_steps=cfg.epochs * steps,
            warmup_target=cfg.lr,
            warmup_steps=2 * steps,
            alpha=0.01,
        )
    else:
        lr = cfg.lr
    y_labels = np.asarray(y_train)
    if cfg.label_smoothing > 0:
        # Keras' sparse loss has no smoothing: the dataset carries one-hot targets instead
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=from_logits, label_smoothing=cfg.label_smoothing
        )
        y_train = keras.utils.to_categorical(y_train, 3)
        y_val = keras.utils.to_categorical(y_val, 3)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            lr, weight_decay=cfg.weight_decay, use_ema=cfg.ema > 0, ema_momentum=cfg.ema or 0.99
        ),
        loss=loss,
        metrics=["accuracy"],
    )
    xt, xv = to_model_input(x_train, cfg.arch), to_model_input(x_val, cfg.arch)
    ds = tf.data.Dataset.from_tensor_slices((xt, y_train)).shuffle(
        len(xt), seed=cfg.seed, reshuffle_each_iteration=True
    )
    ds = ds.batch(cfg.batch_size)
    if cfg.augment:
        aug = make_augmenter(cfg.seed)
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=1)
    ds = ds.prefetch(2)
    extra_callbacks = list(callbacks or [])  # e.g. the retraining job's per-epoch progress in SQL
    callbacks = [] if cfg.ema <= 0 else [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)]
    if cfg.early_stopping:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=cfg.patience,
                restore_best_weights=True,
                start_from_epoch=cfg.min_epochs,
            )
        )
    if cfg.schedule != "cosine":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, min_lr=1e-5)
        )
    callbacks.extend(extra_callbacks)
    if progress:
        callbacks.append(_progress_callback(cfg.epochs, steps, f"{cfg.arch} seed {cfg.seed}"))
    t0 = time.time()
    hist = model.fit(
        ds,
        validation_data=(xv, y_val),
        epochs=cfg.epochs,
        class_weight=class_weights(y_labels) if cfg.class_weights else None,
        callbacks=callbacks,
        shuffle=False,  # the dataset reshuffles every epoch itself
        verbose=0,
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    vl = history["val_loss"]
    if cfg.early_stopping:
        start = cfg.min_epochs if len(vl) > cfg.min_epochs else 0  # EarlyStopping tracks epochs >= min_epochs
        best = start + int(np.argmin(vl[start:]))
    else:
        best = len(vl) - 1  # the last epoch's weights are kept
    model.save(out_dir / "model.keras")
    info = {
        "config": asdict(cfg),
        "epochs_run": len(history["loss"]),
        "best_epoch": best + 1,
        "best_val_loss": history["val_loss"][best],
        "best_val_accuracy": history["val_accuracy"][best],
        "train_seconds": round(time.time() - t0, 1),
        "history": history,
    }
    (out_dir / "history.json").write_text(json.dumps(info, indent=1))
    save_curves(history, out_dir / "curves.png", f"{cfg.arch}, seed {cfg.seed} (best epoch {best + 1})")
    return model
