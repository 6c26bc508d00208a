"""Ablation: does the per-image contrast stretch in preprocess() help? Measured on validation only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model import DEFAULT_SPLIT, REPO_ROOT
from model.data import labels_of, load_arrays, read_split


def contrast_ablation(
    data: Path,
    *,
    arch: str = "tiny",
    seeds: tuple[int, ...] = (1, 2),
    epochs: int = 20,
    split_path: Path = DEFAULT_SPLIT,
    log=print,
) -> list[dict]:
    """Train `arch` with and without the contrast stretch (same seeds and recipe): validation scores."""
    from model.calibrate import softmax
    from model.metrics import ece, macro_f1
    from model.train import TrainConfig, input_size, to_model_input, train_network

    split = read_split(split_path)
    size = input_size(arch)
    yt, yv = labels_of(split["train"]), labels_of(split["val"])
    rows = []
    for contrast in (True, False):
        xt = load_arrays(data, split["train"], size, contrast=contrast)
        xv = load_arrays(data, split["val"], size, contrast=contrast)
        for seed in seeds:
            cfg = TrainConfig(arch=arch, seed=seed, epochs=epochs, min_epochs=min(15, epochs // 2))
            out = REPO_ROOT / "runs" / "ablation" / f"{arch}_contrast{int(contrast)}_seed{seed}"
            model = train_network(cfg, xt, yt, xv, yv, out, progress=False)
            z = model.predict(to_model_input(xv, arch), verbose=0)
            p = z if arch == "baseline" else softmax(z)
            pred = p.argmax(axis=1)
            row = {
                "contrast_stretch": contrast,
                "seed": seed,
                "val_accuracy": float((pred == yv).mean()),
                "val_macro_f1": macro_f1(yv, pred),
                "val_nll": float(-np.mean(np.log(np.clip(p[np.arange(len(yv)), yv], 1e-12, 1)))),
                "val_ece": ece(p, yv),
            }
            log(row)
            rows.append(row)
    return rows
