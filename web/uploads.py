"""Upload validation, ingestion and submission as plain functions (no Flask): views, API and CLI share them.

Every file becomes a study: a valid image is stored RECEIVED, anything else FAILED with a reason a person can
read. Formats are decided by magic bytes, never by the file name; the pixel count is checked from the headers
before any pixel is decoded. Zip archives are expanded in memory only; member names are metadata, never paths.

Validation at upload is structural and cheap for PNG and JPEG (web.imagecheck: chunk lengths and CRCs, JPEG
markers; no pixel is decoded): truncated, corrupt, empty, mislabelled and oversized files fail here. A file
that passes these checks but whose pixel data still cannot be decoded is failed by the worker, which decodes
every image before inference, with the decoder's readable reason. DICOM (rare, and its codecs fail in more
ways) is still fully decoded at upload. Thumbnails are made on first request (web.batches), not here.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from config import Settings
from model.preprocess import (
    ImageDecodeError,
    decode_image,
    dicom_patient_id,
    image_dimensions,
    make_thumbnail,
    sniff_format,
    thumbnail_png,
)
from store.audit import record_event
from store.studies import add_studies, create_batch, hash_patient_key, mark_queued
from store.tables import Batch, Image, Study, StudyStatus, User
from web.imagecheck import check_structure

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 160
MIN_IMAGE_SIDE = 8  # model.preprocess.decode_image refuses anything smaller
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# macOS archive litter: not images, and failing each of them would only bury the real results.
_ZIP_JUNK = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$|\._)")


@dataclass
class ValidatedFile:
    """The outcome of checking one file: what add_studies needs, or the readable error."""

    name: str
    data: bytes | None
    size_bytes: int
    fmt: str = "unknown"
    width: int | None = None
    height: int | None = None
    thumbnail_png: bytes | None = None
    patient_key: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the file is a readable image."""
        return self.error is None


@dataclass
class StartResult:
    """What start_batch queued, and why enqueueing failed if it did."""

    queued: list[int] = field(default_factory=list)
    enqueue_error: str | None = None


@dataclass
class SubmitResult:
    """A new batch with its studies."""

    batch: Batch
    study_ids: list[int]
    failed: int
    start: StartResult


def clean_filename(name: str | None, *, keep_dirs: bool = False) -> str:
    """A display name: control characters removed, client-side directories dropped, at most 512 characters."""
    name = _CONTROL.sub("", name or "").strip()
    if not keep_dirs:
        # Browsers may send "C:\\fakepath\\x.png"; the directory is the client's business, not ours.
        name = re.split(r"[\\/]", name)[-1]
    return (name or "unnamed")[:512]


def is_zip(data: bytes) -> bool:
    """True when data starts like a zip archive."""
    return data[:4] in _ZIP_MAGICS


def _failed(
    name: str, size: int, error: str, fmt: str = "unknown", dims: tuple[int, int] | None = None
) -> ValidatedFile:
    w, h = dims or (None, None)
    return ValidatedFile(name=name, data=None, size_bytes=size, fmt=fmt, width=w, height=h, error=error)


def _placeholder_png() -> bytes:
    # A plain grey square with a darker cross: "no preview", without a broken-image icon in the report.
    img = np.full((THUMBNAIL_SIDE, THUMBNAIL_SIDE), 200, dtype=np.uint8)
    cv2.line(img, (40, 40), (THUMBNAIL_SIDE - 41, THUMBNAIL_SIDE - 41), 120, 6)
    cv2.line(img, (40, THUMBNAIL_SIDE - 41), (THUMBNAIL_SIDE - 41, 40), 120, 6)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("the placeholder preview could not be encoded")
    return buf.tobytes()


PLACEHOLDER_PNG = _placeholder_png()


def study_thumbnail(session: Session, *, study: Study) -> bytes | None:
    """The study's preview PNG, made from its stored image on first use and committed; None with no image.

    An image that cannot be decoded gets PLACEHOLDER_PNG (stored too, so it is not decoded on every view).
    """
    if study.thumbnail_png:
        return study.thumbnail_png
    if study.image_sha256 is None:
        return None
    data = session.scalar(select(Image.data).where(Image.sha256 == study.image_sha256))
    if not data:
        return None
    try:
        png = make_thumbnail(data, max_side=THUMBNAIL_SIDE)
    except ImageDecodeError:
        png = PLACEHOLDER_PNG
    except Exception as exc:  # noqa: BLE001 - a decoder crash must not become a 500; not stored, may be transient
        log.warning("preview of study %s failed: %r", study.id, exc)
        return PLACEHOLDER_PNG
    study.thumbnail_png = png
    try:
        session.commit()
    except Exception:  # noqa: BLE001 - e.g. a locked SQLite: serve the preview now, store it next time
        log.warning("preview of study %s not stored", study.id, exc_info=True)
        session.rollback()
    return png


def validate_file(
    name: str, data: bytes, settings: Settings, *, patient_id: str | None = None
) -> ValidatedFile:
    """Check one file by content: magic bytes, header size vs the pixel cap, structure; no PNG/JPEG decode.

    PNG and JPEG get a structural check only (web.imagecheck); one whose pixel data is undecodable despite a
    valid structure is FAILED later by the worker with the decoder's reason. DICOM is decoded in full here.
    """
    size = len(data)
    if size == 0:
        return _failed(name, 0, "The file is empty.")
    if size > settings.max_upload_bytes:
        return _failed(
            name, size, f"The file is larger than the {settings.max_upload_bytes // 2**20} MB limit."
        )
    fmt = sniff_format(data)
    if fmt is None:
        if is_zip(data):
            return _failed(name, size, "Zip archives inside a zip archive are not accepted.", "zip")
        return _failed(
            name,
            size,
            "Not a PNG, JPEG or DICOM image (checked by its content, not by its file name; "
            "DICOM files need the standard DICM preamble).",
        )
    try:
        width, height = image_dimensions(data)
    except ImageDecodeError as exc:
        return _failed(name, size, f"Unreadable {fmt.upper()} file: {exc}.", fmt)
    except Exception as exc:  # noqa: BLE001 - a header parser crash on a hostile file must not become a 500
        log.warning("header error on %r: %r", name, exc)
        return _failed(name, size, f"Unreadable {fmt.upper()} file: its header is malformed.", fmt)
    if width <= 0 or height <= 0:
        return _failed(name, size, f"Unreadable {fmt.upper()} file: the header gives no image size.", fmt)
    pixels = width * height
    if pixels > settings.max_image_pixels:
        # Refused from the header alone: a decompression bomb never reaches the decoder.
        reason = (
            f"The image is {width}×{height} pixels ({pixels / 1e6:.0f} megapixels), over the "
            f"{settings.max_image_pixels / 1e6:.0f} megapixel limit; it was not decoded."
        )
        return _failed(name, size, reason, fmt, (width, height))
    if min(width, height) < MIN_IMAGE_SIDE:
        return _failed(
            name,
            size,
            f"Unreadable {fmt.upper()} file: the image is too small to read ({width}×{height} pixels).",
            fmt,
            (width, height),
        )
    thumb = None
    try:
        if fmt == "dicom":
            # DICOM is rare and its codecs fail in many ways: decode it in full now; the preview is then free.
            thumb = thumbnail_png(decode_image(data, max_pixels=settings.max_image_pixels), THUMBNAIL_SIDE)
        else:
            check_structure(data, fmt)
    except ImageDecodeError as exc:
        return _failed(name, size, f"Unreadable {fmt.upper()} file: {exc}.", fmt, (width, height))
    except Exception as exc:  # noqa: BLE001 - a decoder crash on a hostile file must not become a 500
        log.warning("decoder error on %r: %r", name, exc)
        return _failed(
            name, size, f"Unreadable {fmt.upper()} file: the decoder failed ({type(exc).__name__}).", fmt
        )
    raw_patient = dicom_patient_id(data) if fmt == "dicom" else None
    return ValidatedFile(
        name=name,
        data=data,
        size_bytes=size,
        fmt=fmt,
        width=width,
        height=height,
        thumbnail_png=thumb,
        patient_key=hash_patient_key(raw_patient or patient_id),
    )


def _unsafe_member(name: str) -> bool:
    norm = name.replace("\\", "/")
    return (
        norm.startswith("/")
        or re.match(r"^[A-Za-z]:", norm) is not None
        or ".." in norm.split("/")
        or "\x00" in name
    )


def expand_zip(
    name: str, data: bytes, settings: Settings, *, max_members: int
) -> Iterator[tuple[str, bytes | str]]:
    """Yield (display name, member bytes) for each member, or (display name, error text) when refused.

    Nothing is written to disk. Caps: member count, total declared and actual uncompressed size.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir() and not _ZIP_JUNK.search(i.filename)]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
        yield name, "The zip archive is corrupt and could not be opened."
        return
    if not infos:
        yield name, "The zip archive holds no files."
        return
    if len(infos) > max_members:
        yield name, f"The zip archive holds {len(infos)} files, over the limit of {max_members} per upload."
        return
    budget = settings.max_upload_bytes
    declared = sum(i.file_size for i in infos)
    if declared > budget:
        yield (
            name,
            (
                f"The zip archive would expand to {declared / 2**20:.0f} MB, over the "
                f"{budget / 2**20:.0f} MB limit; it was not expanded."
            ),
        )
        return
    for info in infos:
        member = f"{name}/{clean_filename(info.filename, keep_dirs=True)}"[:512]
        if _unsafe_member(info.filename):
            yield member, "Unsafe path inside the zip archive (absolute or containing '..'); it was not read."
            continue
        if info.flag_bits & 0x1:
            yield member, "The zip member is encrypted and cannot be read."
            continue
        try:
            with zf.open(info) as fh:
                # Read at most the remaining budget + 1 byte: a lying header cannot make us inflate more.
                blob = fh.read(budget + 1)
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError) as exc:
            yield member, f"The zip member could not be extracted ({type(exc).__name__})."
            continue
        if len(blob) > budget:
            yield member, "The zip archive expands beyond the upload size limit; the rest was not read."
            return
        budget -= len(blob)
        yield member, blob


def _iter_checked(
    files: Iterable[tuple[str, bytes]], settings: Settings, *, patient_id: str | None
) -> Iterator[ValidatedFile]:
    remaining = settings.max_files_per_upload
    refused = 0
    for raw_name, data in files:
        name = clean_filename(raw_name)
        if remaining <= 0:
            refused += 1
            continue
        if is_zip(data):
            for member, content in expand_zip(name, data, settings, max_members=remaining):
                remaining -= 1
                if isinstance(content, str):
                    yield _failed(member, 0, content, "zip")
                else:
                    yield validate_file(member, content, settings, patient_id=patient_id)
            continue
        remaining -= 1
        yield validate_file(name, data, settings, patient_id=patient_id)
    if refused:
        yield _failed(
            f"({refused} more files)",
            0,
            f"{refused} files were not accepted: at most {settings.max_files_per_upload} files per upload.",
        )


def ingest_files(
    session: Session,
    *,
    batch: Batch,
    files: Iterable[tuple[str, bytes]],
    settings: Settings,
    patient_id: str | None = None,
) -> list[int]:
    """Store every file (zips expanded) as a study: RECEIVED if valid, FAILED with a reason if not.

    The whole upload goes to SQL in a few statements (store.studies.add_studies); returns the ids in order.
    """
    return add_studies(
        session,
        batch=batch,
        files=[
            {
                "filename": checked.name,
                "data": checked.data,
                "fmt": checked.fmt,
                "width": checked.width,
                "height": checked.height,
                "thumbnail_png": checked.thumbnail_png,
                "patient_key": checked.patient_key,
                "error": checked.error,
                # Rejected bytes are not kept, but their size is still worth showing.
                "size_bytes": checked.size_bytes,
            }
            for checked in _iter_checked(files, settings, patient_id=patient_id)
        ],
    )


def send_screen_chunks(study_ids: Sequence[int]) -> None:
    """Enqueue screening tasks by name through worker.app (Celery only; imported lazily, never TensorFlow)."""
    from worker.app import send_screen_chunks as send

    send(list(study_ids))


def start_batch(session: Session, *, batch: Batch, settings: Settings) -> StartResult:
    """RECEIVED -> QUEUED for the batch, commit, THEN enqueue: a worker must be able to see the rows."""
    received = list(
        session.scalars(
            select(Study.id).where(Study.batch_id == batch.id, Study.status == StudyStatus.RECEIVED)
        )
    )
    queued = mark_queued(session, study_ids=received, lease_s=settings.queued_lease_s)
    session.commit()
    result = StartResult(queued=queued)
    if queued:
        try:
            send_screen_chunks(queued)
        except Exception as exc:  # noqa: BLE001 - the batch is saved; the reconciler re-queues after the lease
            log.exception("enqueueing batch %s failed", batch.id)
            result.enqueue_error = f"{type(exc).__name__}: {exc}"
    return result


def submit_batch(
    session: Session,
    *,
    owner: User,
    name: str,
    notes: str,
    files: Iterable[tuple[str, bytes]],
    settings: Settings,
    patient_id: str | None = None,
) -> SubmitResult:
    """Create a batch, ingest its files, commit, then queue and enqueue its valid studies."""
    batch = create_batch(session, owner=owner, name=name, notes=notes)
    ids = ingest_files(session, batch=batch, files=files, settings=settings, patient_id=patient_id)
    n_failed = int(
        session.scalar(
            select(func.count(Study.id)).where(Study.batch_id == batch.id, Study.status == StudyStatus.FAILED)
        )
        or 0
    )
    record_event(
        session,
        user_id=owner.id,
        action="batch.upload",
        target=f"batch:{batch.id}",
        details={"studies": len(ids), "failed": n_failed},
    )
    # Commit the batch and its studies before anything is queued: nothing is lost if the broker is down.
    session.commit()
    start = start_batch(session, batch=batch, settings=settings)
    return SubmitResult(batch=batch, study_ids=ids, failed=n_failed, start=start)
