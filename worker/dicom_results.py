"""Results back as DICOM: a Comprehensive SR and a Grad-CAM Secondary Capture per finished DICOM study.

`make_results` (the cxr.dicom_results task, after screening) builds both with highdicom from the stored,
de-identified instance, so they carry its pseudonymised patient and keyed Study Instance UID and land in the
same study at the PACS. The SR holds the finding (coded, SNOMED CT), the three probabilities, the triage
band, the model name and version, the research-use notice, and a reference to the source instance. The SC is
the decoded image with the Grad-CAM map of the finding (model.explain) blended over it. Both are kept in SQL
(store.dicom_results) for download, and sent by C-STORE to CXR_DICOM_DESTINATION when one is set.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from config import Settings, parse_destination
from store.db import session_scope
from store.dicom_results import (
    dicom_studies_to_report,
    existing_kinds,
    latest_prediction,
    mark_sent,
    save_dicom_result,
    study_image,
    unsent_results,
)
from store.tables import ModelVersion, Prediction
from worker.artifacts import artifact_dir
from worker.recovery import is_transient

log = logging.getLogger("cxr.worker")

NOTICE = "Research and teaching tool. Not a medical device."
MANUFACTURER = "CXR screening (research)"
SERIES_NUMBER_SR, SERIES_NUMBER_SC = 9901, 9902
# Our own coding scheme for what has no standard code (PS3.3 8.2: "99" prefixes are private schemes).
SCHEME = "99CXR"
FINDING_CODES = {
    "covid": hd.sr.CodedConcept("840539006", "SCT", "Disease caused by SARS-CoV-2"),
    "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
}
PROBABILITY_CODES = {
    "covid": hd.sr.CodedConcept("p-covid", SCHEME, "Probability of COVID-19"),
    "normal": hd.sr.CodedConcept("p-normal", SCHEME, "Probability of normal"),
    "pneumonia": hd.sr.CodedConcept("p-pneumonia", SCHEME, "Probability of pneumonia"),
}
REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
BAND_CODE = hd.sr.CodedConcept("triage-band", SCHEME, "Triage band")
NOTICE_CODE = hd.sr.CodedConcept("121106", "DCM", "Comment")
ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")
SOURCE_IMAGE = hd.sr.CodedConcept("121112", "DCM", "Source of Measurement")
UNIT_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
OVERLAY_ALPHA = 0.45  # how strongly the heat map covers the film where it is strongest


def _contains() -> hd.sr.RelationshipTypeValues:
    return hd.sr.RelationshipTypeValues.CONTAINS


def build_sr(source: Dataset, prediction: Prediction, *, model_name: str, model_version: str) -> Dataset:
    """A Comprehensive SR of one prediction on the source instance (highdicom), in the source's study."""
    probs = {"covid": prediction.p_covid, "normal": prediction.p_normal, "pneumonia": prediction.p_pneumonia}
    items = [
        hd.sr.CodeContentItem(
            name=codes.DCM.Finding, value=FINDING_CODES[prediction.label], relationship_type=_contains()
        ),
        *(
            hd.sr.NumContentItem(
                name=PROBABILITY_CODES[c],
                value=round(float(p), 4),
                unit=UNIT_ONE,
                relationship_type=_contains(),
            )
            for c, p in probs.items()
        ),
        hd.sr.TextContentItem(name=BAND_CODE, value=prediction.triage, relationship_type=_contains()),
        hd.sr.TextContentItem(name=ALGORITHM_NAME, value=model_name, relationship_type=_contains()),
        hd.sr.TextContentItem(name=ALGORITHM_VERSION, value=model_version, relationship_type=_contains()),
        hd.sr.TextContentItem(name=NOTICE_CODE, value=NOTICE, relationship_type=_contains()),
        hd.sr.ImageContentItem(
            name=SOURCE_IMAGE,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=_contains(),
        ),
    ]
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_SR,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    # Our private coding scheme, declared as PS3.3 C.12.1.1.2.4 asks.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "CXR screening research codes"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def blend_overlay(gray: np.ndarray, heat_rgba_png: bytes, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8: the decoded image (float in [0, 1]) with the RGBA heat map resized over it and blended."""
    base = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = np.repeat(base[:, :, None], 3, axis=2).astype(np.float32)
    heat = cv2.imdecode(np.frombuffer(heat_rgba_png, np.uint8), cv2.IMREAD_UNCHANGED)
    if heat is None or heat.ndim != 3 or heat.shape[2] != 4:
        raise ValueError("the heat map is not an RGBA PNG")
    heat = cv2.resize(heat, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(heat[:, :, :3], cv2.COLOR_BGR2RGB).astype(np.float32)
    a = (heat[:, :, 3:4].astype(np.float32) / 255.0) * alpha
    return np.clip(rgb * (1 - a) + colour * a + 0.5, 0, 255).astype(np.uint8)


def _orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation, else the way frontal chest films are displayed (rows to the
    patient's left, columns to the feet), which is all the receiver accepts."""
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    return "L", "F"


def build_sc(source: Dataset, overlay_rgb: np.ndarray) -> Dataset:
    """A Secondary Capture (RGB) of the Grad-CAM overlay, in the source's study and patient (highdicom)."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_SC,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    if "Laterality" not in sc:
        # Type 2C of the General Series module: present and empty (a chest is not a paired structure).
        sc.Laterality = None
    return sc


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes of a dataset."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def heatmap(artifact_dir: Path | None, data: bytes, class_name: str) -> bytes:
    """The RGBA Grad-CAM PNG of class_name (model.explain; TensorFlow, so worker processes only)."""
    from model.explain import explain_bytes

    png, _ = explain_bytes(artifact_dir, data, class_name)
    return png


def make_results(session, *, study_id: int, settings: Settings) -> list[str]:  # noqa: ANN001
    """Build and save the missing SR/SC of one DONE DICOM study's newest prediction; the kinds made."""
    from intake.formats import decode_image

    found = study_image(session, study_id=study_id)
    prediction = latest_prediction(session, study_id=study_id)
    if found is None or prediction is None:
        return []
    _, data = found
    missing = [k for k in ("sr", "sc") if k not in existing_kinds(session, prediction_id=prediction.id)]
    if not missing:
        return []
    source = pydicom.dcmread(io.BytesIO(data))
    mv = session.get(ModelVersion, prediction.model_version_id)
    made: list[str] = []

    def keep(kind: str, ds: Dataset) -> None:
        save_dicom_result(
            session,
            study_id=study_id,
            prediction_id=prediction.id,
            kind=kind,
            sop_instance_uid=str(ds.SOPInstanceUID),
            data=encode(ds),
        )
        made.append(kind)

    if "sr" in missing:
        keep("sr", build_sr(source, prediction, model_name="CXR screening CNN", model_version=mv.version))
    # The heat map must come from the model that made the prediction, never from another one: its folder
    # here, or its files from SQL (worker.artifacts).
    artifact = artifact_dir(settings, session, mv) if "sc" in missing else None
    if "sc" in missing and (artifact is None or not (artifact / "model.keras").exists()):
        log.warning(
            "no Keras model of %s on this host: no Grad-CAM Secondary Capture for study %d",
            mv.version,
            study_id,
        )
    elif "sc" in missing:
        try:
            overlay = blend_overlay(
                decode_image(data, max_pixels=settings.max_image_pixels),
                heatmap(artifact, data, prediction.label),
            )
            sc = build_sc(source, overlay)
        except Exception:  # noqa: BLE001 - the SR stands alone; the overlay is a picture, not the result
            log.exception("Grad-CAM Secondary Capture of study %d failed", study_id)
        else:
            keep("sc", sc)
    return made


def send_results(session, *, study_ids: Sequence[int], settings: Settings) -> int:  # noqa: ANN001
    """C-STORE the unsent results of these studies to CXR_DICOM_DESTINATION; the number delivered."""
    target = parse_destination(settings.dicom_destination) if settings.dicom_destination else None
    if target is None:
        return 0
    pending = unsent_results(session, study_ids=study_ids)
    if not pending:
        return 0
    from pynetdicom import AE
    from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    ae_title, host, port = target
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.add_requested_context(ComprehensiveSRStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context(SecondaryCaptureImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom_timeout_s
    ae.connection_timeout = settings.dicom_timeout_s
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        for result in pending:
            mark_sent(session, result=result, error=f"association with {ae_title}@{host}:{port} failed")
        return 0
    sent = 0
    try:
        for result in pending:
            status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(result.data)))
            code = int(getattr(status, "Status", -1)) if status else -1
            error = (
                None if code in (0x0000, 0xB000, 0xB007, 0xB006) else f"C-STORE status 0x{code & 0xFFFF:04X}"
            )
            mark_sent(session, result=result, error=error)
            sent += error is None
    finally:
        assoc.release()
    return sent


def dicom_study_ids(settings: Settings, study_ids: Sequence[int]) -> list[int]:
    """Of these studies, the DONE DICOM ones (in a short session of its own)."""
    with session_scope(settings.database_url) as session:
        return dicom_studies_to_report(session, study_ids=study_ids)


def run_results_task(study_ids: Sequence[int], *, settings: Settings) -> dict[str, int]:
    """One delivery of cxr.dicom_results: one session; make what is missing, commit, then send, commit."""
    made = sent = 0
    with session_scope(settings.database_url) as session:
        ids = dicom_studies_to_report(session, study_ids=study_ids)
        for sid in ids:
            try:
                made += len(make_results(session, study_id=sid, settings=settings))
                session.commit()  # each study's results are kept even if a later one fails
            except Exception as exc:  # noqa: BLE001 - one study's odd header must not cost the others theirs
                if is_transient(exc):
                    raise  # the database or network is down: the task retries (worker.recovery)
                session.rollback()
                log.exception("DICOM results of study %d failed", sid)
        sent = send_results(session, study_ids=ids, settings=settings)
        session.commit()
    return {"made": made, "sent": sent}
