"""The evaluation report: ours vs the tutorial CNN on the patient-level test split (Markdown + PNG plots)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np

from model import CLASSES, REPO_ROOT
from model.calibrate import BANDS, softmax
from model.data import labels_of, load_arrays, read_split
from model.metrics import calibrate_and_score, ece, headline, summarise


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Evaluated:
    """Probabilities, logits and features of one artifact on validation and test."""

    def __init__(self, name: str, artifact_dir: Path, data: Path, split: dict) -> None:
        import keras

        from model.artifact import load_keras, read_meta
        from model.network import FEATURE_LAYER
        from model.serve import Predictor
        from model.train import to_model_input

        self.name, self.dir = name, Path(artifact_dir)
        self.meta = read_meta(self.dir)
        size, arch = int(self.meta["input_size"]), self.meta["arch"]
        probs_output = arch == "baseline"
        x = {k: load_arrays(data, split[k], size) for k in ("val", "test")}
        self.x_small = {k: load_arrays(data, split[k], 32) for k in ("val", "test")}
        predictor = Predictor(self.dir)  # the serving path, exactly as the worker runs it
        self.probs = {
            k: np.concatenate([predictor.predict_arrays(x[k][i : i + 64]) for i in range(0, len(x[k]), 64)])
            for k in x
        }
        ens = load_keras(self.dir)
        members = [layer for layer in ens.layers if isinstance(layer, keras.Model)]
        self.member_logits: list[dict[str, np.ndarray]] = []
        feats = {k: [] for k in x}
        for m in members:
            fm = keras.Model(m.inputs, [m.get_layer(FEATURE_LAYER).output, m.outputs[0]])
            logits = {}
            for k in x:
                f, z = fm.predict(to_model_input(x[k], arch), batch_size=32, verbose=0)
                feats[k].append(f.reshape(len(f), -1))
                logits[k] = np.log(np.clip(z, 1e-7, 1.0)) if probs_output else z
            self.member_logits.append(logits)
        self.features = {k: np.concatenate(v, axis=1) for k, v in feats.items()}
        self.mean_logits = {k: np.mean([ml[k] for ml in self.member_logits], axis=0) for k in x}


def source_probe(features: np.ndarray, sources: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """Cross-validated (5 folds by patient) logistic regression predicting the source from features."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = np.isin(sources, [s for s in np.unique(sources) if (sources == s).sum() >= 5])
    f, s, g = features[keep], sources[keep], groups[keep]
    n_comp = int(min(64, f.shape[1], len(f) // 5))
    clf = make_pipeline(
        StandardScaler(), PCA(n_comp, random_state=seed), LogisticRegression(max_iter=3000, C=0.5)
    )
    cv = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    pred = cross_val_predict(clf, f, s, groups=g, cv=cv)
    uniq, counts = np.unique(s, return_counts=True)
    bal = float(np.mean([(pred[s == u] == u).mean() for u in uniq]))
    return {
        "n": int(len(s)),
        "sources": [str(u) for u in uniq],
        "accuracy": float((pred == s).mean()),
        "chance": float(counts.max() / counts.sum()),
        "balanced_accuracy": bal,
        "balanced_chance": 1.0 / len(uniq),
    }


def _fmt_ci(t: tuple[float, float, float]) -> str:
    return "n/a" if np.isnan(t[0]) else f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def _plot_confusions(results: dict[str, dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8))
    axes = np.atleast_1d(axes)
    for ax, (name, m) in zip(axes, results.items(), strict=True):
        cm = np.array(m["confusion"])
        ax.imshow(cm, cmap="Blues")
        for i in range(3):
            for j in range(3):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="black" if cm[i, j] < cm.max() / 2 else "white",
                )
        ax.set_xticks(range(3), CLASSES)
        ax.set_yticks(range(3), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, n_bins: int = 10) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for name, (probs, y) in curves.items():
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y
        bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            m = bins == b
            if m.sum() >= 3:
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {ece(probs, y):.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability on test")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for c, ax in enumerate(axes):
        for name, (probs, y) in curves.items():
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_title(f"{CLASSES[c]} vs rest")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _per_source_rows(
    name: str, probs: np.ndarray, y: np.ndarray, sources: np.ndarray, thr: dict
) -> list[str]:
    rows = []
    for src in sorted(set(sources)):
        m = sources == src
        pred = probs[m].argmax(axis=1)
        yy = y[m]
        mix = ", ".join(f"{CLASSES[c]} {int((yy == c).sum())}" for c in range(3) if (yy == c).any())
        sens = "; ".join(
            f"{CLASSES[c]} {(pred[yy == c] == c).mean():.2f}" for c in range(3) if (yy == c).any()
        )
        flag = probs[m, 0] >= thr["covid"]
        cov_sens = f"{flag[yy == 0].mean():.2f}" if (yy == 0).any() else "-"
        cov_spec = f"{(~flag[yy != 0]).mean():.2f}" if (yy != 0).any() else "-"
        from sklearn.metrics import f1_score

        f1 = f1_score(yy, pred, labels=sorted(set(yy)), average="macro", zero_division=0)
        rows.append(
            f"| {name} | {src} | {int(m.sum())} | {mix} | {(pred == yy).mean():.3f} | {f1:.3f} | {sens} | "
            f"{cov_sens} | {cov_spec} | {ece(probs[m], yy):.3f} |"
        )
    return rows


def _gradcam_grid(data: Path, records: list, artifact_dir: Path, path: Path, per_source: int = 2) -> None:
    """A grid of Grad-CAM overlays for a few test images of the redistributable sources."""
    import cv2

    from model.explain import gradcam_png
    from model.serve import Predictor

    plt = _plt()
    picks = []
    for src in ("mlwg", "nih", "kermany"):
        for label in CLASSES:
            picks += [r for r in records if r.source == src and r.label == label][:1]
    picks = picks[: 3 * per_source]
    predictor = Predictor(artifact_dir)
    fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 3.0))
    for ax, r in zip(np.atleast_1d(axes), picks, strict=False):
        data_bytes = (Path(data) / r.file).read_bytes()
        res = predictor.predict_bytes([data_bytes])[0]
        png = gradcam_png(artifact_dir, data_bytes)
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        ax.imshow(img)
        p = getattr(res, f"p_{res.label}")
        ax.set_title(f"{r.source}: {r.label} -> {res.label} ({p:.2f})", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate_report(
    data: Path,
    model_dir: Path,
    baseline_dir: Path | None,
    split_path: Path,
    out: Path,
    extra: tuple[tuple[str, Path], ...] = (),
) -> Path:
    """Compute every metric on the test split and write out/evaluation.md with its PNG plots."""
    from model.train import configure_tf

    configure_tf()
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = read_split(split_path)
    y = {k: labels_of(split[k]) for k in ("val", "test")}
    src = {k: np.array([r.source for r in split[k]]) for k in ("val", "test")}
    grp = {k: np.array([r.patient_id for r in split[k]]) for k in ("val", "test")}
    evs = {"ours": Evaluated("ours", model_dir, data, split)}
    for name, path in extra:
        evs[name] = Evaluated(name, path, data, split)
    if baseline_dir is not None and (Path(baseline_dir) / "meta.json").exists():
        evs["tutorial CNN"] = Evaluated("tutorial CNN", baseline_dir, data, split)

    ens: dict[str, dict] = {}
    seeds: dict[str, list[dict]] = {}
    for name, ev in evs.items():
        thr = ev.meta["thresholds"]
        m = summarise(ev.probs["test"], y["test"], thr, grp["test"])
        m["ece_uncalibrated"] = ece(softmax(ev.mean_logits["test"]), y["test"])
        m["val"] = summarise(ev.probs["val"], y["val"], thr)
        ens[name] = m
        seeds[name] = [
            calibrate_and_score(ml["val"], y["val"], ml["test"], y["test"]) for ml in ev.member_logits
        ]

    lines = [
        "# Evaluation on the patient-level test split",
        "",
        f"Generated {dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()} by `cxr model evaluate` "
        f"(split `{Path(split_path).resolve().relative_to(REPO_ROOT) if Path(split_path).resolve().is_relative_to(REPO_ROOT) else split_path}`, "  # noqa: E501
        f"test: {len(y['test'])} images of {len(set(grp['test']))} patients).",
        "",
        "Models: "
        + "; ".join(
            f"**{n}** = `{ev.meta['version']}` ({ev.meta['arch']}, input {ev.meta['input_size']}, "
            f"{ev.meta.get('selection', 'ensemble')}: seeds {ev.meta['seeds']})"
            for n, ev in evs.items()
        )
        + ".",
        "Probabilities are temperature-scaled (T fitted on validation); thresholds chosen on validation "
        "only.",
        "",
        "## Headline (the served artifacts)",
        "",
        "| metric | " + " | ".join(evs) + " |",
        "|---|" + "---|" * len(evs),
    ]
    hl = {n: headline(m) for n, m in ens.items()}
    rows = [
        ("accuracy (95% CI)", lambda m, h: _fmt_ci(m["accuracy"])),
        (
            "macro-F1 (patient bootstrap 95% CI)",
            lambda m, h: f"{m['macro_f1']:.3f} ({m['macro_f1_ci'][0]:.3f}-{m['macro_f1_ci'][1]:.3f})",
        ),
        ("macro AUROC (one-vs-rest)", lambda m, h: f"{m['auroc']['macro']:.3f}"),
        *[(f"AUROC {c} vs rest", lambda m, h, c=c: f"{m['auroc'][c]:.3f}") for c in CLASSES],
        (
            "COVID-19 threshold (from validation)",
            lambda m, h: f"{m['covid_operating_point']['threshold']:.3f}",
        ),
        ("COVID-19 sensitivity at it", lambda m, h: _fmt_ci(m["covid_operating_point"]["sensitivity"])),
        ("COVID-19 specificity at it", lambda m, h: _fmt_ci(m["covid_operating_point"]["specificity"])),
        ("ECE after temperature scaling", lambda m, h: f"{m['ece']:.3f}"),
        ("ECE before (T = 1)", lambda m, h: f"{m['ece_uncalibrated']:.3f}"),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(ens[n], hl[n]) for n in evs) + " |")
    lines += [
        "",
        "## Per class (served artifacts, arg-max label; Wilson 95% CIs)",
        "",
        "| model | class | sensitivity | specificity | PPV |",
        "|---|---|---|---|---|",
    ]
    for n, m in ens.items():
        for c in CLASSES:
            pc = m["per_class"][c]
            lines.append(
                f"| {n} | {c} | {_fmt_ci(pc['sensitivity'])} | {_fmt_ci(pc['specificity'])} | "
                f"{_fmt_ci(pc['ppv'])} |"
            )
    lines += [
        "",
        "## Spread over training seeds (each member alone, its own T and thresholds from validation)",
        "",
        "| model | seed | accuracy | macro-F1 | macro AUROC | COVID sens | COVID spec | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, ev in evs.items():
        for s, r in zip(ev.meta["seeds"], seeds[n], strict=True):
            h = headline(r)
            lines.append(
                f"| {n} | {s} | {h['accuracy']:.3f} | {h['macro_f1']:.3f} | {h['auroc_macro']:.3f} | "
                f"{h['covid_sensitivity']:.3f} | {h['covid_specificity']:.3f} | {h['ece']:.3f} |"
            )
        f1s = [r["macro_f1"] for r in seeds[n]]
        accs = [r["accuracy"][0] for r in seeds[n]]
        lines.append(
            f"| {n} | mean ± sd | {np.mean(accs):.3f} ± {np.std(accs):.3f} | "
            f"{np.mean(f1s):.3f} ± {np.std(f1s):.3f} | | | | |"
        )
        lines.append(
            f"| {n} | **served** | {hl[n]['accuracy']:.3f} | {hl[n]['macro_f1']:.3f} | "
            f"{hl[n]['auroc_macro']:.3f} | {hl[n]['covid_sensitivity']:.3f} | "
            f"{hl[n]['covid_specificity']:.3f} | {hl[n]['ece']:.3f} |"
        )

    _plot_confusions(ens, out / "confusion.png")
    curves = {n: (evs[n].probs["test"], y["test"]) for n in evs}
    curves.update({f"{n}, T=1": (softmax(evs[n].mean_logits["test"]), y["test"]) for n in evs})
    _plot_reliability(curves, out / "reliability.png")
    _plot_roc({n: (evs[n].probs["test"], y["test"]) for n in evs}, out / "roc.png")
    lines += [
        "",
        "## Confusion matrices, ROC curves, reliability",
        "",
        "![confusion](confusion.png)",
        "",
        "![roc](roc.png)",
        "",
        "![reliability](reliability.png)",
    ]

    lines += [
        "",
        "## Triage bands (ours; thresholds " + str(evs["ours"].meta["thresholds"]) + ")",
        "",
        "Error = share of the band whose true class is not the band's class.",
        "",
        "| split | band | n | coverage | error (95% CI) | true covid / normal / pneumonia |",
        "|---|---|---|---|---|---|",
    ]
    for split_name, m in (("validation", ens["ours"]["val"]), ("test", ens["ours"])):
        for b in BANDS:
            r = m["triage"][b]
            err = _fmt_ci(r["error"]) if "error" in r else "-"
            t = r["truth"]
            lines.append(
                f"| {split_name} | {b} | {r['n']} | {r['coverage']:.3f} | {err} | "
                f"{t['covid']} / {t['normal']} / {t['pneumonia']} |"
            )

    lines += [
        "",
        "## By data source (test)",
        "",
        "Sensitivity per class present; COVID sens/spec at the validation threshold; macro-F1 over the "
        "classes "
        "present in that source. AUROC is undefined for single-class sources.",
        "",
        "| model | source | n | classes | accuracy | macro-F1 | sensitivity | COVID sens | COVID spec "
        "| ECE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, ev in evs.items():
        lines += _per_source_rows(n, ev.probs["test"], y["test"], src["test"], ev.meta["thresholds"])

    # source probe on images the networks never trained on (validation + test)
    allsrc = np.concatenate([src["val"], src["test"]])
    allgrp = np.concatenate([grp["val"], grp["test"]])
    ally = np.concatenate([y["val"], y["test"]])
    lines += [
        "",
        "## Source probe (shortcut check)",
        "",
        "Logistic regression (standardise, PCA, 5-fold CV grouped by patient) predicting the source "
        "collection "
        "from the network's penultimate features (ours: pooled features of every member, concatenated; "
        "tutorial: the Flatten layer), on the validation + test images. 'Pixels' is the same probe on the "
        "32x32 preprocessed image, as a reference. Accuracy far above chance *within one class* means the "
        "features encode the collection, not only the disease.",
        "",
        "| features | subset | n | sources | accuracy | chance (majority) | balanced acc. "
        "| balanced chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    feature_sets = {n: np.concatenate([ev.features["val"], ev.features["test"]]) for n, ev in evs.items()}
    ev0 = evs["ours"]
    feature_sets["pixels 32x32"] = np.concatenate([ev0.x_small["val"], ev0.x_small["test"]]).reshape(
        len(ally), -1
    )
    subsets = {"all classes": np.ones(len(ally), bool)}
    subsets.update({f"{c} only": ally == i for i, c in enumerate(CLASSES)})
    probes = {}
    for fname, feats in feature_sets.items():
        for sname, m in subsets.items():
            if len(set(allsrc[m])) < 2:
                continue
            r = source_probe(feats[m], allsrc[m], allgrp[m])
            probes[(fname, sname)] = r
            lines.append(
                f"| {fname} | {sname} | {r['n']} | {', '.join(r['sources'])} | {r['accuracy']:.3f} | "
                f"{r['chance']:.3f} | {r['balanced_accuracy']:.3f} | {r['balanced_chance']:.3f} |"
            )

    _gradcam_grid(data, split["test"], Path(model_dir), out / "gradcam.png")
    lines += [
        "",
        "## Grad-CAM (ours)",
        "",
        "Test images from the redistributable sources only (mlwg, nih, kermany); title: true label -> "
        "predicted label (probability). Red = regions that raised the predicted class.",
        "",
        "![gradcam](gradcam.png)",
    ]

    lines += ["", "## Training curves", ""]
    done = set()
    for n, ev in evs.items():
        for s in ev.meta.get("seeds_trained", ev.meta["seeds"]):
            src_png = REPO_ROOT / "runs" / "train" / f"{ev.meta['arch']}_seed{s}" / "curves.png"
            dst = out / f"curves_{ev.meta['arch']}_seed{s}.png"
            if src_png.exists() and dst.name not in done:
                done.add(dst.name)
                shutil.copyfile(src_png, dst)
                lines.append(f"![{n} seed {s}]({dst.name})")
    report = out / "evaluation.md"
    report.write_text("\n".join(lines) + "\n")
    import json

    summary = {n: {"test": hl[n], "seeds": [headline(r) for r in seeds[n]]} for n in evs}
    summary["probes"] = {f"{k[0]} | {k[1]}": v for k, v in probes.items()}
    (out / "evaluation.json").write_text(json.dumps(summary, indent=1))
    return report
