"""Zip and decode budgets counted in bytes actually inflated (issue 13, point 3): per file, per upload, per
process; refused bytes given back at once; deflated and many-frame DICOM decoded within bounds."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from config import Settings, load_settings
from intake.files import (
    ByteBudget,
    ServerBusy,
    UploadAccount,
    UploadTooLarge,
    expand_zip,
    iter_checked,
    upload_scope,
)
from intake.formats import DEFLATE_BYTES_PER_PIXEL, ImageDecodeError, decode_image, image_dimensions
from tests.intake.dicom_helpers import synthetic_dicom
from tests.web.conftest import png_bytes

MiB = 2**20


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Default settings with a private data dir."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "var"))
    return load_settings()


def zeros_zip(members: dict[str, int]) -> bytes:
    """A zip whose members are this many zero bytes each, written a chunk at a time (never whole here)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, size in members.items():
            with zf.open(name, "w", force_zip64=size > 2**31 - 1) as fh:
                chunk = b"\x00" * MiB
                for start in range(0, size, MiB):
                    fh.write(chunk[: min(MiB, size - start)])
    return buf.getvalue()


@pytest.mark.hardening("zip member past the per-file limit: upload refused before inflating")
def test_a_member_past_the_per_file_limit_refuses_the_upload(settings: Settings) -> None:
    """The abuse run's zip: 0.1 MB holding a 100 MB member. Refused whole, naming the limit, nothing held."""
    bomb = zeros_zip({"scan.png": 100 * MiB})
    assert len(bomb) < MiB
    budget = ByteBudget()
    refused = pytest.raises(UploadTooLarge, match=r"beyond 64 MB \(bomb.zip/scan.png\), the limit per file")
    with refused, upload_scope(settings, budget):
        list(iter_checked([("bomb.zip", bomb), ("ok.png", png_bytes())], settings, patient_id=None))
    assert budget.peak == 0 and budget.in_flight == 0


def test_upload_limit_from_headers_and_lying_headers(settings: Settings) -> None:
    """Members that together pass the per-upload limit refuse the upload before anything inflates. Headers
    that understate their sizes inflate no more than they declare: each such member fails readably (its
    check sum) and what it had inflated is given back at once."""
    small = settings.with_overrides(zip_member_max_bytes=4 * MiB, max_inflated_bytes=10 * MiB)
    data = zeros_zip({f"{i}.png": 3 * MiB for i in range(5)})
    budget = ByteBudget()
    with pytest.raises(UploadTooLarge, match="would expand to 15 MB, over the 10 MB limit per upload"):
        list(expand_zip("z.zip", data, small, max_members=10, account=UploadAccount(small, budget)))
    assert budget.peak == 0
    forged = _understate_sizes(data, factor=2)  # declares 7.5 MB in all
    account = UploadAccount(small, budget)
    rows = list(expand_zip("z.zip", forged, small, max_members=10, account=account))
    assert [r for _, r in rows] == ["The zip member could not be extracted (BadZipFile)."] * 5
    assert 0 < account.inflated <= 5 * (3 * MiB // 2), "never more than declared"
    assert budget.in_flight == 0 and budget.peak <= 3 * MiB // 2


def _understate_sizes(data: bytes, *, factor: int) -> bytes:
    """The same zip with every central-directory uncompressed size divided by factor (a lying header)."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        (size,) = struct.unpack_from("<I", out, pos + 24)
        struct.pack_into("<I", out, pos + 24, size // factor)
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


@pytest.mark.hardening("refused zip members are given back at once; kept ones until the upload is stored")
def test_refused_members_are_given_back_and_kept_ones_held(settings: Settings) -> None:
    """Three 3 MB members that are not images: at most one is held at a time. A kept image is held until the
    upload scope ends."""
    data = zeros_zip({f"{i}.png": 3 * MiB for i in range(3)})
    budget = ByteBudget()
    with upload_scope(settings, budget):
        rows = list(iter_checked([("z.zip", data)], settings, patient_id=None))
        assert all(not r.ok for r in rows) and budget.in_flight == 0
    assert budget.peak <= 3 * MiB + MiB, budget.peak
    image = png_bytes(400, 300)
    kept = zipfile_of({"film.png": image})
    budget = ByteBudget()
    with upload_scope(settings, budget):
        rows = list(iter_checked([("k.zip", kept)], settings, patient_id=None))
        assert budget.in_flight == len(image), "held while the upload is being stored"
    assert budget.in_flight == 0


def zipfile_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip of these members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.hardening("process-wide bytes in flight: a parallel upload past it is refused as busy")
def test_the_process_budget_refuses_a_parallel_upload_as_busy(settings: Settings) -> None:
    """Another upload already holds most of the process's budget: this one is refused with the setting's
    name and a retry hint, and gives back what it had taken."""
    tight = settings.with_overrides(max_inflight_bytes=8 * MiB)
    budget = ByteBudget()
    assert budget.take(6 * MiB, tight.max_inflight_bytes)  # another request's bytes in flight
    with pytest.raises(ServerBusy, match="CXR_MAX_INFLIGHT_BYTES") as refused, upload_scope(tight, budget):
        list(iter_checked([("z.zip", zeros_zip({"a.png": 5 * MiB}))], tight, patient_id=None))
    assert refused.value.retry_after > 0
    assert budget.in_flight == 6 * MiB
    budget.give(6 * MiB)
    with upload_scope(tight, budget):  # alone, the same upload goes through
        list(iter_checked([("z.zip", zeros_zip({"a.png": 5 * MiB}))], tight, patient_id=None))
    assert budget.in_flight == 0


def deflated_dicom(*, extra_zeros: int = 0) -> bytes:
    """A synthetic DICOM re-encoded with the Deflated transfer syntax, optionally followed (inside the
    deflated stream) by a private element of extra_zeros zero bytes, compressed a chunk at a time."""
    plain = synthetic_dicom(size=64)
    ds = dcmread(io.BytesIO(plain))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if not extra_zeros:
        return data
    # Rebuild the deflated stream: the data set, then (0x0099,0x1010) OB with extra_zeros bytes.
    meta_end = _meta_end(data)
    dataset = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [data[:meta_end], comp.compress(dataset)]
    out.append(comp.compress(struct.pack("<HH2sHI", 0x0099, 0x1010, b"OB", 0, extra_zeros)))
    chunk = b"\x00" * MiB
    for start in range(0, extra_zeros, MiB):
        out.append(comp.compress(chunk[: min(MiB, extra_zeros - start)]))
    out.append(comp.flush())
    return b"".join(out)


def _meta_end(data: bytes) -> int:
    from intake.formats import _file_meta

    return _file_meta(data)[1]


@pytest.mark.hardening("deflated DICOM bomb refused while inflating, in chunks")
def test_a_deflated_dicom_bomb_is_refused_while_inflating() -> None:
    """Deflated DICOM inflates in chunks up to a bound (pydicom would inflate it whole): a normal one decodes,
    a small one expanding past DEFLATE_BYTES_PER_PIXEL x the pixel cap is a readable decode error."""
    normal = deflated_dicom()
    assert image_dimensions(normal) == (64, 64)
    assert decode_image(normal).shape == (64, 64)
    max_pixels = 1_000_000
    bomb = deflated_dicom(extra_zeros=DEFLATE_BYTES_PER_PIXEL * max_pixels + MiB)
    assert len(bomb) < len(normal) + 64 * 1024
    with pytest.raises(ImageDecodeError, match="deflated data expands beyond"):
        decode_image(bomb, max_pixels=max_pixels)


def test_only_the_first_frame_of_a_many_frame_dicom_is_decoded() -> None:
    """A many-frame file decodes its first frame only (each further frame would cost as much again)."""
    many = synthetic_dicom(frames=3, size=64)
    first = dcmread(io.BytesIO(many)).pixel_array[0]
    img = decode_image(many)
    assert img.shape == (64, 64)
    # the same ordering of grey levels as the first stored frame (the window maps it monotonically)
    assert np.corrcoef(img.ravel(), first.astype(np.float64).ravel())[0, 1] > 0.99
