"""The evaluation report: out-of-fold results (every choice) and the single read of the test split.

`cxr model evaluate` writes docs/model/evaluation.md + PNGs. Everything above the "test split" heading comes
from the shipped artifact's out-of-fold predictions (oof.csv) and the cross-validated candidates in runs/cv;
the test split is read once per shipped model, through the serving path, and the read is appended to
docs/model/test_reads.jsonl (artifact version and sha256, time, command). Nothing here changes a model.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

from model import CLASSES, REPO_ROOT
from model.calibrate import BANDS, decide_all, softmax
from model.data import labels_of, load_arrays, read_split
from model.metrics import ece, summarise

TEST_READS = REPO_ROOT / "docs" / "model" / "test_reads.jsonl"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Evaluated:
    """Probabilities (serving path) and pooled features of one artifact on the test split."""

    def __init__(self, name: str, artifact_dir: Path, data: Path, records: list) -> None:
        import keras

        from model.artifact import load_keras, read_meta
        from model.network import FEATURE_LAYER
        from model.serve import Predictor
        from model.train import to_model_input

        self.name, self.dir = name, Path(artifact_dir)
        self.meta = read_meta(self.dir)
        size, arch = int(self.meta["input_size"]), self.meta["arch"]
        x = load_arrays(data, records, size)
        self.x_small = load_arrays(data, records, 32)
        predictor = Predictor(self.dir)  # the serving path, exactly as the worker runs it
        self.probs = np.concatenate([predictor.predict_arrays(x[i : i + 64]) for i in range(0, len(x), 64)])
        ens = load_keras(self.dir)
        members = [layer for layer in ens.layers if isinstance(layer, keras.Model)]
        feats = []
        for m in members:
            fm = keras.Model(m.inputs, m.get_layer(FEATURE_LAYER).output)
            f = fm.predict(to_model_input(x, arch), batch_size=32, verbose=0)
            feats.append(f.reshape(len(f), -1))
        self.features = np.concatenate(feats, axis=1)


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
    ax.set_title("Reliability")
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


def _fmt(v: float) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.3f}"


def oof_tables(artifact_dir: Path, candidates: list[str], out: Path) -> list[str]:
    """Markdown: the cross-validated candidates (mean ± sd over folds) and the shipped model's OOF detail."""
    from model.cv import read_oof, summarise_oof

    lines = [
        "## Candidates (5-fold cross-validation over train+val, grouped by patient)",
        "",
        "Mean ± sd over folds of each fold network on its held-out fold (arg-max class, threshold-free).",
        "",
        "| candidate | arch | epochs | label smoothing | lung crop | folds done | accuracy | macro-F1 "
        "| COVID AUROC | COVID sens @ 90% spec | COVID sens @ 95% spec | pooled ECE after T |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in candidates:
        path = REPO_ROOT / "runs" / "cv" / name / "summary.json"
        if not path.exists():
            continue
        sm = json.loads(path.read_text())
        m, sd, c = sm["mean"], sm["sd"], sm["config"]
        cells = [
            f"{m[k]:.3f} ± {sd[k]:.3f}"
            for k in ("accuracy", "macro_f1", "auroc_covid", "covid_sens_at_spec90", "covid_sens_at_spec95")
        ]
        lines.append(
            f"| {name} | {c['arch']} | {c['epochs']} | {c.get('label_smoothing', 0)} | "
            f"{'yes' if c.get('lung_crop') else 'no'} | {len(sm['folds_done'])} of 5 | "
            + " | ".join(cells)
            + f" | {sm['pooled']['ece_calibrated']:.3f} |"
        )
    lines += _probe_and_loco_tables(candidates)
    meta = json.loads((Path(artifact_dir) / "meta.json").read_text())
    oof = read_oof(Path(artifact_dir) / "oof.csv")
    rep = summarise_oof(
        oof["logits"],
        oof["y"],
        oof["folds"],
        oof["sources"],
        thresholds=meta["thresholds"],
        groups=oof["patients"],
        temperature=meta["temperature"],
    )
    probs = softmax(oof["logits"] / meta["temperature"])
    _plot_reliability({"out-of-fold": (probs, oof["y"])}, Path(out) / "reliability_oof.png")
    lines += [
        "",
        f"## The shipped model's out-of-fold predictions ({len(oof['y'])} images of train+val)",
        "",
        f"Temperature {meta['temperature']:.3f} and thresholds {meta['thresholds']} were fitted on these "
        "predictions.",
        "",
        "| band | share of studies | precision | recall of its class | true covid / normal / pneumonia |",
        "|---|---|---|---|---|",
    ]
    for b in BANDS:
        r = rep["bands"][b]
        t = r["truth"]
        extra = f" (bootstrap 95% lower bound {r['precision_lcb']:.3f})" if "precision_lcb" in r else ""
        lines.append(
            f"| {b} | {r['share']:.3f} | {_fmt(r.get('precision', float('nan')))}{extra} | "
            f"{_fmt(r.get('recall', float('nan')))} | {t['covid']} / {t['normal']} / {t['pneumonia']} |"
        )
    lines += [
        "",
        f"Non-COVID studies banded 'COVID-19 suspected': {rep['bands'][BANDS[0]]['non_covid_flagged']:.3f}. "
        f"Reported findings (band-consistent): accuracy {rep['decided']['accuracy']:.3f}, macro-F1 "
        f"{rep['decided']['macro_f1']:.3f}.",
        "",
        "| source | n | truth | OOF accuracy | predicted covid / normal / pneumonia |",
        "|---|---|---|---|---|",
    ]
    for src, r in rep["per_source"].items():
        truth = ", ".join(f"{k} {v}" for k, v in r["truth"].items() if v)
        pr = r["predicted"]
        lines.append(
            f"| {src} | {r['n']} | {truth} | {r['accuracy']:.3f} | {pr['covid']} / {pr['normal']} / "
            f"{pr['pneumonia']} |"
        )
    return lines


def _probe_and_loco_tables(candidates: list[str]) -> list[str]:
    """Markdown: the source probe on each candidate's OOF features, and leave-one-collection-out results."""
    lines: list[str] = []
    probes = {n: REPO_ROOT / "runs" / "cv" / n / "probe.json" for n in candidates}
    probes = {n: json.loads(p.read_text()) for n, p in probes.items() if p.exists()}
    if probes:
        lines += [
            "",
            "## Source probe on out-of-fold features (`python -m model.cv --name NAME --probe`)",
            "",
            "Logistic regression predicting the collection from each fold network's pooled features on its "
            "held-out fold. Balanced accuracy far above chance within one class = the features encode the "
            "collection.",
            "",
            "| candidate | subset | n | balanced accuracy | balanced chance |",
            "|---|---|---|---|---|",
        ]
        for n, res in probes.items():
            for sub, r in res.items():
                lines.append(
                    f"| {n} | {sub} | {r['n']} | {r['balanced_accuracy']:.3f} | {r['balanced_chance']:.3f} |"
                )
    for path in sorted((REPO_ROOT / "runs" / "loco").glob("*/loco.json")):
        res = json.loads(path.read_text())
        lines += [
            "",
            f"## Leave one collection out: {res['name']} (`python -m model.cv --name {res['name']} --loco`)",
            "",
            "Trained on train+val without the collection, scored on all of its train+val images.",
            "",
            "| left out | n | truth | accuracy | recall per class | macro-F1 (its classes) | predicted c/n/p "
            "|",
            "|---|---|---|---|---|---|---|",
        ]
        for c, r in res["results"].items():
            truth = ", ".join(f"{k} {v}" for k, v in r["truth"].items())
            rec = ", ".join(f"{k} {v:.2f}" for k, v in r["recall"].items())
            pr = r["predicted"]
            lines.append(
                f"| {c} | {r['n']} | {truth} | {r['accuracy']:.3f} | {rec} | {r['macro_f1_present']:.3f} | "
                f"{pr['covid']}/{pr['normal']}/{pr['pneumonia']} |"
            )
    return lines


def log_test_read(meta: dict, sha: str, headline: dict, path: Path = TEST_READS) -> None:
    """Append one line per read of the test split: which artifact, when, by what command, what it scored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "time": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "version": meta["version"],
        "artifact_sha256": sha,
        "command": " ".join(sys.argv),
        "test": headline,
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def evaluate_report(
    data: Path,
    model_dir: Path,
    split_path: Path,
    out: Path,
    *,
    candidates: list[str] | None = None,
    read_test: bool = True,
) -> Path:
    """Write out/evaluation.md: OOF tables, then (once per shipped model) the test split through serving."""
    from model.artifact import artifact_sha256
    from model.cv import sens_at_spec
    from model.train import configure_tf

    configure_tf()
    data, out, model_dir = Path(data), Path(out), Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    cands = (
        candidates
        if candidates is not None
        else sorted(p.parent.name for p in (REPO_ROOT / "runs" / "cv").glob("*/summary.json"))
    )
    lines = [
        "# Evaluation: out-of-fold predictions" + (", then one read of the test split" if read_test else ""),
        "",
        f"Generated {dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()} by `cxr model evaluate`.",
        "",
        *oof_tables(model_dir, cands, out),
        "",
        "![reliability (out-of-fold)](reliability_oof.png)",
    ]
    if not read_test:
        # without a test read the report has its own name, so the logged test read is never overwritten
        report = out / "oof_report.md"
        report.write_text("\n".join(lines) + "\n")
        return report
    split = read_split(split_path)
    test = split["test"]
    y = labels_of(test)
    src = np.array([r.source for r in test])
    grp = np.array([r.patient_id for r in test])
    ev = Evaluated("ours", model_dir, data, test)
    thr = ev.meta["thresholds"]
    m = summarise(ev.probs, y, thr, grp)
    decided, bands = decide_all(ev.probs, thr)
    from model.metrics import macro_f1

    head = {
        "n": int(len(y)),
        "accuracy": round(m["accuracy"][0], 4),
        "macro_f1": round(m["macro_f1"], 4),
        "macro_f1_ci": [round(v, 4) for v in m["macro_f1_ci"]],
        "decided_macro_f1": round(macro_f1(y, decided), 4),
        "auroc_covid": round(m["auroc"]["covid"], 4),
        "covid_sens_at_spec95": round(sens_at_spec(ev.probs[:, 0], y == 0, 0.95), 4),
        "covid_sens_at_threshold": round(m["covid_operating_point"]["sensitivity"][0], 4),
        "covid_spec_at_threshold": round(m["covid_operating_point"]["specificity"][0], 4),
        "ece": round(m["ece"], 4),
        "band_shares": {b: round(float(np.mean(np.array(bands) == b)), 4) for b in BANDS},
    }
    log_test_read(ev.meta, artifact_sha256(model_dir), head)
    lines += [
        "",
        f"## The test split, read once ({len(y)} images of {len(set(grp))} patients)",
        "",
        f"Model `{ev.meta['version']}`; this read is logged in `docs/model/test_reads.jsonl`. Nothing below "
        "was used to choose anything.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy (arg-max) | {head['accuracy']:.3f} |",
        f"| macro-F1 (arg-max, patient bootstrap 95% CI) | {head['macro_f1']:.3f} "
        f"({head['macro_f1_ci'][0]:.3f}-{head['macro_f1_ci'][1]:.3f}) |",
        f"| macro-F1 of the reported findings (band-consistent) | {head['decided_macro_f1']:.3f} |",
        f"| COVID-19 AUROC | {head['auroc_covid']:.3f} |",
        f"| COVID-19 sensitivity at 95% specificity | {head['covid_sens_at_spec95']:.3f} |",
        "| COVID-19 sensitivity / specificity at the OOF threshold | "
        f"{head['covid_sens_at_threshold']:.3f} / {head['covid_spec_at_threshold']:.3f} |",
        f"| ECE | {head['ece']:.3f} |",
        *[f"| share banded '{b}' | {v:.3f} |" for b, v in head["band_shares"].items()],
        "",
        "| model | source | n | classes | accuracy | macro-F1 | sensitivity | COVID sens | COVID spec "
        "| ECE |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *_per_source_rows("ours", ev.probs, y, src, thr),
    ]
    _plot_confusions({"test": m}, out / "confusion.png")
    _plot_reliability({"test": (ev.probs, y)}, out / "reliability.png")
    _plot_roc({"test": (ev.probs, y)}, out / "roc.png")
    lines += ["", "![confusion](confusion.png)", "", "![roc](roc.png)", "", "![reliability](reliability.png)"]
    lines += [
        "",
        "## Source probe on the test images (shortcut check)",
        "",
        "Logistic regression (standardise, PCA, 5-fold CV grouped by patient) predicting the source "
        "collection from the network's pooled features (every member, concatenated), and from the 32x32 "
        "image as a reference. Accuracy far above chance *within one class* means the features encode "
        "the collection.",
        "",
        "| features | subset | n | sources | accuracy | chance (majority) | balanced acc. "
        "| balanced chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    probes = {}
    for fname, feats in (("ours", ev.features), ("pixels 32x32", ev.x_small.reshape(len(y), -1))):
        subsets = {"all classes": np.ones(len(y), bool)}
        subsets.update({f"{c} only": y == i for i, c in enumerate(CLASSES)})
        for sname, sel in subsets.items():
            if len(set(src[sel])) < 2:
                continue
            r = source_probe(feats[sel], src[sel], grp[sel])
            probes[f"{fname} | {sname}"] = r
            lines.append(
                f"| {fname} | {sname} | {r['n']} | {', '.join(r['sources'])} | {r['accuracy']:.3f} | "
                f"{r['chance']:.3f} | {r['balanced_accuracy']:.3f} | {r['balanced_chance']:.3f} |"
            )
    _gradcam_grid(data, test, model_dir, out / "gradcam.png")
    lines += ["", "## Grad-CAM (test images of the redistributable sources)", "", "![gradcam](gradcam.png)"]
    report = out / "evaluation.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "evaluation.json").write_text(json.dumps({"test": head, "probes": probes}, indent=1))
    return report
