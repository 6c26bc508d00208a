"""The DICOM C-STORE receiver (a pynetdicom SCP): studies pushed by modalities and PACS become batches.

`cxr dicom-listen` runs it (`cxr run` starts it beside web and worker). Each instance goes through the same
intake as an upload (intake.files: content checks, full DICOM decode, de-identification); what arrives in one
association, or from one calling AE title within CXR_DICOM_BATCH_WINDOW_S, becomes one batch owned by
CXR_DICOM_OWNER, queued when each association closes.

Out of scope is refused with a DICOM status and a logged reason (`scope_problem`): not CR/DX, a lateral view,
multi-frame, no pixel data, DX "for processing"; transfer syntaxes we cannot decode are not accepted at
association negotiation. Limits (config.py): associations, PDU size, instance size, time-outs. An instance is
written to a temporary file as it arrives (pynetdicom's chunked receive), not held in memory, and any failure
in its handler fails that instance only: the receiver answers the next one.

Plain Python: no Flask, no TensorFlow.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

from config import Settings
from intake.batches import ingest_files, start_batch
from store.audit import record_event
from store.db import session_scope
from store.studies import create_batch
from store.tables import Batch, Study, StudyStatus, User
from store.users import ensure_service_user

log = logging.getLogger("cxr.dicom")

# What intake.formats can decode (pydicom + pylibjpeg); other transfer syntaxes are refused at negotiation.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
MODALITIES = ("CR", "DX")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "XTABLE LATERAL")
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

# C-STORE statuses (PS3.4 Table B.2-1): 0xA7xx out of resources, 0xA9xx data set does not match the SOP class,
# 0xCxxx cannot understand. The Cxxx codes below are ours, so a sender's log tells the reasons apart.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
OUT_OF_SCOPE = 0xC001
UNREADABLE = 0xC002
INTERNAL_ERROR = 0xC003


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the C-STORE status and a readable reason (logged and sent back)."""

    status: int
    reason: str


def scope_problem(ds: Dataset, transfer_syntax: str | None = None) -> Refusal | None:
    """Why this instance is out of scope for chest screening, from its header alone; None when in scope."""
    if transfer_syntax is not None and transfer_syntax not in TRANSFER_SYNTAXES:
        return Refusal(OUT_OF_SCOPE, f"unsupported transfer syntax {transfer_syntax}")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Refusal(DOES_NOT_MATCH, "no pixel data")
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in MODALITIES:
        return Refusal(OUT_OF_SCOPE, f"modality {modality or 'missing'} is not CR or DX")
    if str(ds.get("SOPClassUID", "")) == DX_FOR_PROCESSING:
        return Refusal(OUT_OF_SCOPE, "DX for processing (raw detector data), not for presentation")
    view = str(ds.get("ViewPosition", "") or "").upper().strip()
    if view in LATERAL_VIEWS:
        return Refusal(OUT_OF_SCOPE, f"lateral view ({view}); only frontal chest views are screened")
    frames = ds.get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        return Refusal(DOES_NOT_MATCH, f"invalid NumberOfFrames {frames!r}")
    if n_frames > 1:
        return Refusal(OUT_OF_SCOPE, f"multi-frame image ({n_frames} frames)")
    return None


def _status(code: int, reason: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if reason:
        ds.ErrorComment = reason[:64]  # LO: 64 characters at most
    return ds


@dataclass
class _OpenBatch:
    batch_id: int
    last_seen: float
    received: int = 0


class Receiver:
    """One C-STORE SCP: its AE, its open batches (per association and per calling AE) and its server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._by_ae: dict[str, _OpenBatch] = {}
        self._by_assoc: dict[int, _OpenBatch] = {}
        self._server = None
        with session_scope(settings.database_url) as session:
            self.owner_id = ensure_service_user(session, username=settings.dicom_owner).id
            session.commit()

    def make_ae(self) -> AE:
        """The application entity: AE title, supported contexts and every limit from the settings."""
        # Each instance is written to a temporary file as it arrives: a huge one does not sit in memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        s = self.settings
        ae = AE(ae_title=s.dicom_ae_title)
        for cx in AllStoragePresentationContexts:
            # Every storage class is negotiated, so that what is out of scope gets a status with a reason.
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = s.dicom_max_associations
        ae.maximum_pdu_size = s.dicom_max_pdu_bytes
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.dicom_timeout_s
        ae.connection_timeout = s.dicom_timeout_s
        if s.dicom_calling_aes:
            ae.require_calling_aet = list(s.dicom_calling_aes)
        return ae

    def start(self) -> None:
        """Listen on CXR_DICOM_HOST:CXR_DICOM_PORT in background threads."""
        handlers = [
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_CONN_CLOSE, self.on_close),
        ]
        address = (self.settings.dicom_host, self.settings.dicom_port)
        self._server = self.make_ae().start_server(address, block=False, evt_handlers=handlers)
        log.warning(
            "DICOM receiver %s listening on %s:%d", self.settings.dicom_ae_title, *self._server.server_address
        )

    @property
    def port(self) -> int:
        """The port actually bound (CXR_DICOM_PORT, or the free one chosen for port 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop listening; open associations are ended and their batches started."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def on_echo(self, event: evt.Event) -> int:
        """C-ECHO (verification): always success."""
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _batch_for(self, event: evt.Event) -> _OpenBatch:
        """The association's batch; else the calling AE's if it sent within the window; else a new one."""
        key = id(event.assoc)
        calling = event.assoc.requestor.ae_title
        now = time.monotonic()
        with self._lock:
            found = self._by_assoc.get(key)
            if found is None:
                recent = self._by_ae.get(calling)
                if recent is not None and now - recent.last_seen <= self.settings.dicom_batch_window_s:
                    found = recent
                else:
                    with session_scope(self.settings.database_url) as session:
                        owner = session.get(User, self.owner_id)
                        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                        batch = create_batch(
                            session,
                            owner=owner,
                            name=f"DICOM from {calling} {stamp}",
                            notes=f"Received by C-STORE at {self.settings.dicom_ae_title} from {calling}.",
                        )
                        session.commit()
                        found = _OpenBatch(batch_id=batch.id, last_seen=now)
                    self._by_ae[calling] = found
                self._by_assoc[key] = found
            found.last_seen = now
            found.received += 1
            return found

    def on_store(self, event: evt.Event) -> Dataset:
        """C-STORE: refuse what is out of scope, else ingest the instance into the batch (de-identified)."""
        calling = event.assoc.requestor.ae_title
        try:
            return self._store(event, calling)
        except Exception as exc:  # noqa: BLE001 - one bad instance must never stop the receiver
            log.exception("C-STORE from %s failed", calling)
            return _status(INTERNAL_ERROR, f"internal error ({type(exc).__name__})")

    def _store(self, event: evt.Event, calling: str) -> Dataset:
        path = Path(event.dataset_path)
        size = path.stat().st_size
        if size > self.settings.dicom_max_instance_bytes:
            refusal = Refusal(OUT_OF_RESOURCES, f"instance is {size} bytes, over the limit")
            return self._refuse(calling, refusal)
        try:
            header = pydicom.dcmread(path, stop_before_pixels=False, defer_size=1024, force=False)
        except Exception as exc:  # noqa: BLE001 - a malformed data set is this instance's problem only
            return self._refuse(calling, Refusal(UNREADABLE, f"unreadable data set ({type(exc).__name__})"))
        refusal = scope_problem(header, str(event.context.transfer_syntax))
        if refusal is not None:
            return self._refuse(calling, refusal)
        batch = self._batch_for(event)
        name = f"{calling} {batch.received:04d} {header.get('Modality', '')} {header.get('ViewPosition', '')}"
        with session_scope(self.settings.database_url) as session:
            (study_id,) = ingest_files(
                session,
                batch=session.get(Batch, batch.batch_id),
                files=[(name.strip() + ".dcm", path.read_bytes())],
                settings=self.settings,
            )
            session.commit()
            study = session.get(Study, study_id)
            status, error = study.status, study.error
        if status == StudyStatus.FAILED:
            # Kept as a FAILED study (the batch shows why) and refused, so the sender knows too.
            log.warning("instance from %s stored as failed study %d: %s", calling, study_id, error)
            return _status(UNREADABLE, error or "unreadable")
        log.info("instance from %s stored as study %d of batch %d", calling, study_id, batch.batch_id)
        return _status(SUCCESS)

    def _refuse(self, calling: str, refusal: Refusal) -> Dataset:
        log.warning("refused an instance from %s: 0x%04X %s", calling, refusal.status, refusal.reason)
        return _status(refusal.status, refusal.reason)

    def on_close(self, event: evt.Event) -> None:
        """Connection closed (released, aborted or timed out): queue what the association brought."""
        with self._lock:
            found = self._by_assoc.pop(id(event.assoc), None)
        if found is None:
            return
        try:
            self.start_batch(found.batch_id, calling=event.assoc.requestor.ae_title)
        except Exception:  # noqa: BLE001 - the studies stay RECEIVED; the next association retries
            log.exception("starting batch %d failed", found.batch_id)

    def start_batch(self, batch_id: int, *, calling: str) -> list[int]:
        """RECEIVED -> QUEUED for the batch's studies, commit, then enqueue (intake.batches.start_batch)."""
        with session_scope(self.settings.database_url) as session:
            batch = session.get(Batch, batch_id)
            result = start_batch(session, batch=batch, settings=self.settings)
            record_event(
                session,
                user_id=self.owner_id,
                action="batch.dicom",
                target=f"batch:{batch_id}",
                details={"calling_ae": calling, "queued": len(result.queued)},
            )
            session.commit()
        log.warning("batch %d from %s: %d studies queued", batch_id, calling, len(result.queued))
        return result.queued


def serve(settings: Settings, stop: threading.Event) -> None:
    """Run a receiver until stop is set (the `cxr dicom-listen` command)."""
    receiver = Receiver(settings)
    receiver.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        receiver.stop()
