"""`cxr predict` on bad files: one readable line each on stderr, no decoder chatter, no finding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from tests.conftest import REPO_ROOT, SHARED_DATA


def _corrupt_jpeg(path: Path) -> None:
    img = (np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)
    data = bytearray(cv2.imencode(".jpg", img)[1].tobytes())
    data[600:5600] = np.random.default_rng(1).bytes(5000)
    path.write_bytes(bytes(data))


def test_bad_files_get_one_line_each_and_no_finding(tmp_path: Path) -> None:
    _corrupt_jpeg(tmp_path / "bad.jpg")
    corrupt_dicom = SHARED_DATA / "dicom" / "pydicom966_dx_chest_mono1_12bit_j2k_lossless_badCOM.dcm"
    if corrupt_dicom.exists():
        (tmp_path / "bad.dcm").write_bytes(corrupt_dicom.read_bytes())
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "cxr"), "predict", str(tmp_path), "--format", "csv"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = proc.stdout.strip().splitlines()[1:]
    assert rows and all(r.split(",")[1] == "error" for r in rows), proc.stdout
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith(str(tmp_path))]
    assert len(ours) == len(rows)
    assert "Not assessable" in next(ln for ln in ours if "bad.jpg" in ln)
    assert "Traceback" not in proc.stderr and "Corrupt JPEG data" not in proc.stderr, proc.stderr
