"""Shared helpers of the DICOM tests: fixtures from ../shared, synthetic files, Debian's DICOM tools."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import IN_CI, SHARED_DATA
from tests.procs import film_gray

DICOM_DIR = SHARED_DATA / "dicom"
CORRUPT = "pydicom966_dx_chest_mono1_12bit_j2k_lossless_badCOM.dcm"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def fixture_paths(*, readable_only: bool = False) -> list[Path]:
    """The real DICOM fixtures (skips when ../shared is absent)."""
    paths = sorted(DICOM_DIR.glob("*.dcm"))
    if not paths:
        pytest.skip(f"no DICOM fixtures at {DICOM_DIR}")
    return [p for p in paths if not (readable_only and p.name == CORRUPT)]


def require_tool(*names: str) -> None:
    """Skip without a Debian DICOM tool (fail under CI=true, where `make test` installs them)."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = f"{', '.join(missing)} not installed (apt-get install dcmtk dicom3tools libgdcm-tools)"
    if IN_CI:
        pytest.fail(msg + " and CI=true requires it (scripts/install_dicom_tools.sh)")
    pytest.skip(msg)


def synthetic_dicom(
    *,
    modality: str = "CR",
    sop_class: str = CR_STORAGE,
    view: str = "PA",
    frames: int | None = None,
    pixels: bool = True,
    size: int = 64,
    patient_id: str = "PAT-0001",
) -> bytes:
    """A small, valid chest-like DICOM file full of identifiers (what de-identification must remove)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    ds.PatientAddress = "12 Hospital Road, Springfield"
    ds.OtherPatientIDs = "OTHER-998877"
    ds.AccessionNumber = "ACC778899"
    ds.StudyID = "STUDY42"
    ds.StudyDate = "20240315"
    ds.StudyTime = "101112"
    ds.SeriesDate = "20240315"
    ds.ContentDate = "20240315"
    ds.AcquisitionDateTime = "20240315101112"
    ds.InstitutionName = "Saint Example Hospital"
    ds.InstitutionAddress = "1 Example Street"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.PerformingPhysicianName = "Quinn^Michaela"
    ds.OperatorsName = "Operator^Olga"
    ds.StationName = "XRAYROOM7"
    ds.DeviceSerialNumber = "SN-5551234"
    ds.StudyDescription = "CHEST PA for Jane Doe"
    ds.ImageComments = "patient Jane Doe, bed 12"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedStudySequence = Sequence([ref])
    req = Dataset()
    req.RequestedProcedureID = "RP-31337"
    req.ScheduledProcedureStepID = "SPS-4242"
    ds.RequestAttributesSequence = Sequence([req])
    ds.add_new(0x00091010, "LO", "Private vendor note: Jane Doe")
    if pixels:
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        n = frames or 1
        # a real film (the committed demo samples) at 12 bits: random pixels would be refused by the
        # validity gate at intake, as they should be
        film = film_gray(size, size, 0).astype(np.float64) / 255.0
        arr = np.repeat((film * 4000).astype(np.uint16)[None], n, axis=0)
        if frames:
            ds.NumberOfFrames = frames
        ds.PixelData = arr.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "XRAYROOM7"
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
