"""Results back as DICOM: the SR and the Grad-CAM Secondary Capture of a screened DICOM study, read back with
pydicom, validated with dcmtk's dsrdump and dicom3tools' dciodvfy, and sent by C-STORE to a destination."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from config import Settings
from intake.batches import ingest_files
from store.db import session_scope
from store.studies import create_batch, load_image_bytes, mark_queued
from store.tables import DicomResult, Prediction, Study
from store.users import create_user
from tests.intake.dicom_helpers import DICOM_DIR, require_tool
from worker.dicom_results import NOTICE, run_results_task
from worker.screening import ServingModel, model_version_id, screen_chunk

FIXTURE = "siim_acr_pneumothorax_cr_chest_mono2_8bit_jpeg_baseline.dcm"


@pytest.fixture
def destination() -> Iterator[tuple[int, list[pydicom.Dataset]]]:
    """A storage SCP on a free port standing in for the PACS: (port, what it received)."""
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def _screened(url: str, settings: Settings, predictor) -> int:  # noqa: ANN001
    path = DICOM_DIR / FIXTURE
    if not path.exists():
        pytest.skip(f"{path} is not present beside this checkout")
    with session_scope(url) as session:
        user = create_user(session, username="radio", password="correct horse battery")
        batch = create_batch(session, owner=user, name="dicom")
        (sid,) = ingest_files(session, batch=batch, files=[(FIXTURE, path.read_bytes())], settings=settings)
        mark_queued(session, study_ids=[sid], lease_s=600)
        session.commit()
    model = ServingModel(predictor, model_version_id(url, predictor), predictor.version)
    with session_scope(url) as session:
        assert screen_chunk(session, study_ids=[sid], token="t", model=model, settings=settings).done == [sid]
    return sid


def test_sr_and_sc_are_made_read_back_validated_and_sent(
    sqlite_url: str,
    tmp_path: Path,
    predictor,
    destination,  # noqa: ANN001
) -> None:
    port, received = destination
    settings = Settings(
        data_dir=tmp_path,
        database_url=sqlite_url,
        deid_key="k" * 40,
        dicom_destination=f"PACS@127.0.0.1:{port}",
    )
    sid = _screened(sqlite_url, settings, predictor)
    assert run_results_task([sid], settings=settings) == {"made": 2, "sent": 2}
    assert run_results_task([sid], settings=settings) == {"made": 0, "sent": 0}  # idempotent
    with session_scope(sqlite_url) as session:
        pred = session.scalar(select(Prediction).where(Prediction.study_id == sid))
        study = session.get(Study, sid)
        source = pydicom.dcmread(io.BytesIO(load_image_bytes(session, studies=[study])[sid]))
        results = {r.kind: r for r in session.scalars(select(DicomResult).where(DicomResult.study_id == sid))}
        assert all(r.sent_at is not None and r.send_error is None for r in results.values())
        sr_bytes, sc_bytes = results["sr"].data, results["sc"].data
        label, triage, probs = pred.label, pred.triage, (pred.p_covid, pred.p_normal, pred.p_pneumonia)
    assert sorted(str(d.SOPClassUID) for d in received) == sorted(
        [ComprehensiveSRStorage, SecondaryCaptureImageStorage]
    )

    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    # The same (de-identified) patient and study as the instance it reports on, and a reference to it.
    assert (sr.PatientID, sr.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert sr.PatientID == study.patient_key
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    finding = items["Finding"].ConceptCodeSequence[0]
    assert finding.CodeValue == {"covid": "840539006", "pneumonia": "233604007", "normal": "17621005"}[label]
    shown = [
        float(items[f"Probability of {n}"].MeasuredValueSequence[0].NumericValue)
        for n in ("COVID-19", "normal", "pneumonia")
    ]
    assert shown == pytest.approx(probs, abs=1e-4)
    assert items["Triage band"].TextValue == triage and items["Comment"].TextValue == NOTICE
    assert items["Algorithm Version"].TextValue == predictor.version
    ref = items["Source of Measurement"].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    sc = pydicom.dcmread(io.BytesIO(sc_bytes))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.pixel_array.shape == (source.Rows, source.Columns, 3)
    # The overlay is coloured somewhere (the heat map), while the film stays grey elsewhere.
    rgb = sc.pixel_array.astype(int)
    assert (abs(rgb[..., 0] - rgb[..., 2]) > 40).any() and (rgb[..., 0] == rgb[..., 2]).any()

    require_tool("dsrdump", "dciodvfy")
    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr_path.write_bytes(sr_bytes)
    sc_path.write_bytes(sc_bytes)
    dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "Comprehensive SR Document" in dump.stdout, dump.stderr
    assert '"Finding"' in dump.stdout and "Research and teaching tool" in dump.stdout
    for path in (sr_path, sc_path):
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
