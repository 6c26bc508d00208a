"""The one training path: cross-validate a recipe on train+val, calibrate on out-of-fold predictions, export.

`develop` is called by `cxr model train` (the shipped model) and by scheduled retraining (worker/retrain.py,
with reviewer-confirmed images added to the pool). It trains one network per patient-grouped fold
(model/cv.py), fits the temperature and the band thresholds on the out-of-fold (OOF) logits of all of
train+val, and writes an artifact whose network is the mean of a fixed set of fold networks (chosen by index,
never by score). The artifact carries its OOF predictions (oof.csv), which the promotion gate compares with
the serving model's on the same studies. The test split is never read here (`cxr model evaluate` reads it,
once per shipped model, and logs the read).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model import CLASSES, DEFAULT_SPLIT, REPO_ROOT
from model.calibrate import BAND_LEGEND
from model.data import (
    Record,
    dataset_fingerprint,
    labels_of,
    load_arrays,
    load_or_make_split,
    read_dataset,
    sha256_file,
)
from model.preprocess import PREPROCESS_VERSION

# The served network may cost up to this much per study (issue 10: ~15x the first model, 60 studies/s raw).
MAX_SERVE_MFLOP = 1500


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a trained model version apart from the data."""

    arch: str = "cxr_slim"
    epochs: int = 30
    seed: int = 1
    lr: float = 1e-3
    label_smoothing: float = 0.0
    folds: int = 5
    # fold networks averaged in the artifact, by index (never chosen by score); empty: as many as the
    # FLOP budget allows, from fold 0 up
    members: tuple[int, ...] = ()

    def train_config(self):
        """The model.train.TrainConfig of every fold (the whole schedule, no early stopping)."""
        from model.train import TrainConfig

        return TrainConfig(
            arch=self.arch,
            seed=self.seed,
            epochs=self.epochs,
            lr=self.lr,
            label_smoothing=self.label_smoothing,
            early_stopping=False,
        )

    @classmethod
    def from_meta(cls, meta: dict) -> Recipe:
        """The recipe in an artifact's meta.json (older artifacts: their arch, defaults otherwise)."""
        raw = dict(meta.get("recipe") or {"arch": meta.get("arch", cls.arch)})
        raw["members"] = tuple(raw.get("members", ()))
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


# The recipe of the committed model, chosen on out-of-fold predictions (docs/model.md has the table).
SHIPPED_RECIPE = Recipe(arch="cxr_slim", epochs=30, label_smoothing=0.1)


@dataclass(frozen=True)
class ReviewedExample:
    """A reviewer-confirmed image: bytes, label, and the hashed patient key (keeps folds patient-level)."""

    data: bytes
    label: str
    patient_key: str


def _reviewed_pool(extra: Sequence[ReviewedExample], size: int) -> tuple[list[Record], list[np.ndarray], int]:
    from model.preprocess import ImageDecodeError, prepare

    recs, arrays, skipped = [], [], 0
    for ex in extra:
        try:
            arrays.append(prepare(ex.data, size))
        except ImageDecodeError:
            skipped += 1  # a study that could not be decoded was never screened; nothing to learn from it
            continue
        sha = hashlib.sha256(ex.data).hexdigest()[:16]
        recs.append(Record(f"reviewed/{sha}", ex.label, "reviewed", f"reviewed:{ex.patient_key}"))
    return recs, arrays, skipped


def serve_members(recipe: Recipe, mflop_per_network: float) -> tuple[int, ...]:
    """The fold networks the artifact averages: the recipe's, or as many as MAX_SERVE_MFLOP allows."""
    if recipe.members:
        return tuple(recipe.members)
    n = int(max(1, min(recipe.folds, MAX_SERVE_MFLOP // max(mflop_per_network, 1.0))))
    return tuple(range(n))


def develop(
    data: Path,
    out: Path,
    *,
    recipe: Recipe,
    split_path: Path = DEFAULT_SPLIT,
    extra: Sequence[ReviewedExample] = (),
    runs_dir: Path | None = None,
    name: str = "cnn",
    shuffle_labels: bool = False,
    on_epoch: Callable[[int, int], None] | None = None,
    command: str | None = None,
    reuse_cv: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Cross-validate `recipe` on train+val (+ reviewed images), calibrate on OOF, write the artifact.

    Fold networks are cached in runs_dir/<key>/fold<k> where key hashes the recipe, the pool and the
    preprocessing. `reuse_cv` names a `python -m model.cv` run (runs/cv/<name>) of the same recipe whose fold
    networks are adopted instead of retrained (checked: same training config, folds and seed).
    `shuffle_labels` exists for the gate's own test: a deliberately useless candidate.
    Returns the artifact's meta.json.
    """
    from model.artifact import build_ensemble, write_artifact
    from model.calibrate import fit_temperature, fit_thresholds, softmax
    from model.cv import CV_SEED, cross_validate, cv_folds, save_oof, summarise_oof
    from model.network import conv_flops
    from model.train import build, configure_tf, input_size

    configure_tf()
    data, out, split_path = Path(data), Path(out), Path(split_path)
    split = load_or_make_split(data, split_path)
    base = split["train"] + split["val"]
    size = input_size(recipe.arch)
    x_base = load_arrays(data, base, size)
    ex_recs, ex_x, skipped = _reviewed_pool(extra, size)
    records = base + ex_recs
    x = np.concatenate([x_base, np.stack(ex_x)]) if ex_x else x_base
    y = labels_of(records)
    if shuffle_labels:
        y = np.random.default_rng(0).permutation(y)
    folds = cv_folds(records, recipe.folds)
    key = hashlib.sha256(
        json.dumps(
            {
                "recipe": asdict(recipe) | {"members": None},
                "pool": [r.file for r in records],
                "labels": y.tolist(),
                "pp": PREPROCESS_VERSION,
                "cv_seed": CV_SEED,
                "data": dataset_fingerprint(data, records),
            }
        ).encode()
    ).hexdigest()[:12]
    runs = Path(runs_dir or REPO_ROOT / "runs" / "develop") / f"{recipe.arch}-{key}"
    runs.mkdir(parents=True, exist_ok=True)
    cfg = recipe.train_config()
    if reuse_cv is not None and not shuffle_labels and not extra:
        _adopt_sweep_folds(Path(reuse_cv), runs, cfg, recipe.folds, log)
    logits, done, models = cross_validate(cfg, x, y, folds, runs, on_epoch=on_epoch, log=log)
    temperature = fit_temperature(logits, y)
    probs = softmax(logits / temperature)
    thresholds = fit_thresholds(probs, y)
    sources = np.array([r.source for r in records])
    groups = np.array([r.patient_id for r in records])
    oof = summarise_oof(
        logits, y, done, sources, thresholds=thresholds, groups=groups, temperature=temperature
    )
    mflop = conv_flops(build(recipe.arch)) / 1e6
    members = serve_members(recipe, mflop)
    log(
        f"{recipe.arch}: OOF macro-F1 {oof['mean']['macro_f1']:.3f} (sd {oof['sd']['macro_f1']:.3f}), "
        f"T={temperature:.3f}, thresholds {thresholds}; "
        f"serving folds {members} ({mflop * len(members):.0f} MFLOP)"
    )
    ensemble = build_ensemble(
        [models[f] for f in members], temperature, probs_output=recipe.arch == "baseline"
    )
    n_extra = len(ex_recs)
    meta = {
        **contract_meta(
            name=name, arch=recipe.arch, size=size, temperature=temperature, thresholds=thresholds
        ),
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "recipe": asdict(recipe) | {"members": list(members)},
        "mflop_per_study": round(mflop * len(members)),
        "selection": f"mean logits of fold networks {list(members)} of a {recipe.folds}-fold "
        "cross-validation (chosen by index, not by score)",
        "data": {
            **data_meta(data, split_path, split),
            "pool_images": len(records),
            "reviewed_images": n_extra,
            "reviewed_skipped_undecodable": skipped,
            "shuffled_labels": shuffle_labels,
        },
        # out-of-fold numbers of train+val: the ones every choice was made on; test is read by `evaluate`
        "metrics": {"oof": oof_headline(oof)},
        "reproduce": command or " ".join(shlex.quote(a) for a in sys.argv),
    }
    write_artifact(out, ensemble, meta, model_card(meta))
    save_oof(out / "oof.csv", records, logits, y, done)
    return json.loads((out / "meta.json").read_text())


def _adopt_sweep_folds(sweep: Path, runs: Path, cfg, k: int, log: Callable[[str], None]) -> None:
    """Copy a sweep's fold networks into `runs` when the sweep trained exactly this configuration."""
    import shutil

    from model.cv import CV_SEED

    conf = json.loads((sweep / "config.json").read_text())
    want = {**asdict(cfg), "k": k, "cv_seed": CV_SEED, "lung_crop": False}
    diff = {key: (conf.get(key, False), v) for key, v in want.items() if conf.get(key, False) != v}
    if diff:
        raise ValueError(f"{sweep} was trained with another configuration: {diff}")
    for f in range(k):
        src, dst = sweep / f"fold{f}", runs / f"fold{f}"
        if (src / "model.keras").exists() and not (dst / "model.keras").exists():
            shutil.copytree(src, dst, dirs_exist_ok=True)
            log(f"adopted {src} (same configuration)")


def oof_headline(oof: dict) -> dict:
    """The few OOF numbers kept in meta.json: mean and spread over folds, pooled bands and calibration."""
    r = {f"{k}_mean": round(v, 4) for k, v in oof["mean"].items()}
    r.update({f"{k}_sd": round(v, 4) for k, v in oof["sd"].items()})
    r["n"] = int(sum(m["n"] for m in oof["per_fold"].values()))
    r["ece"] = round(oof["pooled"]["ece_calibrated"], 4)
    if "bands" in oof:
        r["bands"] = oof["bands"]
        r["decided_macro_f1"] = round(oof["decided"]["macro_f1"], 4)
    return r


def contract_meta(*, name: str, arch: str, size: int, temperature: float, thresholds: dict) -> dict:
    """The part of meta.json that tells a loader how to feed the model and read its output."""
    return {
        "name": name,
        "arch": arch,
        "input_size": size,
        "input_channels": 3 if arch == "baseline" else 1,
        "preprocess_version": PREPROCESS_VERSION,
        "classes": list(CLASSES),
        "output": "calibrated probabilities: softmax(mean member logits / temperature)",
        "temperature": round(temperature, 6),
        "thresholds": thresholds,
        # what each band means, for every report that shows one (web reads it from the model registry)
        "band_legend": dict(BAND_LEGEND),
        "triage_rules": [
            "p_covid >= thresholds.covid -> finding covid, 'COVID-19 suspected'",
            "else p_normal >= thresholds.normal -> finding normal, 'likely normal'",
            "else p_pneumonia >= thresholds.pneumonia -> finding pneumonia, 'pneumonia suspected'",
            "else finding = the likelier of normal and pneumonia, 'refer to a radiologist'",
        ],
        "serving": {"format": "tflite", "file": "model.tflite", "runtime": "LiteRT interpreter (XNNPACK)"},
    }


def data_meta(data: Path, split_path: Path, split: dict[str, list]) -> dict:
    """What the model was trained on: dataset and split hashes, split file, images per split."""
    split_path = Path(split_path)
    return {
        "dataset_sha256": dataset_fingerprint(data, read_dataset(data)),
        "split_file": str(split_path.resolve().relative_to(REPO_ROOT))
        if split_path.resolve().is_relative_to(REPO_ROOT)
        else str(split_path),
        "split_sha256": sha256_file(split_path),
        "n_images": {k: len(v) for k, v in split.items()},
    }


def model_card(meta: dict) -> str:
    """The model card (markdown) of an artifact."""
    o = meta["metrics"]["oof"]
    r = meta["recipe"]
    bands = o.get("bands", {})
    band_txt = "; ".join(f"{b}: {v['share']:.0%} of studies" for b, v in bands.items()) or "n/a"
    return f"""# Model card: {meta.get("version", "{version}")}

**Intended use.** Research and teaching only: batch screening experiments on chest X-rays into COVID-19 /
normal / pneumonia. **This is not a medical device** and must not be used for diagnosis or treatment
decisions. Every output must be read by a radiologist.

**Model.** The mean logits of fold networks {r["members"]} of a {r["folds"]}-fold patient-grouped
cross-validation of `{meta["arch"]}` ({meta["input_size"]}x{meta["input_size"]} grayscale, trained from
scratch for {r["epochs"]} epochs, seed {r["seed"]}, label smoothing {r["label_smoothing"]}),
{meta.get("mflop_per_study", "?")} MFLOP per study. Output: calibrated probabilities (temperature
{meta["temperature"]:.3f}, fitted on the out-of-fold predictions) in class order {", ".join(meta["classes"])};
served as TFLite through the LiteRT interpreter. Preprocessing `{meta["preprocess_version"]}`.

**Findings and triage bands** (thresholds fitted on out-of-fold predictions; the finding always agrees with
the band): {"; ".join(meta["triage_rules"])}. Thresholds: {json.dumps(meta["thresholds"])}.

**Data.** Train + validation of the patient-level split of ../shared/data/cxr (sha256
{meta["data"]["dataset_sha256"][:12]}, `{meta["data"]["split_file"]}`): {meta["data"]["pool_images"]} images
including {meta["data"]["reviewed_images"]} reviewer-confirmed ones. COVID-19 images come from paper figures,
web collections and one ICU; normal and pneumonia images mostly from NIH ChestX-ray14 (adults) and Kermany
(children aged 1-5).

**Out-of-fold results** (mean over {r["folds"]} folds, spread in brackets): macro-F1
{o["macro_f1_mean"]:.3f} ({o["macro_f1_sd"]:.3f}), accuracy {o["accuracy_mean"]:.3f}, COVID-19 AUROC
{o["auroc_covid_mean"]:.3f}, COVID-19 sensitivity at 90% specificity {o["covid_sens_at_spec90_mean"]:.3f}, at
95% {o["covid_sens_at_spec95_mean"]:.3f}; ECE after calibration {o["ece"]:.3f}. Bands: {band_txt}.
The single read of the test split is logged in docs/model.md.

**Limits and known biases.**
- *Class follows source*: almost every COVID-19 image comes from collections that hold no normal or pneumonia
  images, so the network can score well by recognising the collection. Cross-validation draws from the same
  collections and overstates performance on a new hospital's images (by about 0.07 macro-F1 when measured).
- Pneumonia vs normal within NIH is hard (labels mined from reports by software; noisy).
- Kermany images are children aged 1-5; adult pneumonia from other sources may behave differently.
- Not validated on lateral views, CT, other pathologies, devices or post-operative films; no prospective test.

**Reproduce.** `{meta["reproduce"]}`
"""
