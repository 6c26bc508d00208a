"""Same pixels, same answer: each DICOM fixture decodes and scores like an 8-bit PNG made by other tools.

The PNG export is made without our code: GDCM's `gdcmconv --raw` decompresses (dcmtk cannot read JPEG 2000),
dcmtk's `dcmj2pnm` renders it (modality LUT, the file's first VOI window, or min-max without one, MONOCHROME1
shown inverted) to 8 bits. Measured with the committed model (docs/dicom.md): at most 1 grey level apart per
pixel (mean 0.03-0.52), probabilities at most 0.0061 apart.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from intake.formats import decode_image
from tests.intake.dicom_helpers import fixture_paths, require_tool

PIXEL_TOLERANCE = 1.0 / 255.0  # one 8-bit grey level, per pixel
MEAN_PIXEL_TOLERANCE = 1.0 / 255.0
PROBABILITY_TOLERANCE = 0.02  # per class; measured at most 0.0061


def export_png(dicom: Path, out_dir: Path) -> Path:
    """An 8-bit PNG of the DICOM made by GDCM and dcmtk only (no code of ours, no pydicom)."""
    raw = out_dir / (dicom.stem + ".raw.dcm")
    subprocess.run(["gdcmconv", "--raw", str(dicom), str(raw)], check=True, capture_output=True, timeout=120)
    header = subprocess.run(
        ["dcmdump", "+P", "0028,1050", str(raw)], capture_output=True, text=True, timeout=60
    ).stdout
    window = ["+Wi", "1"] if "(0028,1050)" in header else ["+Wm"]
    png = out_dir / (dicom.stem + ".png")
    subprocess.run(
        ["dcmj2pnm", "--write-png", *window, str(raw), str(png)], check=True, capture_output=True, timeout=120
    )
    return png


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """(DICOM, PNG export) for each readable fixture."""
    require_tool("gdcmconv", "dcmj2pnm", "dcmdump")
    out = tmp_path_factory.mktemp("png")
    return [(p, export_png(p, out)) for p in fixture_paths(readable_only=True)]


def test_pixels_agree_with_the_dcmtk_export(exports: list[tuple[Path, Path]]) -> None:
    assert len(exports) == 6
    for dicom, png in exports:
        ours, theirs = decode_image(dicom.read_bytes()), decode_image(png.read_bytes())
        assert ours.shape == theirs.shape, dicom.name
        diff = np.abs(ours.astype(np.float64) - theirs)
        assert diff.max() <= PIXEL_TOLERANCE + 1e-6, f"{dicom.name}: {diff.max() * 255:.1f} grey levels"
        assert diff.mean() <= MEAN_PIXEL_TOLERANCE, f"{dicom.name}: mean {diff.mean() * 255:.2f} levels"
        # Bone bright in both: the mediastinum (centre) is brighter than the film's darkest tenth.
        assert np.median(ours[ours.shape[0] // 3 : -ours.shape[0] // 3]) > np.quantile(ours, 0.1)


def test_predictions_agree_with_the_dcmtk_export(exports: list[tuple[Path, Path]]) -> None:
    from model.serve import load_predictor

    predictor = load_predictor(None)
    for dicom, png in exports:
        from_dicom, from_png = predictor.predict_bytes([dicom.read_bytes(), png.read_bytes()])
        a = np.array([from_dicom.p_covid, from_dicom.p_normal, from_dicom.p_pneumonia])
        b = np.array([from_png.p_covid, from_png.p_normal, from_png.p_pneumonia])
        assert np.abs(a - b).max() <= PROBABILITY_TOLERANCE, f"{dicom.name}: {a} vs {b}"
        assert abs(a.sum() - 1.0) < 1e-3
