"""Fit the validity gate's linear orientation score and write intake/validity_weights.py.

Positives: the training split's films (model/splits/cxr_split_v1.csv), as the gate sees them
(intake.validity.gate_image), and three random framings of each (cut below the diaphragm, at the neck, at
the sides). Negatives: the same films inverted, rotated by 90, 180 and 270 degrees and
flipped upside down. Logistic regression (scikit-learn, strong L2) on the 256 shape features; the threshold
is the TRAIN_QUANTILE quantile of the positives' scores. Validation and test films are not used here: the
bench (scripts/validity_bench.py) measures on them and on all 1,701.

    .venv/bin/python scripts/fit_validity.py [--data ../shared/data/cxr]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from intake.validity import gate_image, shape_features, turns  # noqa: E402

TRAIN_QUANTILE = 0.0025  # 0.25 % of the training films fall under the threshold
CROPS = 3  # random framings per training film, besides the film itself
C = 0.01  # strong regularisation: 256 inputs, about 1,200 films


def crops(gray: np.ndarray, rng: np.random.Generator, n: int = CROPS) -> list[np.ndarray]:
    """Framings a film also comes in: cut off below the diaphragm or at the neck, or closer at the sides."""
    h, w = gray.shape
    out = []
    for _ in range(n):
        top, bottom = int(h * rng.uniform(0, 0.1)), h - int(h * rng.uniform(0, 0.3))
        left, right = int(w * rng.uniform(0, 0.1)), w - int(w * rng.uniform(0, 0.1))
        out.append(gray[top:bottom, left:right])
    return out


def main() -> None:
    """Fit on the training split and write the weights module."""
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr")
    parser.add_argument("--out", type=Path, default=REPO / "intake" / "validity_weights.py")
    args = parser.parse_args()
    rows = list(csv.DictReader((REPO / "model" / "splits" / "cxr_split_v1.csv").open()))
    pos, neg = [], []
    rng = np.random.default_rng(0)
    for row in rows:
        if row["split"] != "train":
            continue
        gray, _ = gate_image((args.data / row["file"]).read_bytes())
        for view in [gray, *crops(gray, rng)]:
            pos.append(shape_features(view))
            neg += [shape_features(np.ascontiguousarray(t)) for t in turns(view)]
    x = np.vstack(pos + neg)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    weight = np.r_[np.full(len(pos), len(neg) / len(pos)), np.ones(len(neg))]  # balance the classes
    model = LogisticRegression(C=C, max_iter=5000).fit(x, y, sample_weight=weight)
    scores = model.decision_function(np.vstack(pos))
    threshold = float(np.quantile(scores, TRAIN_QUANTILE))
    values = [f"{v:.5f}," for v in model.coef_[0]]
    lines = [" ".join(values[i : i + 10]) for i in range(0, len(values), 10)]
    body = "\n".join("    " + line for line in lines)
    args.out.write_text(
        '"""The gate\'s linear orientation score: written by scripts/fit_validity.py, do not edit."""\n'
        "\n"
        f"# Fitted on {len(pos)} training films and {len(neg)} of their rotations and inversions.\n"
        "# fmt: off\n"
        f"WEIGHTS: tuple[float, ...] = (\n{body}\n)\n"
        "# fmt: on\n"
        f"BIAS = {float(model.intercept_[0]):.6g}\n"
        f"THRESHOLD = {threshold:.6g}\n"
    )
    print(f"wrote {args.out}: threshold {threshold:.3f}, {len(pos)} films, {len(neg)} negatives")


if __name__ == "__main__":
    main()
