"""The C-STORE receiver with real clients: dcmtk's echoscu and storescu (a folder in one association), and
pynetdicom for what dcmtk cannot easily send (out-of-scope, malformed and huge instances)."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, build_context
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification
from sqlalchemy import select

from config import Settings
from intake.dicom_receiver import (
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    OUT_OF_SCOPE,
    UNREADABLE,
    Receiver,
)
from store.db import session_scope
from store.tables import Batch, StudyStatus, User
from tests.intake.dicom_helpers import CORRUPT, CT_STORAGE, fixture_paths, require_tool, synthetic_dicom

STORESCU_CFG = Path(__file__).with_name("storescu.cfg")


@pytest.fixture
def receiver(sqlite_url: str, tmp_path: Path) -> Iterator[Receiver]:
    """A receiver on a free port of 127.0.0.1, its database a throwaway SQLite, its broker a folder."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=sqlite_url,
        dicom_port=0,
        dicom_batch_window_s=30,
        dicom_max_instance_bytes=20 * 1024 * 1024,
        dicom_timeout_s=10,
    )
    rx = Receiver(settings)
    rx.start()
    yield rx
    rx.stop()


def _batches(url: str) -> list[tuple[int, str, list[tuple[StudyStatus, str | None]]]]:
    with session_scope(url) as s:
        out = []
        for b in s.scalars(select(Batch).order_by(Batch.id)):
            studies = [(st.status, st.error) for st in b.studies]
            out.append((b.id, b.owner.username, studies))
        return out


def _wait_queued(url: str, n: int, timeout: float = 30.0) -> list[tuple[StudyStatus, str | None]]:
    """The studies once n are QUEUED (the association closed and the batch started); bounded wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        studies = [st for _, _, b in _batches(url) for st in b]
        if sum(1 for status, _ in studies if status == StudyStatus.QUEUED) >= n:
            return studies
        time.sleep(0.2)
    pytest.fail(f"{n} studies were not queued within {timeout} s: {_batches(url)}")


def _send(port: int, *datasets: bytes, calling: str = "PYNET", contexts: list | None = None) -> list[int]:
    ae = AE(ae_title=calling)
    ae.requested_contexts = contexts or [
        build_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian),
        build_context(CTImageStorage, ExplicitVRLittleEndian),
        build_context(Verification),
    ]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_SCREEN")
    assert assoc.is_established
    statuses = []
    try:
        for raw in datasets:
            ds = pydicom.dcmread(io.BytesIO(raw))
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status))
    finally:
        assoc.release()
    return statuses


def test_echoscu_verifies(receiver: Receiver) -> None:
    require_tool("echoscu")
    run = subprocess.run(
        ["echoscu", "-aet", "MOD1", "-aec", "CXR_SCREEN", "127.0.0.1", str(receiver.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


def test_storescu_sends_the_fixture_folder_in_one_association(
    receiver: Receiver, sqlite_url: str, tmp_path: Path
) -> None:
    require_tool("storescu")
    folder = tmp_path / "send"
    folder.mkdir()
    for path in fixture_paths():
        shutil.copy(path, folder / path.name)
    subprocess.run(
        ["storescu", "-nh", "-xf", str(STORESCU_CFG), "Chest", "-aet", "MOD1", "-aec", "CXR_SCREEN"]
        + ["+sd", "127.0.0.1", str(receiver.port), str(folder)],
        capture_output=True,
        timeout=120,
    )
    studies = _wait_queued(sqlite_url, 6)
    batches = _batches(sqlite_url)
    assert len(batches) == 1 and batches[0][1] == "dicom"  # one association: one batch, the configured owner
    assert sorted(s for s, _ in studies) == [StudyStatus.FAILED] + [StudyStatus.QUEUED] * 6
    (error,) = [e for s, e in studies if s == StudyStatus.FAILED]
    assert "JPEG 2000" in error
    assert CORRUPT  # the one that fails is the corrupt codestream


def test_out_of_scope_malformed_and_huge_fail_that_instance_only(receiver: Receiver, sqlite_url: str) -> None:
    ok = synthetic_dicom()
    statuses = _send(
        receiver.port,
        synthetic_dicom(modality="CT", sop_class=CT_STORAGE),
        synthetic_dicom(view="LL"),
        synthetic_dicom(frames=2),
        synthetic_dicom(pixels=False),
        synthetic_dicom(size=3000),  # 18 MB of pixels: over nothing yet
        ok,
    )
    assert statuses[:4] == [OUT_OF_SCOPE, OUT_OF_SCOPE, OUT_OF_SCOPE, DOES_NOT_MATCH]
    assert statuses[4] == 0 and statuses[5] == 0
    big = synthetic_dicom(size=3300)  # 21.8 MB: over the 20 MB instance limit
    assert _send(receiver.port, big) == [OUT_OF_RESOURCES]
    # A data set whose pixel data is cut short: that instance fails, the receiver carries on.
    ds = pydicom.dcmread(io.BytesIO(ok))
    ds.PixelData = ds.PixelData[:100]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert _send(receiver.port, buf.getvalue()) == [UNREADABLE]
    studies = [st for _, _, b in _batches(sqlite_url) for st in b]
    assert len(studies) == 3  # refused instances are not stored; the unreadable one is, as FAILED
    assert _echo(receiver.port) == 0


def _echo(port: int) -> int:
    ae = AE(ae_title="PYNET")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_SCREEN")
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_unsupported_transfer_syntax_is_refused_at_negotiation(receiver: Receiver) -> None:
    ae = AE(ae_title="PYNET")
    ae.add_requested_context(ComputedRadiographyImageStorage, JPEGLSLossless)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXR_SCREEN")
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert ComputedRadiographyImageStorage not in accepted and Verification in accepted
    finally:
        assoc.release()


def test_one_calling_ae_within_the_window_is_one_batch(receiver: Receiver, sqlite_url: str) -> None:
    assert _send(receiver.port, synthetic_dicom(), calling="MODA") == [0]
    assert _send(receiver.port, synthetic_dicom(), calling="MODA") == [0]
    assert _send(receiver.port, synthetic_dicom(), calling="MODB") == [0]
    _wait_queued(sqlite_url, 3)
    sizes = sorted(len(b) for _, _, b in _batches(sqlite_url))
    assert sizes == [1, 2]
    with session_scope(sqlite_url) as s:
        assert s.scalar(select(User).where(User.username == "dicom")) is not None
