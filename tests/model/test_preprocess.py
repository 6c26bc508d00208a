"""Decoding and preprocessing: formats, DICOM rendering rules, pixel cap, determinism (no TensorFlow)."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from intake.formats import (
    ImageDecodeError,
    decode_image,
    dicom_patient_id,
    image_dimensions,
    make_thumbnail,
    sniff_format,
)
from model.preprocess import PREPROCESS_VERSION, prepare, preprocess

RG1 = (
    "wg04_RG1_UNCR_cr_chest_mono1_15bit_explicit_le.dcm",
    "wg04_RG1_J2KR_cr_chest_mono1_15bit_j2k_lossless.dcm",
    "wg04_RG1_J2KI_cr_chest_mono1_15bit_j2k_lossy.dcm",
)
GOOD_DICOM = (
    *RG1,
    "pydicom966fixed_dx_chest_mono1_12bit_j2k_lossless.dcm",
    "siim_acr_pneumothorax_cr_chest_mono2_8bit_jpeg_baseline.dcm",
    "nih_cxr14_gcp_dx_chest_mono2_8bit_implicit.dcm",
)
BAD_DICOM = "pydicom966_dx_chest_mono1_12bit_j2k_lossless_badCOM.dcm"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _huge_png_header(width: int = 30000, height: int = 30000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _regions(img: np.ndarray) -> tuple[float, float]:
    """Mean of a lung-field box and of the mediastinum/spine box of a frontal chest film."""
    h, w = img.shape
    lung = np.concatenate(
        [
            img[h // 3 : 2 * h // 3, w // 6 : w // 3].ravel(),
            img[h // 3 : 2 * h // 3, 2 * w // 3 : 5 * w // 6].ravel(),
        ]
    )
    mediastinum = img[h // 3 : 2 * h // 3, 9 * w // 20 : 11 * w // 20]
    return float(lung.mean()), float(mediastinum.mean())


def test_preprocess_imports_no_tensorflow() -> None:
    # other tests may import TF; check in a clean interpreter
    import subprocess

    code = "import model, model.preprocess, model.serve, sys; print('tensorflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "False"


def test_sniff_format() -> None:
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"\0" * 20) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + b"\0" * 20) == "jpeg"
    assert sniff_format(b"\0" * 128 + b"DICM" + b"\0" * 8) == "dicom"
    assert sniff_format(b"GIF89a" + b"\0" * 200) is None
    assert sniff_format(b"") is None


def test_not_an_image_is_readable_error() -> None:
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or DICOM"):
        decode_image(b"%PDF-1.7 hello" * 20)


def test_pixel_cap_rejects_huge_png_before_decoding() -> None:
    data = _huge_png_header()
    assert image_dimensions(data) == (30000, 30000)
    with pytest.raises(ImageDecodeError, match=r"30000x30000 = 900 megapixels, over the 50 megapixel limit"):
        decode_image(data)


def test_jpeg_dimensions_and_truncated_jpeg(sample_files: list[Path]) -> None:
    data = sample_files[0].read_bytes()
    w, h = image_dimensions(data)
    img = decode_image(data)
    assert img.shape == (h, w)
    assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0
    with pytest.raises(ImageDecodeError):
        decode_image(data[:200])


def test_png_8_and_16_bit_decode_to_same_picture(sample_files: list[Path]) -> None:
    img8 = cv2.imdecode(np.frombuffer(sample_files[2].read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
    png8 = cv2.imencode(".png", img8)[1].tobytes()
    png16 = cv2.imencode(".png", img8.astype(np.uint16) * 257)[1].tobytes()
    rgb = cv2.imencode(".png", cv2.cvtColor(img8, cv2.COLOR_GRAY2BGR))[1].tobytes()
    a, b, c = decode_image(png8), decode_image(png16), decode_image(rgb)
    assert a.shape == img8.shape
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1.0 / 255 + 1e-6)
    assert image_dimensions(png16) == (img8.shape[1], img8.shape[0])


def test_preprocess_pads_keeps_aspect_and_is_deterministic(sample_files: list[Path]) -> None:
    gray = np.zeros((100, 200), np.float32)
    gray[:, :] = np.linspace(0, 1, 200)[None]
    out = preprocess(gray, 64)
    assert out.shape == (64, 64, 1) and out.dtype == np.float32
    assert np.all(out[:15] == 0) and np.all(out[-15:] == 0)  # letterbox padding, not squashing
    assert out[32, :, 0].max() == pytest.approx(1.0, abs=0.01)  # the content fills the width
    assert out[32, 0, 0] < 0.02 and out[32, 0, 0] < out[32, 32, 0] < out[32, 63, 0]
    tall = preprocess(gray.T.copy(), 64)  # portrait: padded left and right
    assert np.all(tall[:, :15] == 0) and np.all(tall[:, -15:] == 0)
    # the contrast stretch (kept only for its ablation) maps the 1st-99th percentiles to 0 and 1
    stretched = preprocess(0.25 + 0.5 * gray, 64, contrast=True)
    assert stretched[32, :, 0].max() == pytest.approx(1.0)
    data = sample_files[3].read_bytes()
    x1, x2 = prepare(data, 96), prepare(data, 96)
    assert np.array_equal(x1, x2)
    assert x1.min() >= 0.0 and x1.max() <= 1.0
    assert PREPROCESS_VERSION


def test_clahe_option_raises_local_contrast_and_keeps_padding_black() -> None:
    # a faint structure on a flat field: CLAHE (the issue-10 ablation) must make it stand out, stay in [0, 1],
    # leave the letterbox padding black and be deterministic
    gray = np.full((100, 200), 0.5, np.float32)
    gray[40:60, 80:120] = 0.52
    plain = preprocess(gray, 64)
    eq = preprocess(gray, 64, clahe=True)
    assert eq.shape == (64, 64, 1) and eq.dtype == np.float32
    assert eq.min() >= 0.0 and eq.max() <= 1.0
    assert np.all(eq[:15] == 0) and np.all(eq[-15:] == 0)
    inside, outside = (slice(28, 36), slice(28, 36)), (slice(20, 22), slice(5, 10))
    assert eq[inside].mean() - eq[outside].mean() > 3 * (plain[inside].mean() - plain[outside].mean())
    assert np.array_equal(eq, preprocess(gray, 64, clahe=True))


def test_train_and_serve_use_identical_preprocessing(cxr_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The training cache is built with prepare(); the Predictor uses prepare(): same arrays bit for bit."""
    import model.data as data_mod

    monkeypatch.setattr(data_mod, "cache_dir", lambda: tmp_path)
    recs = data_mod.read_manifest(cxr_dir)[:4]
    train_x = data_mod.load_arrays(cxr_dir, recs, 64)
    cached_x = data_mod.load_arrays(cxr_dir, recs, 64)  # from the .npy cache
    serve_x = np.stack([prepare((cxr_dir / r.file).read_bytes(), 64) for r in recs])
    assert np.array_equal(train_x, serve_x) and np.array_equal(cached_x, serve_x)


def test_thumbnail_is_small_png(sample_files: list[Path]) -> None:
    png = make_thumbnail(sample_files[0].read_bytes(), max_side=80)
    assert sniff_format(png) == "png"
    w, h = image_dimensions(png)
    assert max(w, h) == 80


@pytest.mark.parametrize("name", GOOD_DICOM)
def test_dicom_decodes_bone_bright_in_range(dicom_dir: Path, name: str) -> None:
    data = (dicom_dir / name).read_bytes()
    assert sniff_format(data) == "dicom"
    w, h = image_dimensions(data)
    img = decode_image(data)
    assert img.shape == (h, w) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0 and img.max() - img.min() > 0.5
    lung, mediastinum = _regions(img)
    assert mediastinum > lung + 0.05, (
        f"{name}: mediastinum {mediastinum:.3f} should be brighter than lung {lung:.3f}"
    )


def test_dicom_rg1_variants_give_nearly_the_same_picture(dicom_dir: Path) -> None:
    imgs = [decode_image((dicom_dir / n).read_bytes()) for n in RG1]
    for other in imgs[1:]:
        assert other.shape == imgs[0].shape
        assert np.corrcoef(imgs[0].ravel(), other.ravel())[0, 1] > 0.99
        assert np.abs(other - imgs[0]).mean() < 0.01


def test_dicom_without_window_uses_data_range_and_voi_lut(dicom_dir: Path) -> None:
    """MONOCHROME2 files without a window fall back to the data range; a VOI LUT sequence is applied."""
    import io

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    name = "nih_cxr14_gcp_dx_chest_mono2_8bit_implicit.dcm"
    data = (dicom_dir / name).read_bytes()
    img = decode_image(data)
    assert img.min() == 0.0 and img.max() == 1.0
    # the same file with a VOI LUT sequence (identity ramp on the upper half) and then flipped to MONOCHROME1
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = ds.pixel_array.astype(np.uint8).tobytes()
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.LUTData = np.array([max(0, 2 * v - 255) * 257 for v in range(256)], dtype="<u2").tobytes()
    ds.VOILUTSequence = Sequence([lut])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with_lut = decode_image(buf.getvalue())
    assert with_lut.shape == img.shape and with_lut.min() == 0.0 and with_lut.max() == 1.0
    lung, med = _regions(with_lut)
    assert med > lung
    ds.PhotometricInterpretation = "MONOCHROME1"
    del ds.VOILUTSequence
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    inverted = decode_image(buf.getvalue())
    np.testing.assert_allclose(inverted, 1.0 - img, atol=1e-6)


def test_corrupt_dicom_raises_readable_error(dicom_dir: Path) -> None:
    data = (dicom_dir / BAD_DICOM).read_bytes()
    assert image_dimensions(data) == (2000, 2128)  # the header is fine
    with pytest.raises(ImageDecodeError) as exc:
        decode_image(data)
    assert str(exc.value) == "DICOM pixel data could not be decoded (JPEG 2000 codestream is corrupt)"


def test_dicom_patient_id(dicom_dir: Path, sample_files: list[Path]) -> None:
    assert (
        dicom_patient_id((dicom_dir / "nih_cxr14_gcp_dx_chest_mono2_8bit_implicit.dcm").read_bytes())
        == "Covid0000"
    )
    assert dicom_patient_id(sample_files[0].read_bytes()) is None


def test_dicom_pixel_cap(dicom_dir: Path) -> None:
    data = (dicom_dir / RG1[0]).read_bytes()
    with pytest.raises(ImageDecodeError, match="megapixel limit"):
        decode_image(data, max_pixels=1_000_000)
