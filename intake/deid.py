"""De-identification of DICOM on ingest: PS3.15 Annex E Basic Application Level Confidentiality Profile.

Every DICOM that becomes a study (upload, CLI, C-STORE receiver) is rewritten here before it is stored:

- the profile's attribute table (Table E.1-1, as packaged by dicom-anonymizer, edition 2026c) decides each
  attribute's fate: X removed, Z emptied, D replaced by a dummy, U (UIDs) replaced; a tag listed with a choice
  (X/Z, X/D, Z/D, X/Z/D) takes the most protective one that keeps the file valid;
- UIDs are replaced by a keyed hash (``2.25.<decimal>``), so one source UID always maps to one new UID:
  the instances of one study stay one study, and a study sent twice is recognised;
- dates and date-times are shifted by a keyed per-patient number of days (the "Retain Longitudinal Temporal
  Information with Modified Dates" option): intervals between one patient's studies survive, calendar dates
  do not; times are emptied;
- PatientID and PatientName become a keyed pseudonym of the PatientID (HMAC-SHA-256 with CXR_DEID_KEY), so a
  patient's studies stay together for the patient-grouped retraining split, without the identifier;
- private attributes and overlays are removed; PatientIdentityRemoved, DeidentificationMethod and its code
  sequence record what was done.

Pixel data is not touched (burned-in text is not detected: see docs/dicom.md). Plain Python: pydicom and the
profile table only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

PROFILE_EDITION = "dicomfields_2026c"
METHOD = "PS3.15 E.1 Basic Profile; keyed UIDs; shifted dates"
# The profile and the option applied (PS3.16 CID 7050, De-identification Method).
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
MAX_SHIFT_DAYS = 3650
DUMMY_TEXT = "ANONYMIZED"

# Attributes the profile lists but which this service must rewrite in its own way (not by the table).
PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
OTHER_PATIENT_IDS = 0x00101000


class DeidError(ValueError):
    """A DICOM file could not be de-identified (then it is not stored)."""


@dataclass(frozen=True)
class DeidResult:
    """The de-identified file and the keys the study row keeps."""

    data: bytes
    pseudonym: str
    study_uid: str
    sop_instance_uid: str


def keyed_hex(key: str, purpose: str, value: str) -> str:
    """HMAC-SHA-256 of value under key, separated by purpose (one key, independent uses)."""
    return hmac.new(key.encode(), f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def patient_pseudonym(key: str, raw: str | None) -> str | None:
    """Keyed pseudonym of a patient identifier (64 hex digits, fits PatientID), or None for an empty one."""
    if raw is None or not str(raw).strip():
        return None
    return keyed_hex(key, "patient", str(raw).strip())


def keyed_uid(key: str, uid: str) -> str:
    """A new UID (2.25 root) that depends only on key and the old UID: the same study keeps one UID."""
    # 2.25.<unsigned integer of at most 128 bits> is PS3.5 B.2's UUID-derived form: no registered root needed.
    return "2.25." + str(int(keyed_hex(key, "uid", uid)[:32], 16))


@cache
def profile_actions() -> dict[tuple[int, ...], str]:
    """Tag (or masked tag range) -> the action code of Table E.1-1 ("X", "Z", "D", "U", "X/Z", ...)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tables = dicom_anonymization_database_selector(PROFILE_EDITION)
    codes = {
        "D_TAGS": "D",
        "Z_TAGS": "Z",
        "X_TAGS": "X",
        "U_TAGS": "U",
        "Z_D_TAGS": "Z/D",
        "X_Z_TAGS": "X/Z",
        "X_D_TAGS": "X/D",
        "X_Z_D_TAGS": "X/Z/D",
        "X_Z_U_STAR_TAGS": "X/Z/U*",
    }
    actions: dict[tuple[int, ...], str] = {}
    for table, code in codes.items():
        for tag in tables[table]:
            actions[tuple(tag)] = code
    return actions


def profile_tags() -> list[tuple[int, ...]]:
    """Every tag (or masked range) the basic profile acts on: what a test checks is gone or changed."""
    return sorted(profile_actions())


def _action_for(tag: int) -> str | None:
    actions = profile_actions()
    group, element = tag >> 16, tag & 0xFFFF
    code = actions.get((group, element))
    if code is not None:
        return code
    for key, masked in _masked_ranges():
        g, e, gm, em = key
        if group & gm == g & gm and element & em == e & em:
            return masked
    return None


@cache
def _masked_ranges() -> tuple[tuple[tuple[int, int, int, int], str], ...]:
    return tuple((k, v) for k, v in profile_actions().items() if len(k) == 4)  # type: ignore[misc]


def _shift_date(value: str, days: int) -> str:
    try:
        day = dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day + dt.timedelta(days=days)).strftime("%Y%m%d")


def _dummy(elem: pydicom.DataElement, shift: Callable[[str], str]) -> object:
    """A replacement value consistent with the VR (the profile's "D")."""
    vr = elem.VR
    if vr == "DA":
        return shift(str(elem.value)) if elem.value else ""
    if vr == "DT":
        return (shift(str(elem.value)) + "000000") if elem.value else ""
    if vr == "TM":
        return "000000"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "UV", "SV"):
        return 0
    if vr == "SQ":
        return Sequence([])
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b""
    if vr == "UI":
        return ""
    if vr == "AS":
        return "000Y"
    if vr in ("CS", "AE"):
        return "ANON"
    if vr == "PN":
        return "Anonymized"
    return DUMMY_TEXT


def _apply(ds: Dataset, *, key: str, days: int, pseudonym: str) -> None:
    """Apply the profile to ds and, recursively, to every item of every sequence it keeps."""

    def shift(value: str) -> str:
        return _shift_date(value, days)

    for elem in list(ds):
        tag = int(elem.tag)
        if elem.tag.is_private:
            continue  # removed as a whole afterwards
        if tag == PATIENT_ID:
            elem.value = pseudonym
            continue
        if tag == PATIENT_NAME:
            elem.value = f"CXR^{pseudonym[:16]}"
            continue
        code = _action_for(tag)
        if code is None:
            if elem.VR == "SQ":
                for item in elem.value:
                    _apply(item, key=key, days=days, pseudonym=pseudonym)
            elif elem.VR == "UI" and elem.value and tag in _UID_REFERENCES:
                elem.value = keyed_uid(key, str(elem.value))
            continue
        if code == "U" or (code == "X/Z/U*" and elem.VR == "UI"):
            if elem.VR == "UI" and elem.value:
                values = (
                    elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
                )
                new = [keyed_uid(key, str(v)) for v in values]
                elem.value = new if len(new) > 1 else new[0]
            elif elem.VR == "SQ":
                for item in elem.value:
                    _apply(item, key=key, days=days, pseudonym=pseudonym)
            continue
        if elem.VR in ("DA", "DT") and tag not in _DATES_REMOVED and code != "X":
            # Retain Longitudinal Temporal Information with Modified Dates: shifted, so one patient's studies
            # keep their order and intervals, while no real date is kept.
            elem.value = _dummy(elem, shift)
            continue
        if code.startswith("X"):
            del ds[elem.tag]
        elif code in ("Z", "Z/D"):
            elem.value = Sequence([]) if elem.VR == "SQ" else ("" if elem.VR not in _BINARY else b"")
        else:  # "D"
            elem.value = _dummy(elem, shift)


# Type 2 attributes of the Patient and General Study modules (present even when unknown).
_TYPE2 = (
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_META_DROP = {0x00020013, 0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102}
IMPLEMENTATION_VERSION = "CXR_DEID_1"
# Dates emptied even under the modified-dates option: a shifted birth date would still give the age.
_DATES_REMOVED = {0x00100030}
_BINARY = {"OB", "OW", "OD", "OF", "OL", "OV", "UN"}
# UIDs the table does not list but which point at instances whose UIDs it replaces: keep references valid.
_UID_REFERENCES = {0x00081155, 0x0020000D, 0x0020000E, 0x00080018, 0x00200052}


def _mark(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def deidentify_dataset(ds: Dataset, *, key: str, fallback_patient: str | None = None) -> str:
    """De-identify ds in place (see the module docstring); returns the patient pseudonym used."""
    if not key:
        raise DeidError("no de-identification key is configured (CXR_DEID_KEY)")
    raw_patient = str(ds.get("PatientID", "") or "").strip() or (fallback_patient or "").strip()
    # Without any patient identifier, the study stands for its own patient: its studies still group together.
    pseudonym = patient_pseudonym(key, raw_patient) or patient_pseudonym(
        key, "study:" + str(ds.get("StudyInstanceUID", ""))
    )
    assert pseudonym is not None
    days = -(1 + int(keyed_hex(key, "dates", pseudonym)[:8], 16) % MAX_SHIFT_DAYS)
    # Private attributes first (PS3.15: removed by the basic profile); overlays and curves are in the table.
    ds.remove_private_tags()
    _apply(ds, key=key, days=days, pseudonym=pseudonym)
    for group in {int(e.tag) >> 16 for e in ds if 0x6000 <= (int(e.tag) >> 16) <= 0x601E}:
        for elem in [e for e in ds if int(e.tag) >> 16 == group]:
            del ds[elem.tag]
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")  # Type 2: present, empty; results built from this file need them
    if "PatientID" not in ds:
        ds.PatientID = pseudonym
    if "PatientName" not in ds:
        ds.PatientName = f"CXR^{pseudonym[:16]}"
    _mark(ds)
    return pseudonym


def deidentify_bytes(data: bytes, *, key: str, fallback_patient: str | None = None) -> DeidResult:
    """De-identify a DICOM Part 10 file; the pixel data and transfer syntax are kept as they are."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:  # noqa: BLE001 - any parser failure means: not stored
        raise DeidError(f"the DICOM header could not be read ({type(exc).__name__})") from exc
    try:
        # pydicom parses elements lazily: a malformed one (an unknown VR, a bad length) fails only here.
        pseudonym = deidentify_dataset(ds, key=key, fallback_patient=fallback_patient)
        meta = ds.file_meta if isinstance(getattr(ds, "file_meta", None), FileMetaDataset) else None
        meta = meta or FileMetaDataset()
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for tag in [t for t in list(meta.keys()) if int(t) in _META_DROP]:  # noqa: SIM118 - tags, not elements
            del meta[tag]  # the sender's AE titles and private meta information: not ours to keep
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        ds.file_meta = meta
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - found by tests/intake/test_fuzz_decoders.py: never a 500
        raise DeidError(f"the DICOM data set could not be de-identified ({type(exc).__name__})") from exc
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001
        raise DeidError(f"the de-identified file could not be written ({type(exc).__name__})") from exc
    return DeidResult(
        data=buf.getvalue(),
        pseudonym=pseudonym,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
    )
