"""The committed default model: self-describing, compiled == Keras, `cxr predict` on the samples."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from model.artifact import read_meta
from model.preprocess import PREPROCESS_VERSION, prepare
from model.serve import DEFAULT_ARTIFACT_DIR, load_predictor

HEADER = ["path", "label", "p_covid", "p_normal", "p_pneumonia", "triage"]
BANDS = {"COVID-19 suspected", "pneumonia suspected", "likely normal", "refer to a radiologist"}


def test_default_artifact_is_self_describing() -> None:
    meta = read_meta(DEFAULT_ARTIFACT_DIR)
    for key in (
        "version",
        "preprocess_version",
        "input_size",
        "classes",
        "temperature",
        "thresholds",
        "data",
        "metrics",
        "recipe",
        "reproduce",
        "band_legend",
    ):
        assert key in meta, key
    # chosen on out-of-fold predictions; the artifact carries them for the promotion gate
    assert {"macro_f1_mean", "macro_f1_sd", "bands"} <= set(meta["metrics"]["oof"])
    assert (DEFAULT_ARTIFACT_DIR / "oof.csv").read_text().startswith("file,patient_id,source,label,fold,")
    assert set(meta["band_legend"]) == BANDS
    assert meta["preprocess_version"] == PREPROCESS_VERSION
    assert meta["classes"] == ["covid", "normal", "pneumonia"]
    assert len(meta["data"]["split_sha256"]) == 64 and len(meta["data"]["dataset_sha256"]) == 64
    assert "not a medical device" in (DEFAULT_ARTIFACT_DIR / "card.md").read_text()
    size = sum(p.stat().st_size for p in DEFAULT_ARTIFACT_DIR.iterdir())
    assert size < 25_000_000, f"default artifact is {size / 1e6:.1f} MB"


def test_default_compiled_matches_keras(sample_files: list[Path]) -> None:
    from model.artifact import load_keras
    from model.train import configure_tf

    configure_tf(2)
    p = load_predictor()
    x = np.stack([prepare(f.read_bytes(), p.input_size) for f in sample_files])
    np.testing.assert_allclose(
        p.predict_arrays(x), load_keras(DEFAULT_ARTIFACT_DIR).predict(x, verbose=0), atol=1e-4, rtol=0
    )
    assert p.version == read_meta(DEFAULT_ARTIFACT_DIR)["version"]


def test_cxr_predict_csv_on_samples(sample_files: list[Path]) -> None:
    from cli.model_cmds import predict_command

    samples = sample_files[0].parent
    res = CliRunner().invoke(predict_command, [str(samples), "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0] == HEADER
    assert len(rows) == 7  # six images; ATTRIBUTION.md is not an image
    for r in rows[1:]:
        assert r[1] in ("covid", "normal", "pneumonia")
        probs = [float(v) for v in r[2:5]]
        assert abs(sum(probs) - 1) < 1e-4
        assert r[5] in BANDS


def test_cxr_predict_json_and_unreadable_files(tmp_path: Path, sample_files: list[Path]) -> None:
    from cli.model_cmds import predict_command

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    res = CliRunner().invoke(predict_command, [str(sample_files[0]), str(bad), "--format", "json"])
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert out["model_version"] == read_meta(DEFAULT_ARTIFACT_DIR)["version"]
    assert [r["label"] for r in out["results"]][1] == "error"
    assert "broken.png" in res.stderr
    only_bad = CliRunner().invoke(predict_command, [str(bad)])
    assert only_bad.exit_code == 1
    assert only_bad.stdout.splitlines()[1].split(",")[1] == "error"


@pytest.mark.parametrize("cmd", ["split", "train", "evaluate", "gradcam", "info"])
def test_model_group_has_commands(cmd: str) -> None:
    from cli.model_cmds import model_group

    assert cmd in model_group.commands
    assert CliRunner().invoke(model_group, [cmd, "--help"]).exit_code == 0
