"""Retraining without SQL: train a candidate on base + reviewed images, score it on a locked set, gate it.

The worker's retraining job (worker/retrain.py) feeds this module plain bytes and labels; nothing here knows
about the database, so the same functions can be tested and run alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model import CLASSES
from model.data import (
    labels_of,
    load_arrays,
    load_or_make_split,
)
from model.preprocess import ImageDecodeError, prepare

EXTRA_VAL_FRACTION = 0.15


@dataclass(frozen=True)
class ReviewedExample:
    """A reviewer-confirmed image: bytes, label, and the hashed patient key (keeps splits patient-level)."""

    data: bytes
    label: str
    patient_key: str


@dataclass(frozen=True)
class GateMargins:
    """How much worse than the serving model a candidate may be and still be promoted."""

    covid_sensitivity_lcb: float = 0.02
    macro_f1: float = 0.02
    ece_max: float = 0.10


@dataclass
class LockedScore:
    """A model's numbers on the locked evaluation set."""

    n: int
    macro_f1: float
    covid_sensitivity: float
    covid_sensitivity_lcb: float
    covid_specificity: float
    ece: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "n": self.n,
            "macro_f1": round(self.macro_f1, 4),
            "covid_sensitivity": round(self.covid_sensitivity, 4),
            "covid_sensitivity_lcb": round(self.covid_sensitivity_lcb, 4),
            "covid_specificity": round(self.covid_specificity, 4),
            "ece": round(self.ece, 4),
        }


def extra_split_of(patient_key: str) -> str:
    """Reviewed patients go to train or validation (never the locked test set), stably by their key."""
    h = int(hashlib.sha256(patient_key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < EXTRA_VAL_FRACTION else "train"


def _extra_arrays(extra: list[ReviewedExample], size: int) -> tuple[dict, dict, int]:
    xs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    ys: dict[str, list[int]] = {"train": [], "val": []}
    skipped = 0
    for ex in extra:
        try:
            arr = prepare(ex.data, size)
        except ImageDecodeError:
            skipped += 1  # a study that could not be decoded was never screened; nothing to learn from it
            continue
        part = extra_split_of(ex.patient_key)
        xs[part].append(arr)
        ys[part].append(CLASSES.index(ex.label))
    return xs, ys, skipped


def train_candidate(
    base_root: Path,
    split_path: Path,
    extra: list[ReviewedExample],
    out_dir: Path,
    *,
    arch: str = "cxr_s",
    seeds: tuple[int, ...] = (1,),
    epochs: int = 30,
    runs_dir: Path | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    shuffle_labels: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train on base + reviewed train images, calibrate on base + reviewed validation, write an artifact.

    `shuffle_labels` exists for the gate's own test: a deliberately useless candidate.
    Returns the artifact's meta.json.
    """
    import keras

    from model.artifact import build_ensemble, ensemble_logits, write_artifact
    from model.calibrate import fit_temperature, fit_thresholds, softmax
    from model.metrics import headline, summarise
    from model.pipeline import contract_meta, data_meta, model_card
    from model.train import TrainConfig, configure_tf, input_size, to_model_input, train_network

    configure_tf()
    base_root, split_path, out_dir = Path(base_root), Path(split_path), Path(out_dir)
    split = load_or_make_split(base_root, split_path)
    size = input_size(arch)
    ex_x, ex_y, skipped = _extra_arrays(extra, size)
    x, y = {}, {}
    for part in ("train", "val"):
        base_x = load_arrays(base_root, split[part], size)
        parts_x = [base_x] + ([np.stack(ex_x[part])] if ex_x[part] else [])
        x[part] = np.concatenate(parts_x)
        y[part] = np.concatenate([labels_of(split[part]), np.array(ex_y[part], dtype=np.int64)])
    if shuffle_labels:
        y["train"] = np.random.default_rng(0).permutation(y["train"])
    total_epochs = epochs * len(seeds)

    class _Progress(keras.callbacks.Callback):
        def __init__(self, offset: int) -> None:
            super().__init__()
            self.offset = offset

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if on_epoch is not None:
                on_epoch(self.offset + epoch + 1, total_epochs)

    runs_dir = Path(runs_dir or out_dir.parent / f"{out_dir.name}-members")
    members = []
    for i, seed in enumerate(seeds):
        cfg = TrainConfig(arch=arch, seed=seed, epochs=epochs, min_epochs=min(15, max(1, epochs // 2)))
        members.append(
            train_network(
                cfg,
                x["train"],
                y["train"],
                x["val"],
                y["val"],
                runs_dir / f"seed{seed}",
                progress=False,
                callbacks=[_Progress(i * epochs)],
            )
        )
    probs_output = arch == "baseline"
    zv = ensemble_logits(members, to_model_input(x["val"], arch), probs_output=probs_output)
    temperature = fit_temperature(zv, y["val"])
    pv = softmax(zv / temperature)
    thresholds = fit_thresholds(pv, y["val"])
    val_m = summarise(pv, y["val"], thresholds)
    n_extra = {k: len(v) for k, v in ex_y.items()}
    log(f"candidate: T={temperature:.3f} thresholds={thresholds} val {headline(val_m)} extra {n_extra}")
    meta = {
        **contract_meta(
            name="cnn-retrained", arch=arch, size=size, temperature=temperature, thresholds=thresholds
        ),
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "seeds": list(seeds),
        "epochs_max": epochs,
        "members": [],
        "data": {
            **data_meta(base_root, split_path, split),
            "reviewed_images": n_extra,
            "reviewed_skipped_undecodable": skipped,
            "shuffled_labels": shuffle_labels,
        },
        # The locked test split is scored by the gate (score_on_locked_set), not here.
        "metrics": {"val": headline(val_m), "test": headline(val_m)},
        "reproduce": "scheduled retraining (worker/retrain.py); see docs/retraining.md",
    }
    card = model_card(meta).replace(
        "**Test-split results**",
        f"**Retraining.** Base data plus {n_extra['train'] + n_extra['val']} reviewer-confirmed images "
        f"(train {n_extra['train']}, validation {n_extra['val']}); the numbers below are on VALIDATION; the "
        "locked test split is scored by the promotion gate and recorded with the retraining run.\n\n"
        "**Validation results**",
    )
    ensemble = build_ensemble(members, temperature, probs_output=probs_output)
    write_artifact(out_dir, ensemble, meta, card)
    return json.loads((out_dir / "meta.json").read_text())


def score_on_locked_set(artifact_dir: Path, base_root: Path, split_path: Path) -> LockedScore:
    """Score an artifact through the serving path on the locked (test) split that no candidate trains on."""
    from model.metrics import summarise
    from model.serve import Predictor

    predictor = Predictor(Path(artifact_dir))
    split = load_or_make_split(Path(base_root), Path(split_path))
    x = load_arrays(Path(base_root), split["test"], predictor.input_size)
    y = labels_of(split["test"])
    probs = np.concatenate([predictor.predict_arrays(x[i : i + 64]) for i in range(0, len(x), 64)])
    m = summarise(probs, y, predictor.thresholds)
    sens = m["covid_operating_point"]["sensitivity"]
    spec = m["covid_operating_point"]["specificity"]
    return LockedScore(
        n=int(m["n"]),
        macro_f1=float(m["macro_f1"]),
        covid_sensitivity=float(sens[0]),
        covid_sensitivity_lcb=float(sens[1]),
        covid_specificity=float(spec[0]),
        ece=float(m["ece"]),
    )


def gate(candidate: LockedScore, current: LockedScore | None, margins: GateMargins) -> tuple[bool, list[str]]:
    """Promote only a candidate that is measurably no worse; returns (passed, reasons for the verdict)."""
    reasons: list[str] = []
    ok = True
    if candidate.ece > margins.ece_max:
        ok = False
        reasons.append(f"calibration error {candidate.ece:.3f} is above the bound {margins.ece_max:.3f}")
    else:
        reasons.append(f"calibration error {candidate.ece:.3f} within the bound {margins.ece_max:.3f}")
    if current is None:
        reasons.append("no serving model to compare with")
        return ok, reasons
    floor = current.covid_sensitivity_lcb - margins.covid_sensitivity_lcb
    if candidate.covid_sensitivity_lcb < floor:
        ok = False
        reasons.append(
            f"COVID-19 sensitivity lower bound {candidate.covid_sensitivity_lcb:.3f} is below the serving "
            f"model's {current.covid_sensitivity_lcb:.3f} minus margin {margins.covid_sensitivity_lcb:.3f}"
        )
    else:
        reasons.append(
            f"COVID-19 sensitivity lower bound {candidate.covid_sensitivity_lcb:.3f} vs serving "
            f"{current.covid_sensitivity_lcb:.3f} (margin {margins.covid_sensitivity_lcb:.3f})"
        )
    if candidate.macro_f1 < current.macro_f1 - margins.macro_f1:
        ok = False
        reasons.append(
            f"macro-F1 {candidate.macro_f1:.3f} is below the serving model's {current.macro_f1:.3f} "
            f"minus margin {margins.macro_f1:.3f}"
        )
    else:
        reasons.append(
            f"macro-F1 {candidate.macro_f1:.3f} vs serving {current.macro_f1:.3f} "
            f"(margin {margins.macro_f1:.3f})"
        )
    return ok, reasons
