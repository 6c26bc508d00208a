"""Candidate sweep on the validation split only: train members of one recipe, print their validation scores.

    python -m model.sweep --name slim224 --arch cxr_slim224 --seeds 1,2,3
    python -m model.sweep --name slim_min30 --arch cxr_slim --seeds 1,2,3 --min-epochs 30

Each member is trained with `model.train.train_network` into runs/sweep/<name>_seed<k>/ (reused when present)
and scored on validation after temperature scaling fitted on validation: the numbers a candidate is chosen
by. The test split is never read here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from model import DEFAULT_SPLIT, REPO_ROOT, shared_data_dir


def validation_scores(logits: np.ndarray, y: np.ndarray) -> dict:
    """Headline validation metrics after temperature scaling (fitted on these same validation logits)."""
    from model.calibrate import fit_temperature, fit_thresholds, nll, softmax
    from model.metrics import headline, summarise

    t = fit_temperature(logits, y)
    probs = softmax(logits / t)
    out = headline(summarise(probs, y, fit_thresholds(probs, y)))
    out.update(temperature=round(t, 3), nll=round(nll(logits, y, t), 4))
    return out


def main() -> None:
    """Train the requested members (or reuse them) and print one JSON line of validation scores per seed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--arch", default="cxr_slim")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--min-epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--data", type=Path, default=shared_data_dir("cxr"))
    args = ap.parse_args()

    import keras

    from model.artifact import ensemble_logits
    from model.data import labels_of, load_arrays, read_split
    from model.train import TrainConfig, input_size, to_model_input, train_network

    split = read_split(DEFAULT_SPLIT)
    size = input_size(args.arch)
    x_train, x_val = (load_arrays(args.data, split[k], size) for k in ("train", "val"))
    y_train, y_val = labels_of(split["train"]), labels_of(split["val"])
    logits = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = REPO_ROOT / "runs" / "sweep" / f"{args.name}_seed{seed}"
        if (out / "model.keras").exists():
            model = keras.saving.load_model(out / "model.keras", compile=False)
        else:
            cfg = TrainConfig(
                arch=args.arch,
                seed=seed,
                epochs=args.epochs,
                min_epochs=args.min_epochs,
                patience=args.patience,
            )
            model = train_network(cfg, x_train, y_train, x_val, y_val, out, progress=False)
        hist = json.loads((out / "history.json").read_text())
        z = ensemble_logits([model], to_model_input(x_val, args.arch), probs_output=args.arch == "baseline")
        logits.append(z)
        row = {
            "name": args.name,
            "seed": seed,
            "best_epoch": hist["best_epoch"],
            "epochs_run": hist["epochs_run"],
            "train_s": hist["train_seconds"],
            "val": validation_scores(z, y_val),
        }
        print(json.dumps(row), flush=True)
    if len(logits) > 1:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "ensemble_of": args.seeds,
                    "val": validation_scores(np.mean(logits, 0), y_val),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
