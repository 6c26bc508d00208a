"""End-to-end: split -> train members (seeds) -> temperature + thresholds on validation -> one artifact."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from model import CLASSES, DEFAULT_SPLIT, REPO_ROOT
from model.data import (
    dataset_fingerprint,
    labels_of,
    load_arrays,
    load_or_make_split,
    read_dataset,
    sha256_file,
)
from model.preprocess import PREPROCESS_VERSION


def member_dir(runs_dir: Path, arch: str, seed: int) -> Path:
    """Where one member's model.keras, history.json and curves.png live."""
    return Path(runs_dir) / f"{arch}_seed{seed}"


def train_and_export(
    data: Path,
    out: Path,
    *,
    arch: str = "cxr_slim",
    seeds: tuple[int, ...] = (1, 2, 3),
    epochs: int = 40,
    split_path: Path = DEFAULT_SPLIT,
    runs_dir: Path = REPO_ROOT / "runs" / "train",
    reuse: bool = True,
    select: str = "ensemble",
    command: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train one member per seed (reusing finished ones), calibrate on validation, write the artifact.

    select="ensemble": the artifact averages every seed's logits; select="best": it holds only the seed with
    the lowest validation loss (the early-stopping criterion), chosen on validation, never on test.
    """
    import keras

    from model.artifact import build_ensemble, ensemble_logits, load_keras, write_artifact
    from model.calibrate import fit_temperature, fit_thresholds, softmax
    from model.metrics import calibrate_and_score, headline, summarise
    from model.train import TrainConfig, configure_tf, input_size, to_model_input, train_network

    configure_tf()
    data = Path(data)
    split = load_or_make_split(data, split_path)
    size = input_size(arch)
    xs = {k: load_arrays(data, split[k], size) for k in split}
    ys = {k: labels_of(split[k]) for k in split}
    groups_test = np.array([r.patient_id for r in split["test"]])
    probs_output = arch == "baseline"

    members, member_info = [], []
    for seed in seeds:
        mdir = member_dir(runs_dir, arch, seed)
        cfg = TrainConfig(arch=arch, seed=seed, epochs=epochs)
        if reuse and (mdir / "model.keras").exists() and (mdir / "history.json").exists():
            hist = json.loads((mdir / "history.json").read_text())
            if (
                hist["config"]["epochs"] == epochs
                and hist["config"].get("min_epochs") == cfg.min_epochs  # the sweep tries other values
                and hist.get("split_sha256") == sha256_file(split_path)
                and hist.get("preprocess_version") == PREPROCESS_VERSION
            ):
                log(f"reusing {mdir}")
                members.append(keras.saving.load_model(mdir / "model.keras", compile=False))
                member_info.append(hist)
                continue
        model = train_network(cfg, xs["train"], ys["train"], xs["val"], ys["val"], mdir, progress=progress)
        hist = json.loads((mdir / "history.json").read_text())
        hist["split_sha256"] = sha256_file(split_path)
        hist["preprocess_version"] = PREPROCESS_VERSION
        (mdir / "history.json").write_text(json.dumps(hist, indent=1))
        members.append(model)
        member_info.append(hist)

    xv, xt = to_model_input(xs["val"], arch), to_model_input(xs["test"], arch)
    per_member = []
    for seed, m, info in zip(seeds, members, member_info, strict=True):
        zv = ensemble_logits([m], xv, probs_output=probs_output)
        zt = ensemble_logits([m], xt, probs_output=probs_output)
        res = calibrate_and_score(zv, ys["val"], zt, ys["test"])
        per_member.append(
            {
                "seed": seed,
                "best_epoch": info["best_epoch"],
                "epochs_run": info["epochs_run"],
                "train_seconds": info["train_seconds"],
                "val_accuracy": round(info["best_val_accuracy"], 4),
                "test": headline(res),
            }
        )
        log(f"seed {seed}: test {headline(res)}")

    all_seeds = tuple(seeds)
    if select == "best":
        best = int(np.argmin([info["best_val_loss"] for info in member_info]))
        log(f"selected seed {seeds[best]} (lowest validation loss {member_info[best]['best_val_loss']:.4f})")
        members, seeds = [members[best]], (seeds[best],)
    elif select != "ensemble":
        raise ValueError(f"select must be 'ensemble' or 'best', not {select!r}")
    zv = ensemble_logits(members, xv, probs_output=probs_output)
    zt = ensemble_logits(members, xt, probs_output=probs_output)
    temperature = fit_temperature(zv, ys["val"])
    pv, pt = softmax(zv / temperature), softmax(zt / temperature)
    thresholds = fit_thresholds(pv, ys["val"])
    val_m = summarise(pv, ys["val"], thresholds)
    test_m = summarise(pt, ys["test"], thresholds, groups_test)
    log(
        f"ensemble: T={temperature:.3f} thresholds={thresholds} val {headline(val_m)} test {headline(test_m)}"
    )

    ensemble = build_ensemble(members, temperature, probs_output=probs_output)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    cmd = command or " ".join(shlex.quote(a) for a in sys.argv)
    meta = {
        **contract_meta(
            name="tutorial" if arch == "baseline" else "cnn",
            arch=arch,
            size=size,
            temperature=temperature,
            thresholds=thresholds,
        ),
        "created": created,
        "seeds": list(seeds),
        "seeds_trained": list(all_seeds),
        "selection": "single seed with the lowest validation loss"
        if select == "best"
        else "ensemble of every trained seed (mean logits)",
        "split_seed": 20260401,
        "epochs_max": epochs,
        "members": per_member,
        "data": data_meta(data, split_path, split),
        "metrics": {"val": headline(val_m), "test": headline(test_m)},
        "reproduce": cmd,
    }
    card = model_card(meta)
    write_artifact(Path(out), ensemble, meta, card)
    # sanity: the saved Keras model reloads to the same probabilities
    reloaded = load_keras(Path(out))
    diff = float(np.abs(reloaded.predict(xt[:16], verbose=0) - pt[:16]).max())
    log(f"wrote {out} (reload max |diff| = {diff:.2e})")
    return json.loads((Path(out) / "meta.json").read_text())


def _members_text(meta: dict) -> str:
    seeds = meta["seeds"]
    trained = meta.get("seeds_trained", seeds)
    if len(seeds) == 1 and len(trained) > 1:
        return (
            f"One network (seed {seeds[0]}, chosen among seeds {', '.join(map(str, trained))} by the lowest "
            "validation loss)"
        )
    return f"An ensemble of {len(seeds)} members (seeds {', '.join(map(str, seeds))}, logits averaged)"


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
        "triage_rules": [
            "p_covid >= thresholds.covid -> 'COVID-19 suspected'",
            "else p_pneumonia >= thresholds.pneumonia -> 'pneumonia suspected'",
            "else p_normal >= thresholds.normal -> 'likely normal'",
            "else 'refer to a radiologist'",
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
    t = meta["metrics"]["test"]
    members = ", ".join(f"seed {m['seed']}: macro-F1 {m['test']['macro_f1']:.3f}" for m in meta["members"])
    members = members or "n/a"
    net = (
        "the tutorial CNN (150x150x3, Conv32-Pool-Conv64-Pool-Flatten-Dense), reproduced as a baseline"
        if meta["arch"] == "baseline"
        else f"a compact CNN ({meta['arch']}, {meta['input_size']}x{meta['input_size']} grayscale)"
    )
    return f"""# Model card: {meta.get("version", "{version}")}

**Intended use.** Research and teaching only: batch screening experiments on chest X-rays into COVID-19 /
normal / pneumonia. **This is not a medical device** and must not be used for diagnosis or treatment
decisions.
Every output must be read by a radiologist.

**Model.** {_members_text(meta)}: {net}, trained from scratch. Output: calibrated probabilities
(temperature {meta["temperature"]:.3f}, fitted on the validation split) in class order
{", ".join(meta["classes"])}; served as TFLite through the LiteRT interpreter.
Preprocessing `{meta["preprocess_version"]}`: decode (DICOM with modality LUT, VOI window, MONOCHROME1
inverted), grayscale, resize keeping the aspect ratio, zero padding (no contrast stretch).

**Triage bands** (thresholds chosen on validation only): {"; ".join(meta["triage_rules"])}.
Thresholds: {json.dumps(meta["thresholds"])}.

**Data.** 1,701 public frontal chest X-rays (../shared/data/cxr, sha256
{meta["data"]["dataset_sha256"][:12]}),
split by patient (stratified by class and source, `{meta["data"]["split_file"]}`, sha256
{meta["data"]["split_sha256"][:12]}): {meta["data"]["n_images"]}. COVID-19 images come from paper figures, web
collections and one ICU (ieee8023, cxnet, mlwg, fig1, actmed); normal and pneumonia images mostly from NIH
ChestX-ray14 (adults) and Kermany (children aged 1-5).

**Test-split results** (patient-level, {t["n"]} images): accuracy {t["accuracy"]:.3f},
macro-F1 {t["macro_f1"]:.3f},
macro AUROC {t["auroc_macro"]:.3f}, COVID-19 sensitivity {t["covid_sensitivity"]:.3f} at specificity
{t["covid_specificity"]:.3f} (validation threshold), ECE {t["ece"]:.3f}. Every trained seed alone: {members}.
See docs/model.md for confidence intervals, per-source results and the source probe.

**Limits and known biases.**
- *Class follows source*: almost every COVID-19 image comes from collections that hold no normal or pneumonia
  images, so the network can score well by recognising the collection (image style, markers, captions, age).
  Test results come from the same collections and overstate performance on a new hospital's images.
- Pneumonia vs normal within NIH is hard (labels mined from reports by software; noisy).
- Kermany images are children aged 1-5; adult pneumonia from other sources may behave differently.
- Not validated on lateral views, CT, other pathologies, devices or post-operative films; no prospective test.
- Calibration was fitted on a validation split of the same collections; it may not hold elsewhere.

**Reproduce.** `{meta["reproduce"]}`
"""
