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

import io
import logging
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from config import Settings
from intake.deid import DeidError, deidentify_bytes, patient_pseudonym
from intake.formats import (
    MIN_IMAGE_SIDE,
    ImageDecodeError,
    check_structure,
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


def iter_checked(
    files: Iterable[tuple[str, bytes]], settings: Settings, *, patient_id: str | None
) -> Iterator[ValidatedFile]:
    """Validate each file (zips expanded) up to the per-upload cap; files over it become one FAILED row."""
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
