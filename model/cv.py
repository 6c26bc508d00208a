"""Patient-grouped k-fold cross-validation over train+val: every choice is made on out-of-fold predictions.

    python -m model.cv --name res256 --arch res_256 --epochs 30
    python -m model.cv --name slim --arch cxr_slim --epochs 30 --report   # summary of finished folds only

Folds are grouped by patient and stratified by class x source (`cv_folds`). Each fold's network is trained on
the other folds for the whole schedule with no early stopping (so the held-out fold never picks an epoch) and
predicts its held-out fold once: the out-of-fold (OOF) logits. The test split is never loaded here.

Outputs under runs/cv/<name>/: fold<k>/model.keras + history.json + curves.png, oof.npz (logits, labels,
folds, sources, patients, files) and summary.json (per-fold metrics, mean and spread, pooled OOF metrics
after temperature scaling, per-source accuracy, triage bands).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from model import CLASSES, DEFAULT_SPLIT, REPO_ROOT, shared_data_dir

CV_SEED = 20261202
N_FOLDS = 5
COVID = CLASSES.index("covid")


def cv_records(split_path: Path = DEFAULT_SPLIT) -> list:
    """The development pool: train + val of the frozen split (the test split stays untouched)."""
    from model.data import read_split

    split = read_split(split_path)
    return split["train"] + split["val"]


def cv_folds(records: list, k: int = N_FOLDS, seed: int = CV_SEED) -> np.ndarray:
    """Fold index per record: grouped by patient, stratified by (label, source)."""
    from sklearn.model_selection import StratifiedGroupKFold

    strata = np.array([f"{r.label}|{r.source}" for r in records])
    groups = np.array([r.patient_id for r in records])
    folds = np.full(len(records), -1, dtype=np.int64)
    for f, (_, held) in enumerate(
        StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(strata, strata, groups)
    ):
        folds[held] = f
    return folds


def sens_at_spec(p_pos: np.ndarray, positive: np.ndarray, spec: float) -> float:
    """Sensitivity at the lowest threshold whose specificity is still >= spec."""
    neg = np.sort(p_pos[~positive])
    if not len(neg) or not positive.any():
        return float("nan")
    # threshold above the spec-quantile of the negatives: at most (1 - spec) of them are flagged
    k = int(np.ceil(spec * len(neg))) - 1
    t = neg[min(max(k, 0), len(neg) - 1)]
    return float((p_pos[positive] > t).mean())


def fold_metrics(logits: np.ndarray, y: np.ndarray) -> dict:
    """Threshold-free metrics of one fold (argmax class, AUROC, COVID sensitivity at fixed specificity)."""
    from model.calibrate import softmax
    from model.metrics import auroc_ovr, macro_f1

    probs = softmax(logits)
    pred = probs.argmax(1)
    auc = auroc_ovr(y, probs)
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred),
        "auroc_macro": auc["macro"],
        "auroc_covid": auc["covid"],
        "covid_sens_at_spec90": sens_at_spec(probs[:, COVID], y == COVID, 0.90),
        "covid_sens_at_spec95": sens_at_spec(probs[:, COVID], y == COVID, 0.95),
    }


def band_report(probs: np.ndarray, y: np.ndarray, thresholds: dict[str, float]) -> dict:
    """Share, precision and recall of every band; metrics of the reported (band-consistent) findings."""
    from model.calibrate import BAND_CLASS, BANDS, decide_all
    from model.metrics import macro_f1

    decided, bands = decide_all(probs, thresholds)
    bands = np.array(bands)
    out: dict = {}
    for b in BANDS:
        m = bands == b
        row = {"n": int(m.sum()), "share": float(m.mean())}
        row["truth"] = {c: int(((y == i) & m).sum()) for i, c in enumerate(CLASSES)}
        if b in BAND_CLASS:
            c = CLASSES.index(BAND_CLASS[b])
            row["precision"] = float((y[m] == c).mean()) if m.any() else float("nan")
            row["recall"] = float(m[y == c].mean()) if (y == c).any() else float("nan")
        out[b] = row
    non_covid = y != COVID
    out["COVID-19 suspected"]["non_covid_flagged"] = float((bands[non_covid] == "COVID-19 suspected").mean())
    return {
        "bands": out,
        "decided": {"accuracy": float((decided == y).mean()), "macro_f1": macro_f1(y, decided)},
    }


def bootstrap_precision_lcb(hit: np.ndarray, groups: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    """2.5th percentile of a band's precision, resampling patients (groups) with replacement."""
    from model.metrics import patient_resamples

    if not len(hit):
        return float("nan")
    return float(np.percentile([hit[idx].mean() for idx in patient_resamples(groups, n, seed)], 2.5))


def summarise_oof(
    logits: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    sources: np.ndarray,
    *,
    thresholds: dict[str, float] | None = None,
    groups: np.ndarray | None = None,
    temperature: float | None = None,
) -> dict:
    """Mean and spread over folds, pooled OOF metrics after temperature scaling, per-source accuracy, bands.

    Without `thresholds` the band thresholds, and without `temperature` the temperature, are fitted on these
    same OOF predictions (as the exported model's are); a caller that has them already passes them.
    """
    from model.calibrate import fit_temperature, fit_thresholds, softmax
    from model.metrics import ece

    done = folds >= 0
    per_fold = {int(f): fold_metrics(logits[folds == f], y[folds == f]) for f in np.unique(folds[done])}
    keys = list(next(iter(per_fold.values())).keys())[1:]
    mean = {k: float(np.mean([m[k] for m in per_fold.values()])) for k in keys}
    sd = {
        k: float(np.std([m[k] for m in per_fold.values()], ddof=1)) if len(per_fold) > 1 else 0.0
        for k in keys
    }
    z, yy = logits[done], y[done]
    t = temperature if temperature is not None else fit_temperature(z, yy)
    probs = softmax(z / t)
    pred = probs.argmax(1)
    per_source = {}
    for s in sorted(set(sources[done])):
        m = sources[done] == s
        per_source[s] = {
            "n": int(m.sum()),
            "accuracy": float((pred[m] == yy[m]).mean()),
            "truth": {c: int((yy[m] == i).sum()) for i, c in enumerate(CLASSES)},
            "predicted": {c: int((pred[m] == i).sum()) for i, c in enumerate(CLASSES)},
        }
    thresholds = thresholds or fit_thresholds(probs, yy)
    bands = band_report(probs, yy, thresholds)
    if groups is not None:
        from model.calibrate import BAND_NORMAL, NORMAL, decide_all

        in_band = np.array(decide_all(probs, thresholds)[1]) == BAND_NORMAL
        bands["bands"][BAND_NORMAL]["precision_lcb"] = bootstrap_precision_lcb(
            yy[in_band] == NORMAL, groups[done][in_band]
        )
    return {
        "thresholds": thresholds,
        **bands,
        "folds_done": sorted(per_fold),
        "per_fold": per_fold,
        "mean": mean,
        "sd": sd,
        "pooled": {
            **fold_metrics(z / t, yy),
            "temperature": t,
            "ece_calibrated": ece(probs, yy),
            "ece_uncalibrated": ece(softmax(z), yy),
        },
        "per_source": per_source,
    }


def cross_validate(
    cfg,
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    out: Path,
    *,
    folds_to_run: list[int] | None = None,
    on_epoch=None,
    exclude: np.ndarray | None = None,
    log=print,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train (or reuse) one network per fold on the other folds; return (OOF logits, folds, models).

    `cfg` is a model.train.TrainConfig. A fold whose out/fold<k>/model.keras exists is reused (the caller keys
    `out` by everything that defines the run). `on_epoch(done, total)` reports progress over all folds.
    `exclude` (bool per study): left out of every fold's training, never out of evaluation (label noise).
    """
    import keras

    from model.artifact import ensemble_logits
    from model.train import to_model_input, train_network

    k = int(folds.max()) + 1
    todo = list(folds_to_run) if folds_to_run is not None else list(range(k))
    logits = np.full((len(y), len(CLASSES)), np.nan, dtype=np.float32)
    done = np.full(len(y), -1, dtype=np.int64)
    models: dict[int, object] = {}
    for i, f in enumerate(todo):
        fdir = Path(out) / f"fold{f}"
        tr, te = folds != f, folds == f
        if exclude is not None:
            tr = tr & ~exclude
        if (fdir / "model.keras").exists():
            model = keras.saving.load_model(fdir / "model.keras", compile=False)
        else:
            log(f"[{Path(out).name}] fold {f}: training on {tr.sum()} images, {te.sum()} held out")
            callbacks = (
                [_EpochProgress(on_epoch, i * cfg.epochs, len(todo) * cfg.epochs)] if on_epoch else None
            )
            model = train_network(cfg, x[tr], y[tr], x[te], y[te], fdir, progress=False, callbacks=callbacks)
        logits[te] = ensemble_logits(
            [model], to_model_input(x[te], cfg.arch), probs_output=cfg.arch == "baseline"
        )
        done[te] = f
        models[f] = model
        hist = json.loads((fdir / "history.json").read_text())
        log(
            f"[{Path(out).name}] fold {f}: {hist['train_seconds']:.0f}s, "
            + json.dumps({k: round(v, 4) for k, v in fold_metrics(logits[te], y[te]).items()})
        )
    return logits, done, models


def _EpochProgress(on_epoch, offset: int, total: int):  # noqa: N802 - a class factory (keras imported late)
    import keras

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            on_epoch(offset + epoch + 1, total)

    return Progress()


def save_oof(path: Path, records: list, logits: np.ndarray, y: np.ndarray, folds: np.ndarray) -> None:
    """Write out-of-fold logits as CSV: file,patient_id,source,label,fold,logit_<class>..."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "patient_id", "source", "label", "fold", *(f"logit_{c}" for c in CLASSES)])
        for r, z, f in zip(records, logits, folds, strict=True):
            w.writerow([r.file, r.patient_id, r.source, r.label, int(f), *(f"{v:.5f}" for v in z)])


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """Read save_oof's CSV into arrays (files, patients, sources, y, folds, logits)."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {
        "files": np.array([r["file"] for r in rows]),
        "patients": np.array([r["patient_id"] for r in rows]),
        "sources": np.array([r["source"] for r in rows]),
        "y": np.array([CLASSES.index(r["label"]) for r in rows], dtype=np.int64),
        "folds": np.array([int(r["fold"]) for r in rows], dtype=np.int64),
        "logits": np.array([[float(r[f"logit_{c}"]) for c in CLASSES] for r in rows], dtype=np.float32),
    }


def run_cv(
    name: str,
    cfg_kwargs: dict,
    *,
    data: Path,
    folds_to_run: list[int] | None = None,
    k: int = N_FOLDS,
    split_path: Path = DEFAULT_SPLIT,
    runs_dir: Path = REPO_ROOT / "runs" / "cv",
    lung_crop: bool = False,
    clahe: bool = False,
    exclude_files: frozenset[str] = frozenset(),
    log=print,
) -> dict:
    """A sweep candidate: cross-validate one recipe over train+val, write oof.csv and summary.json."""
    from model.data import labels_of, load_arrays
    from model.train import TrainConfig, configure_tf, input_size

    configure_tf()
    records = cv_records(split_path)
    folds = cv_folds(records, k)
    y = labels_of(records)
    cfg = TrainConfig(**{"early_stopping": False, **cfg_kwargs})
    x = load_arrays(data, records, input_size(cfg.arch), lung_crop=lung_crop, clahe=clahe)
    out = Path(runs_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            {
                "name": name,
                "k": k,
                "cv_seed": CV_SEED,
                "lung_crop": lung_crop,
                "clahe": clahe,
                "excluded_from_training": sorted(exclude_files),
                **asdict(cfg),
            },
            indent=1,
        )
    )
    exclude = np.array([r.file in exclude_files for r in records]) if exclude_files else None
    logits, done, _ = cross_validate(
        cfg, x, y, folds, out, folds_to_run=folds_to_run, exclude=exclude, log=log
    )
    save_oof(out / "oof.csv", records, logits, y, done)
    sources = np.array([r.source for r in records])
    groups = np.array([r.patient_id for r in records])
    summary = {
        "name": name,
        "config": {**asdict(cfg), "lung_crop": lung_crop, "clahe": clahe},
        **summarise_oof(logits, y, done, sources, groups=groups),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def consistent_errors(names: list[str], runs_dir: Path = REPO_ROOT / "runs" / "cv") -> dict:
    """Studies that every candidate's out-of-fold prediction gets wrong, per source and true class.

    A label that several independently trained networks all contradict, each without having seen it, is the
    first place to look for label noise (NIH labels were mined from reports).
    """
    oofs = [read_oof(Path(runs_dir) / n / "oof.csv") for n in names]
    files = oofs[0]["files"]
    for o in oofs[1:]:
        if not np.array_equal(o["files"], files):
            raise ValueError("the candidates were cross-validated on different pools")
    y, sources = oofs[0]["y"], oofs[0]["sources"]
    wrong = np.all([o["logits"].argmax(1) != y for o in oofs], axis=0)
    out: dict = {"candidates": names, "n": int(len(y)), "wrong_in_all": int(wrong.sum()), "by_source": {}}
    for src in sorted(set(sources)):
        m = sources == src
        out["by_source"][src] = {
            CLASSES[c]: {"n": int((m & (y == c)).sum()), "wrong_in_all": int((m & (y == c) & wrong).sum())}
            for c in range(len(CLASSES))
            if (m & (y == c)).any()
        }
    out["files"] = [str(f) for f in files[wrong]]
    return out


def oof_source_probe(name: str, *, data: Path, runs_dir: Path = REPO_ROOT / "runs" / "cv") -> dict:
    """Source probe on out-of-fold features: can a linear model tell the collection from what the network
    computes on images it never trained on? Within one class, accuracy far above chance means shortcuts."""
    import keras

    from model.data import load_arrays
    from model.evaluate import source_probe
    from model.network import FEATURE_LAYER
    from model.train import input_size, to_model_input

    out = Path(runs_dir) / name
    conf = json.loads((out / "config.json").read_text())
    records = cv_records()
    folds = cv_folds(records, conf["k"])
    x = load_arrays(
        data,
        records,
        input_size(conf["arch"]),
        lung_crop=conf.get("lung_crop", False),
        clahe=conf.get("clahe", False),
    )
    feats = None
    for f in range(conf["k"]):
        m = keras.saving.load_model(out / f"fold{f}" / "model.keras", compile=False)
        fm = keras.Model(m.inputs, m.get_layer(FEATURE_LAYER).output)
        held = folds == f
        z = fm.predict(to_model_input(x[held], conf["arch"]), batch_size=64, verbose=0)
        feats = np.zeros((len(records), z.shape[1]), np.float32) if feats is None else feats
        feats[held] = z
    y = np.array([r.label for r in records])
    src = np.array([r.source for r in records])
    grp = np.array([r.patient_id for r in records])
    res = {}
    for sub in ("all", *CLASSES):
        sel = np.ones(len(y), bool) if sub == "all" else y == sub
        if len(set(src[sel])) >= 2:
            res[sub] = source_probe(feats[sel], src[sel], grp[sel])
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    return res


TWO_CLASS_COLLECTIONS = ("ieee8023", "actmed", "fig1", "nih", "kermany")


def run_loco(
    name: str,
    cfg_kwargs: dict,
    *,
    data: Path,
    collections: tuple[str, ...] = TWO_CLASS_COLLECTIONS,
    split_path: Path = DEFAULT_SPLIT,
    runs_dir: Path = REPO_ROOT / "runs" / "loco",
    lung_crop: bool = False,
    log=print,
) -> dict:
    """Leave one collection out: train on the rest of train+val, score the left-out collection.

    The closest estimate this data gives of a hospital the model has never seen; only collections that hold
    two classes say something about telling classes apart (rather than recognising the collection).
    """
    import keras

    from model.artifact import ensemble_logits
    from model.data import labels_of, load_arrays
    from model.metrics import macro_f1
    from model.train import TrainConfig, configure_tf, input_size, to_model_input, train_network

    configure_tf()
    records = cv_records(split_path)
    y = labels_of(records)
    cfg = TrainConfig(**{"early_stopping": False, **cfg_kwargs})
    x = load_arrays(data, records, input_size(cfg.arch), lung_crop=lung_crop)
    sources = np.array([r.source for r in records])
    out = Path(runs_dir) / name
    results = {}
    for c in collections:
        cdir = out / c
        te = sources == c
        if (cdir / "model.keras").exists():
            model = keras.saving.load_model(cdir / "model.keras", compile=False)
        else:
            log(f"[{name}] without {c}: training on {(~te).sum()} images, scoring {te.sum()}")
            model = train_network(cfg, x[~te], y[~te], x[te], y[te], cdir, progress=False)
        z = ensemble_logits([model], to_model_input(x[te], cfg.arch), probs_output=cfg.arch == "baseline")
        pred, yt = z.argmax(1), y[te]
        present = sorted(set(yt.tolist()))
        results[c] = {
            "n": int(te.sum()),
            "truth": {CLASSES[i]: int((yt == i).sum()) for i in present},
            "accuracy": float((pred == yt).mean()),
            "recall": {CLASSES[i]: float((pred[yt == i] == i).mean()) for i in present},
            "predicted": {cl: int((pred == i).sum()) for i, cl in enumerate(CLASSES)},
            # macro-F1 over the classes the collection holds (a third, absent class only adds errors)
            "macro_f1_present": macro_f1(yt, pred, labels=present),
        }
        log(f"[{name}] without {c}: " + json.dumps(results[c]))
    (out / "loco.json").write_text(
        json.dumps({"name": name, "config": asdict(cfg), "results": results}, indent=1)
    )
    return results


def main() -> None:
    """Command line: run (or resume) one cross-validated candidate and print its summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--arch", default="cxr_slim")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--folds", default=None, help="comma-separated fold indices (default: all)")
    ap.add_argument("--lung-crop", action="store_true", help="crop to the checked lung fields first")
    ap.add_argument("--clahe", action="store_true", help="CLAHE inside preprocessing (model.preprocess)")
    ap.add_argument(
        "--exclude-from-training",
        type=Path,
        default=None,
        help="studies (manifest 'file' values, one per line) kept out of training, never out of evaluation",
    )
    ap.add_argument("--loco", action="store_true", help="leave-one-collection-out instead of k-fold")
    ap.add_argument("--probe", action="store_true", help="source probe on the out-of-fold features of --name")
    ap.add_argument("--noise", default=None, help="comma-separated candidates: studies all of them get wrong")
    ap.add_argument("--data", type=Path, default=shared_data_dir("cxr"))
    args = ap.parse_args()
    cfg = {
        "arch": args.arch,
        "epochs": args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "label_smoothing": args.label_smoothing,
    }
    if args.probe:
        print(json.dumps(oof_source_probe(args.name, data=args.data), indent=1))
        return
    if args.noise:
        rep = consistent_errors(args.noise.split(","))
        print(json.dumps({k: v for k, v in rep.items() if k != "files"}, indent=1))
        return
    if args.loco:
        run_loco(args.name, cfg, data=args.data, lung_crop=args.lung_crop, log=lambda m: print(m, flush=True))
        return
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    s = run_cv(
        args.name,
        cfg,
        data=args.data,
        folds_to_run=folds,
        lung_crop=args.lung_crop,
        clahe=args.clahe,
        exclude_files=frozenset(
            args.exclude_from_training.read_text().splitlines() if args.exclude_from_training else ()
        ),
        log=lambda m: print(m, flush=True),
    )
    print(json.dumps({k: s[k] for k in ("name", "mean", "sd", "pooled")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
