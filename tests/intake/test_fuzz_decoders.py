"""A bounded fuzzer over the upload decoders (issue 13, point 8): real image bytes, mutated, and random bytes
give a decoded image or the project's own refusal, never another exception.

Seeds: the committed chest films (model/samples) re-encoded small as JPEG and PNG (8-bit, 16-bit, colour),
synthetic DICOM (uncompressed, RLE, deflated, MONOCHROME1, many frames), a real JPEG DICOM from
../shared/data/dicom when it is there, and zips of them. Mutations: flipped, overwritten, inserted and
deleted bytes (often in the headers), truncation. Derandomized and bounded (max_examples, deadline): the
same examples every run, about 20 s in all here.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from config import Settings
from intake.files import UploadRefused, ValidatedFile, iter_checked, upload_scope, validate_file
from intake.formats import (
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    check_structure,
    decode_image,
    image_dimensions,
    sniff_format,
)
from tests.conftest import SHARED_DATA
from tests.intake.dicom_helpers import synthetic_dicom
from tests.procs import SAMPLES_DIR

MAX_PIXELS = 4_000_000  # small, so that a mutated header claiming more is refused before decoding
FUZZ = settings(
    max_examples=500,
    deadline=2000,  # ms per example: a slow decode of one mutated file is a finding too
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def _dicom_variant(plain: bytes, *, syntax: str | None = None, mono1: bool = False) -> bytes:
    ds = dcmread(io.BytesIO(plain))
    if mono1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """Valid files of every format the upload accepts, small enough to decode in a few milliseconds."""
    films = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert films, f"no committed sample films in {SAMPLES_DIR}"
    out = [films[0].read_bytes()]  # one real film as committed
    for path in films[:3]:
        gray = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (96, 80), interpolation=cv2.INTER_AREA)
        out += [
            _encode(".jpg", gray),
            _encode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
            _encode(".png", gray),
            _encode(".png", (gray.astype(np.uint16) * 257)),
            _encode(".png", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)),
        ]
    plain = synthetic_dicom(size=48)
    out += [
        plain,
        synthetic_dicom(size=32, frames=2),
        _dicom_variant(plain, syntax=RLELossless),
        _dicom_variant(plain, syntax=DeflatedExplicitVRLittleEndian),
        _dicom_variant(plain, mono1=True),
    ]
    real = SHARED_DATA / "dicom" / "siim_acr_pneumothorax_cr_chest_mono2_8bit_jpeg_baseline.dcm"
    if real.exists():
        out.append(real.read_bytes())
    for data in out:  # every seed is valid: the fuzzer starts from files that decode
        decode_image(data, max_pixels=MAX_PIXELS)
    return tuple(out)


@st.composite
def mutated(draw: st.DrawFn, pool: tuple[bytes, ...] | None = None) -> bytes:
    """A seed with a few mutations, half of them within its first 512 bytes (where the headers are)."""
    data = bytearray(draw(st.sampled_from(pool or seeds())))
    for _ in range(draw(st.integers(0, 4))):
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 511)
        pos = draw(st.integers(0, max(0, limit)))
        op = draw(st.sampled_from(("flip", "overwrite", "insert", "delete", "truncate")))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            del data[pos:]
    return bytes(data)


MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM", b"PK\x03\x04")
raw_bytes = st.one_of(
    st.binary(max_size=1024),
    st.tuples(st.sampled_from(MAGICS), st.binary(max_size=1024)).map(lambda t: t[0] + t[1]),
)
any_input = st.one_of(mutated(), mutated(), mutated(), raw_bytes)


@pytest.fixture(scope="module")
def upload_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Default upload settings with a small pixel cap and a private data dir."""
    return Settings(data_dir=tmp_path_factory.mktemp("fuzz"), max_image_pixels=MAX_PIXELS)


@pytest.mark.hardening("fuzzed image bytes: decoded or ImageDecodeError, nothing else")
@FUZZ
@given(data=any_input)
def test_decoders_fail_only_with_their_own_error(data: bytes) -> None:
    """decode_image, image_dimensions and check_structure: a valid result or ImageDecodeError."""
    fmt = sniff_format(data)
    try:
        width, height = image_dimensions(data)
        assert fmt is not None and width >= 0 and height >= 0
        check_structure(data, fmt)
    except ImageDecodeError as exc:
        assert str(exc)
    try:
        img = decode_image(data, max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        assert str(exc)
        return
    assert img.ndim == 2 and img.dtype == np.float32
    assert min(img.shape) >= MIN_IMAGE_SIDE and img.size <= MAX_PIXELS
    assert np.isfinite(img).all() and float(img.min()) >= 0.0 and float(img.max()) <= 1.0


@pytest.mark.hardening("fuzzed uploads: every file becomes a study or a readable refusal")
@FUZZ
@given(data=any_input)
def test_upload_validation_never_raises(data: bytes, upload_settings: Settings) -> None:
    """validate_file answers every input with a study or a readable error."""
    checked = validate_file("fuzz.bin", data, upload_settings)
    assert isinstance(checked, ValidatedFile)
    if checked.ok:
        assert checked.data and checked.fmt in ("png", "jpeg", "dicom") and checked.width and checked.height
    else:
        assert isinstance(checked.error, str) and checked.error.strip()


@functools.cache
def zip_seeds() -> tuple[bytes, ...]:
    """Zips (deflated and stored) of a few seeds."""
    out = []
    for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as zf:
            for i, data in enumerate(seeds()[1:4]):
                zf.writestr(f"dir/{i}.img", data)
        out.append(buf.getvalue())
    return tuple(out)


@pytest.mark.hardening("fuzzed zips: studies, readable refusals, or the whole upload refused")
@settings(FUZZ, max_examples=250)
@given(data=st.one_of(mutated(zip_seeds()), mutated(zip_seeds()), raw_bytes))
def test_zip_expansion_never_raises(data: bytes, upload_settings: Settings) -> None:
    """A mutated zip: a row per member (a study or a readable refusal) or UploadRefused; none held after."""
    with upload_scope(upload_settings) as account:
        try:
            rows = list(iter_checked([("fuzz.zip", data)], upload_settings, patient_id=None))
        except UploadRefused as exc:
            assert str(exc)
            return
    assert account.held == 0
    assert rows and all(isinstance(r, ValidatedFile) and (r.ok or r.error) for r in rows)


def test_the_seeds_are_real_files() -> None:
    """The fuzzer starts from files that decode (a seed list gone empty would fuzz nothing)."""
    assert len(seeds()) >= 20 and {sniff_format(s) for s in seeds()} == {"png", "jpeg", "dicom"}


def test_found_by_the_fuzzer_zip_with_a_bad_directory_offset(upload_settings: Settings) -> None:
    """Found by this fuzzer: a zip whose end record points one byte past its central directory made zipfile
    seek to -1 (ValueError, a 500 at upload); now that member is a readable FAILED row."""
    data = bytearray(zip_seeds()[0])
    eocd = data.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<I", data, eocd + 16)
    struct.pack_into("<I", data, eocd + 16, offset + 1)
    rows = list(iter_checked([("bad.zip", bytes(data))], upload_settings, patient_id=None))
    assert rows[0].error == "The zip member could not be extracted (ValueError)."
    assert all(r.error and r.error.startswith("The zip member could not be extracted") for r in rows)


def test_found_by_the_fuzzer_dicom_with_an_unknown_vr(upload_settings: Settings) -> None:
    """Found by this fuzzer: an unknown VR in a DICOM file's meta group escaped de-identification
    (NotImplementedError, a 500 at upload); now the file is FAILED with a readable reason."""
    plain = synthetic_dicom(size=48)
    broken = plain.replace(b"\x02\x00\x03\x00UI", b"\x02\x00\x03\x00TI", 1)
    assert broken != plain
    checked = validate_file("odd.dcm", broken, upload_settings)
    assert not checked.ok and "could not be de-identified (NotImplementedError)" in checked.error
