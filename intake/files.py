"""Files and zips in, validated files out: what each file is, by content, and whether it may become a study.

Formats are decided by magic bytes, never by the file name; the pixel count is checked from the headers before
any pixel is decoded (intake.formats). Zip archives are expanded in memory only; member names are metadata,
never paths. PNG and JPEG get a structural check (chunk lengths and CRCs, JPEG markers): truncated, corrupt,
empty, mislabelled and oversized files fail here. Then the input-validity gate (intake.validity: a reduced
decode, a few ms) refuses what is not an upright chest film (blank, noise, colour, documents, rotated or
inverted films, corrupt JPEG data) with a readable "Not assessable" reason: the uploader learns it at once
and the inference worker spends its core on the model only. DICOM (rare, and its codecs fail in more ways)
is decoded in full here, then de-identified (intake.deid): what is stored carries no direct identifier, and
the patient key is a keyed pseudonym (CXR_DEID_KEY) of the DICOM PatientID or of the patient ID given at
upload.
"""

from __future__ import annotations

import contextvars
import io
import logging
import re
import threading
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from config import Settings
from intake.deid import DeidError, deidentify_bytes, patient_pseudonym
from intake.formats import (
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    check_structure,
    decode_cost,
    decode_image,
    image_dimensions,
    sniff_format,
    thumbnail_png,
)
from intake.validity import NOT_ASSESSABLE, assess_bytes, assess_gray

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 160
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# Control characters, and the bidirectional controls (U+202A-202E, U+2066-2069, U+200E/200F) that can make
# "evil\u202egnp.exe" display as "evilexe.png": removed from every stored (hence displayed) file name.
_CONTROL = re.compile("[\x00-\x1f\x7f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# macOS archive litter: not images, and failing each of them would only bury the real results.
_ZIP_JUNK = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$|\._)")


_INFLATE_CHUNK = 1 << 20  # zip members are read this many inflated bytes at a time
BUSY_RETRY_S = 10  # the Retry-After hint when the process budget is spent (others' uploads finish first)


class UploadRefused(Exception):
    """The whole upload is refused and nothing of it is stored; the message names the limit."""


class UploadTooLarge(UploadRefused):
    """A zip inflates beyond a limit on its own (per file, per upload): the web answers 413."""


class ServerBusy(UploadRefused):
    """The process's bytes in flight (every upload's inflated and decoded bytes) are at their limit: 429."""

    retry_after = BUSY_RETRY_S


class ByteBudget:
    """Bytes held by every thread of this process at once, against one ceiling (CXR_MAX_INFLIGHT_BYTES).

    A reservation larger than the whole ceiling is granted only when nothing else is held, so one image as
    large as the pixel cap still decodes when the process is otherwise idle.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def take(self, n: int, limit: int) -> bool:
        """Reserve n bytes if they fit under limit (or nothing else is held); False when they do not."""
        with self._lock:
            if self.in_flight and self.in_flight + n > limit:
                return False
            self.in_flight += n
            self.peak = max(self.peak, self.in_flight)
            return True

    def give(self, n: int) -> None:
        """Return n reserved bytes."""
        with self._lock:
            self.in_flight -= n


PROCESS_BUDGET = ByteBudget()


class UploadAccount:
    """One upload's bytes: inflated in all (CXR_MAX_INFLATED_BYTES) and held now (the process budget)."""

    def __init__(self, settings: Settings, budget: ByteBudget = PROCESS_BUDGET) -> None:
        self.settings = settings
        self.budget = budget
        self.inflated = 0
        self.held = 0

    def hold(self, n: int, what: str) -> None:
        """Reserve n bytes of the process budget for this upload, or raise ServerBusy naming the limit."""
        limit = self.settings.max_inflight_bytes
        if not self.budget.take(n, limit):
            raise ServerBusy(
                f"The server is busy with other uploads ({what} would pass the {limit / 2**20:.0f} MB it "
                f"holds for uploads at once, CXR_MAX_INFLIGHT_BYTES); nothing was stored. "
                f"Try again in {BUSY_RETRY_S} s."
            )
        self.held += n

    def inflate(self, n: int, member: str) -> None:
        """Count n freshly inflated bytes of member against the upload's limit, then hold them."""
        limit = self.settings.max_inflated_bytes
        self.inflated += n
        if self.inflated > limit:
            raise UploadTooLarge(
                f"The zip archives of this upload expand beyond {limit / 2**20:.0f} MB "
                f"(reached while reading {member}); nothing was stored. Split it into several batches."
            )
        self.hold(n, f"expanding {member}")

    def release(self, n: int) -> None:
        """Bytes this upload no longer holds (a refused file's bytes were dropped)."""
        n = min(n, self.held)
        self.budget.give(n)
        self.held -= n

    def close(self) -> None:
        """Give back everything still held (the upload is stored or refused)."""
        self.release(self.held)


_ACCOUNT: contextvars.ContextVar[UploadAccount | None] = contextvars.ContextVar("cxr_upload", default=None)


@contextmanager
def upload_scope(settings: Settings, budget: ByteBudget = PROCESS_BUDGET) -> Iterator[UploadAccount]:
    """Hold this upload's bytes until the block ends (the web wraps a whole request, until it is stored)."""
    account = UploadAccount(settings, budget)
    token = _ACCOUNT.set(account)
    try:
        yield account
    finally:
        _ACCOUNT.reset(token)
        account.close()


@dataclass
class ValidatedFile:
    """The outcome of checking one file: what a study needs, or the readable error."""

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

    def as_study(self) -> dict:
        """The keyword arguments of store.studies.add_studies for this file."""
        return {
            "filename": self.name,
            "data": self.data,
            "fmt": self.fmt,
            "width": self.width,
            "height": self.height,
            "thumbnail_png": self.thumbnail_png,
            "patient_key": self.patient_key,
            "error": self.error,
            # Rejected bytes are not kept, but their size is still worth showing.
            "size_bytes": self.size_bytes,
        }


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


def validate_file(
    name: str, data: bytes, settings: Settings, *, patient_id: str | None = None
) -> ValidatedFile:
    """Check one file by content: magic bytes, header size vs the pixel cap, structure; no PNG/JPEG decode.

    PNG and JPEG get a structural check and the validity gate's reduced decode; DICOM is decoded in full.
    An image the gate refuses is FAILED with its reason (bytes kept for the study page, never scored).
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
            gray = decode_image(data, max_pixels=settings.max_image_pixels)
            thumb = thumbnail_png(gray, THUMBNAIL_SIDE)
            verdict = assess_gray(gray)
        else:
            check_structure(data, fmt)
            verdict = assess_bytes(data, max_pixels=settings.max_image_pixels)
    except ImageDecodeError as exc:
        return _failed(name, size, f"Unreadable {fmt.upper()} file: {exc}.", fmt, (width, height))
    except Exception as exc:  # noqa: BLE001 - a decoder (or gate) crash on a hostile file must not become a 500
        log.warning("decoder error on %r: %r", name, exc)
        return _failed(
            name, size, f"Unreadable {fmt.upper()} file: the decoder failed ({type(exc).__name__}).", fmt
        )
    if fmt == "dicom":
        # What is stored is de-identified (PS3.15 basic profile, intake.deid); the raw file goes no further.
        try:
            deid = deidentify_bytes(data, key=settings.deid_key, fallback_patient=patient_id)
        except DeidError as exc:
            return _failed(name, size, f"Unreadable DICOM file: {exc}.", fmt, (width, height))
        data, patient_key = deid.data, deid.pseudonym
    else:
        patient_key = patient_pseudonym(settings.deid_key, patient_id)
    return ValidatedFile(
        name=name,
        data=data,
        size_bytes=len(data),
        fmt=fmt,
        width=width,
        height=height,
        thumbnail_png=thumb,
        patient_key=patient_key,
        # Refused by the validity gate: FAILED with its reason, the (de-identified) bytes kept so the study
        # page can show what was refused.
        error=None if verdict.ok else (verdict.reason or NOT_ASSESSABLE),
    )


def _unsafe_member(name: str) -> bool:
    norm = name.replace("\\", "/")
    return (
        norm.startswith("/")
        or re.match(r"^[A-Za-z]:", norm) is not None
        or ".." in norm.split("/")
        or "\x00" in name
    )


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, member: str, account: UploadAccount) -> bytes:
    """A member's bytes, read a chunk at a time: refused as soon as it passes the per-file limit."""
    limit = account.settings.zip_member_max_bytes
    # Sized once from the header (zipfile never returns more than it declares; a larger one was refused):
    # no growth by copying, and the pages are only touched as bytes arrive.
    out = io.BytesIO(bytes(min(info.file_size, limit)))
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(_INFLATE_CHUNK):
                if out.tell() + len(chunk) > limit:
                    raise UploadTooLarge(_member_too_large(member, limit))
                account.inflate(len(chunk), member)
                out.write(chunk)
    except BaseException:
        account.release(out.tell())  # a member that fails half-way holds nothing
        raise
    out.truncate()
    return out.getvalue()


def _member_too_large(member: str, limit: int) -> str:
    return (
        f"The zip archive holds a file that expands beyond {limit / 2**20:.0f} MB ({member}), the limit "
        "per file; nothing was stored."
    )


def expand_zip(
    name: str, data: bytes, settings: Settings, *, max_members: int, account: UploadAccount | None = None
) -> Iterator[tuple[str, bytes | str]]:
    """Yield (display name, member bytes) for each member, or (display name, error text) when refused.

    Nothing is written to disk. Members are inflated a chunk at a time and counted as they inflate (not as
    their headers say): past the per-file (CXR_ZIP_MEMBER_MAX_BYTES) or per-upload (CXR_MAX_INFLATED_BYTES)
    limit the whole upload is refused (UploadTooLarge), and past the process's bytes in flight
    (CXR_MAX_INFLIGHT_BYTES) it is refused as busy (ServerBusy). Declared sizes refuse early.
    """
    account = account or UploadAccount(settings)
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
    budget = settings.max_inflated_bytes - account.inflated
    declared = sum(i.file_size for i in infos)
    if declared > budget:
        raise UploadTooLarge(
            f"The zip archive {name} would expand to {declared / 2**20:.0f} MB, over the "
            f"{settings.max_inflated_bytes / 2**20:.0f} MB limit per upload; it was not expanded and nothing "
            "was stored. Split it into several batches."
        )
    biggest = max(infos, key=lambda i: i.file_size)
    if biggest.file_size > settings.zip_member_max_bytes:
        raise UploadTooLarge(_member_too_large(f"{name}/{biggest.filename}", settings.zip_member_max_bytes))
    for info in infos:
        member = f"{name}/{clean_filename(info.filename, keep_dirs=True)}"[:512]
        if _unsafe_member(info.filename):
            yield member, "Unsafe path inside the zip archive (absolute or containing '..'); it was not read."
            continue
        if info.flag_bits & 0x1:
            yield member, "The zip member is encrypted and cannot be read."
            continue
        try:
            blob = _inflate(zf, info, member, account)
        except UploadRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt member (zipfile raises many kinds) is its own row
            yield member, f"The zip member could not be extracted ({type(exc).__name__})."
            continue
        yield member, blob
        del blob  # not kept here while the next member inflates


def iter_checked(
    files: Iterable[tuple[str, bytes]], settings: Settings, *, patient_id: str | None
) -> Iterator[ValidatedFile]:
    """Validate each file (zips expanded) up to the per-upload cap; files over it become one FAILED row.

    Inflated and decoded bytes are counted against this upload's account (upload_scope, else one of its
    own for as long as this runs): a refused file's bytes are given back at once, a kept file's when the
    upload ends. An upload past a byte limit raises UploadRefused, and nothing of it should be stored.
    """
    scoped = _ACCOUNT.get()
    account = scoped or UploadAccount(settings)
    try:
        yield from _iter_checked(files, settings, patient_id, account)
    finally:
        if scoped is None:
            account.close()


def _iter_checked(
    files: Iterable[tuple[str, bytes]], settings: Settings, patient_id: str | None, account: UploadAccount
) -> Iterator[ValidatedFile]:
    remaining = settings.max_files_per_upload
    refused = 0
    for raw_name, data in files:
        name = clean_filename(raw_name)
        if remaining <= 0:
            refused += 1
            continue
        if is_zip(data):
            for member, content in expand_zip(name, data, settings, max_members=remaining, account=account):
                remaining -= 1
                if isinstance(content, str):
                    yield _failed(member, 0, content, "zip")
                else:
                    checked = _checked(member, content, settings, patient_id, account)
                    if checked.data is None:  # refused and dropped: no longer held
                        account.release(len(content))
                    del content
                    yield checked
            continue
        remaining -= 1
        yield _checked(name, data, settings, patient_id, account)
    if refused:
        yield _failed(
            f"({refused} more files)",
            0,
            f"{refused} files were not accepted: at most {settings.max_files_per_upload} files per upload.",
        )


def _checked(
    name: str, data: bytes, settings: Settings, patient_id: str | None, account: UploadAccount
) -> ValidatedFile:
    """validate_file, holding the decode's estimated memory meanwhile (DICOM: decoded in full at upload)."""
    cost = decode_cost(data) if sniff_format(data) == "dicom" else 0
    account.hold(cost, f"decoding {name}")
    try:
        return validate_file(name, data, settings, patient_id=patient_id)
    finally:
        account.release(cost)
