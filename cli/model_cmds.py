"""`cxr model ...` (split, train, evaluate, gradcam, info) and `cxr predict`: thin wiring to model/."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import click

from model import DEFAULT_SPLIT, REPO_ROOT

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cxr"
PREDICT_CHUNK = 32


@click.group("model")
def model_group() -> None:
    """Train, evaluate and inspect the chest X-ray CNN."""


@model_group.command("split")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_DATA)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_SPLIT, show_default=True
)
@click.option("--seed", type=int, default=20260401, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing split file.")
def split_command(data: Path, out: Path, seed: int, force: bool) -> None:
    """Make the patient-level train/val/test split (stratified by class and source) and save it."""
    from collections import Counter

    from model.data import make_split, read_dataset, read_split, write_split

    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; every command uses it. Pass --force to overwrite.")
    records = read_dataset(data)
    write_split(records, make_split(records, seed), out)
    for name, recs in read_split(out).items():
        counts = Counter(r.label for r in recs)
        click.echo(
            f"{name}: {len(recs)} images, {len({r.patient_id for r in recs})} patients, {dict(counts)}"
        )


@model_group.command("train")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_DATA)
@click.option(
    "--arch", default=None, help="Network (model/network.py ARCHS) [default: the shipped recipe's]."
)
@click.option("--epochs", type=int, default=None, help="[default: the shipped recipe's]")
@click.option("--seed", type=int, default=None)
@click.option("--label-smoothing", type=float, default=None)
@click.option("--members", default=None, help="Fold networks to serve, e.g. 0,1,2 [default: FLOP budget].")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / "model" / "artifacts" / "default",
    show_default=True,
)
@click.option("--split", "split_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_SPLIT)
@click.option(
    "--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=REPO_ROOT / "runs" / "develop"
)
@click.option(
    "--reuse-cv",
    default=None,
    help="Adopt the fold networks of `python -m model.cv --name NAME` if it trained this very recipe.",
)
def train_command(
    data: Path,
    arch: str | None,
    epochs: int | None,
    seed: int | None,
    label_smoothing: float | None,
    members: str | None,
    out: Path,
    split_path: Path,
    runs_dir: Path,
    reuse_cv: str | None,
) -> None:
    """Cross-validate a recipe on train+val, calibrate on out-of-fold predictions, write the artifact."""
    from dataclasses import asdict, replace

    from model.pipeline import SHIPPED_RECIPE, develop

    chosen = {"arch": arch, "epochs": epochs, "seed": seed, "label_smoothing": label_smoothing}
    if members:
        chosen["members"] = tuple(int(m) for m in members.split(","))
    recipe = replace(SHIPPED_RECIPE, **{k: v for k, v in chosen.items() if v is not None})
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in chosen.items() if v is not None and k != "members"
    )
    # the data path as seen from the project root, so the recorded command works on another machine
    shown = os.path.relpath(Path(data).resolve(), REPO_ROOT)
    cmd = f"cxr model train --data {shown} {flags}".strip()
    meta = develop(
        data,
        out,
        recipe=recipe,
        split_path=split_path,
        runs_dir=runs_dir,
        command=cmd,
        reuse_cv=REPO_ROOT / "runs" / "cv" / reuse_cv if reuse_cv else None,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(
        json.dumps(
            {
                "version": meta["version"],
                "out": str(out),
                "recipe": asdict(recipe),
                "metrics": meta["metrics"],
            },
            indent=1,
        )
    )


@model_group.command("evaluate")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_DATA)
@click.option(
    "--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None
)
@click.option(
    "--split",
    "split_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_SPLIT,
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / "docs" / "model",
    show_default=True,
)
@click.option(
    "--candidates", default=None, help="Comma-separated runs/cv names for the OOF table [default: all]."
)
@click.option(
    "--read-test/--no-read-test",
    default=False,
    show_default=True,
    help="Read the test split (once per shipped model: every read is logged in docs/model/test_reads.jsonl).",
)
def evaluate_command(
    data: Path, model_dir: Path | None, split_path: Path, out: Path, candidates: str | None, read_test: bool
) -> None:
    """Write the evaluation report: out-of-fold tables, and with --read-test the single test-split read."""
    from model.evaluate import evaluate_report
    from model.serve import DEFAULT_ARTIFACT_DIR

    report = evaluate_report(
        data,
        model_dir or DEFAULT_ARTIFACT_DIR,
        split_path,
        out,
        candidates=candidates.split(",") if candidates else None,
        read_test=read_test,
    )
    click.echo(f"wrote {report}")


@model_group.command("gradcam")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output PNG.")
def gradcam_command(image: Path, model_dir: Path | None, out: Path) -> None:
    """Write a Grad-CAM overlay PNG for one image."""
    from model.explain import gradcam_png

    out.write_bytes(gradcam_png(model_dir, image.read_bytes()))
    click.echo(f"wrote {out}")


@model_group.command("info")
@click.option(
    "--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None
)
def info_command(model_dir: Path | None) -> None:
    """Print the artifact's version, hash, thresholds and metrics."""
    from model.serve import load_predictor

    p = load_predictor(model_dir)
    click.echo(
        json.dumps(
            {
                "version": p.version,
                "artifact_dir": str(p.artifact_dir),
                "sha256": p.artifact_sha256,
                "classes": p.classes,
                "thresholds": p.thresholds,
                "metrics": p.metrics,
            },
            indent=1,
        )
    )


def _collect(paths: tuple[Path, ...]) -> list[Path]:
    """Files named explicitly, plus every image file (by magic bytes) found recursively in named folders."""
    from model.preprocess import sniff_format

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    with open(f, "rb") as fh:
                        if sniff_format(fh.read(132)) is not None:
                            out.append(f)
        else:
            out.append(p)
    return out


@click.command("predict")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Artifact directory [default: the committed model/artifacts/default].",
)
def predict_command(paths: tuple[Path, ...], fmt: str, model_dir: Path | None) -> None:
    """Screen image files or folders (recursive) with the serving model; one row per image on stdout.

    Unreadable files, and images the validity gate refuses (not a chest X-ray, corrupt data), get label
    "error", empty probabilities and their reason on stderr (one line each); the exit status is 1 only when no
    file at all could be read.
    """
    from intake.validity import refusals
    from model.preprocess import ImageDecodeError
    from model.serve import load_predictor

    files = _collect(paths)
    if not files:
        raise click.ClickException("no PNG, JPEG or DICOM files found")
    predictor = load_predictor(model_dir)
    rows: list[dict] = []
    for i in range(0, len(files), PREDICT_CHUNK):
        chunk = files[i : i + PREDICT_CHUNK]
        datas = []
        for f in chunk:
            try:
                datas.append(f.read_bytes())
            except OSError as exc:
                datas.append(b"")
                click.echo(f"{f}: {exc}", err=True)
        # the same validity gate as the worker: what is not a chest X-ray gets no finding
        refused = refusals(dict(enumerate(datas)))
        kept = [i for i in range(len(datas)) if i not in refused]
        results: dict[int, object] = {i: ImageDecodeError(reason) for i, reason in refused.items()}
        results.update(zip(kept, predictor.predict_bytes([datas[i] for i in kept]), strict=True))
        for i, f in enumerate(chunk):
            res = results[i]
            if isinstance(res, ImageDecodeError):
                click.echo(f"{f}: {res}", err=True)
                rows.append(
                    {
                        "path": str(f),
                        "label": "error",
                        "p_covid": None,
                        "p_normal": None,
                        "p_pneumonia": None,
                        "triage": "",
                        "error": str(res),
                    }
                )
            else:
                rows.append({"path": str(f), **res.as_dict()})
    if fmt == "json":
        click.echo(json.dumps({"model_version": predictor.version, "results": rows}, indent=1))
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path", "label", "p_covid", "p_normal", "p_pneumonia", "triage"])
        for r in rows:
            probs = ["" if r[k] is None else f"{r[k]:.6f}" for k in ("p_covid", "p_normal", "p_pneumonia")]
            w.writerow([r["path"], r["label"], *probs, r["triage"]])
        sys.stdout.flush()
    if all(r["label"] == "error" for r in rows):
        sys.exit(1)
