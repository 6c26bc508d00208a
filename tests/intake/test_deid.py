"""De-identification on ingest (PS3.15 Annex E basic profile): every tag of a stored file is checked."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from config import Settings
from intake.deid import (
    METHOD,
    deidentify_bytes,
    keyed_uid,
    patient_pseudonym,
    profile_actions,
)
from intake.files import validate_file
from tests.intake.dicom_helpers import fixture_paths, synthetic_dicom

KEY = "test-deid-key-" + "x" * 30
# What intake.deid writes itself into profile attributes (the pseudonym, the record of the method).
OWN = {0x00100010, 0x00100020, 0x00120062, 0x00120063, 0x00120064, 0x00280303}


def _walk(ds: Dataset, path: str = "") -> list[tuple[str, pydicom.DataElement]]:
    out = []
    for elem in ds:
        out.append((f"{path}{elem.tag}", elem))
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out += _walk(item, f"{path}{elem.tag}[{i}].")
    return out


def _action(tag: int) -> str | None:
    group, element = tag >> 16, tag & 0xFFFF
    for key, code in profile_actions().items():
        if len(key) == 2 and key == (group, element):
            return code
        if len(key) == 4 and group & key[2] == key[0] & key[2] and element & key[3] == key[1] & key[3]:
            return code
    return None


def _identifying_strings(ds: Dataset) -> set[str]:
    """Every original value of a profile attribute long enough to be recognised in the output."""
    values = set()
    for _, elem in _walk(ds):
        if _action(int(elem.tag)) and elem.VR not in ("SQ", "OB", "OW", "UN", "US", "SS", "CS", "AS"):
            text = str(elem.value).strip()
            if len(text) >= 6:
                values.add(text)
    return values


def check_deidentified(original: bytes, stored: bytes) -> None:
    """Assert, tag by tag, that the stored file keeps nothing the basic profile removes or replaces."""
    before = pydicom.dcmread(io.BytesIO(original))
    after = pydicom.dcmread(io.BytesIO(stored))
    originals = {int(e.tag): e.value for _, e in _walk(before)}
    assert after.PatientIdentityRemoved == "YES" and after.DeidentificationMethod == METHOD
    for where, elem in _walk(after) + _walk(after.file_meta):
        tag = int(elem.tag)
        assert not elem.tag.is_private, f"private attribute {where} survived"
        assert not 0x6000 <= tag >> 16 <= 0x601E, f"overlay {where} survived"
        code = _action(tag)
        if code is None or tag in OWN or elem.VR == "SQ":
            continue
        old = originals.get(tag)
        assert not code.startswith("X") or elem.VR in ("DA", "DT"), f"{where} ({code}) should be removed"
        if old not in (None, "", b"") and elem.value not in (None, "", b""):
            assert elem.value != old, f"{where} ({code}) kept its original value {old!r}"
        if elem.VR == "UI" and elem.value:
            assert str(elem.value).startswith("2.25."), f"{where} UID not replaced"
    text = stored.decode("latin-1")
    for value in _identifying_strings(before):
        assert value not in text, f"identifier {value!r} found in the stored bytes"


def test_synthetic_study_loses_every_profile_attribute() -> None:
    raw = synthetic_dicom()
    result = deidentify_bytes(raw, key=KEY)
    check_deidentified(raw, result.data)
    ds = pydicom.dcmread(io.BytesIO(result.data))
    for gone in ("OtherPatientIDs", "PatientAddress", "InstitutionName", "StationName", "ImageComments"):
        assert gone not in ds or not ds[gone].value, gone
    assert ds.PatientID == patient_pseudonym(KEY, "PAT-0001") == result.pseudonym
    assert ds.PatientBirthDate == "" and ds.StudyTime in ("", "000000")
    # Dates are shifted, consistently, by 1 to 3650 days back; the pixel data is untouched.
    assert ds.StudyDate == ds.SeriesDate == ds.ContentDate and ds.StudyDate < "20240315"
    assert ds.PixelData == pydicom.dcmread(io.BytesIO(raw)).PixelData
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert b"Jane" not in result.data and b"Doe^" not in result.data


def test_uids_and_pseudonyms_are_keyed_and_consistent() -> None:
    raw = synthetic_dicom()
    a, b = deidentify_bytes(raw, key=KEY), deidentify_bytes(raw, key=KEY)
    other = deidentify_bytes(raw, key=KEY + "2")
    assert a.data == b.data  # deterministic: a study sent twice is recognised
    assert a.study_uid == keyed_uid(KEY, pydicom.dcmread(io.BytesIO(raw)).StudyInstanceUID)
    assert other.study_uid != a.study_uid and other.pseudonym != a.pseudonym
    # Another study of the same patient keeps the patient's pseudonym and date shift.
    again = pydicom.dcmread(io.BytesIO(deidentify_bytes(synthetic_dicom(), key=KEY).data))
    first = pydicom.dcmread(io.BytesIO(a.data))
    assert again.PatientID == first.PatientID and again.StudyDate == first.StudyDate
    assert again.StudyInstanceUID != first.StudyInstanceUID


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name[:24])
def test_real_fixtures_are_stored_deidentified(path: Path, tmp_path: Path) -> None:
    """The intake path itself (validate_file): what would be stored lists no profile attribute's value."""
    raw = path.read_bytes()
    settings = Settings(data_dir=tmp_path, deid_key=KEY)
    checked = validate_file(path.name, raw, settings)
    if not checked.ok:
        assert "could not be decoded" in (checked.error or "") and checked.data is None
        return
    assert checked.data != raw and checked.patient_key
    check_deidentified(raw, checked.data)


def test_the_three_rg1_files_are_one_patient_and_one_study(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, deid_key=KEY)
    rg1 = [p for p in fixture_paths() if p.name.startswith("wg04_RG1")]
    assert len(rg1) == 3
    stored = [validate_file(p.name, p.read_bytes(), settings) for p in rg1]
    assert len({s.patient_key for s in stored}) == 1
    studies = {pydicom.dcmread(io.BytesIO(s.data)).StudyInstanceUID for s in stored}
    assert len(studies) == 1
