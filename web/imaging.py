"""Pictures and facts a study page shows, made from the stored image: a display PNG and a DICOM summary.

Decoding goes through intake.formats (the one owner of image formats); only the four technical header fields
below are read from a DICOM file, never a patient or institution field, de-identified or not.
"""

from __future__ import annotations

import io
import logging

from intake.formats import ImageDecodeError, decode_image, sniff_format, thumbnail_png

log = logging.getLogger(__name__)

DISPLAY_SIDE = 2048  # enough for a 1280 px screen at 2x zoom, small enough to send quickly
# (label, DICOM keyword): what a reader needs to judge the image, nothing that identifies anyone.
DICOM_FIELDS = (
    ("Modality", "Modality"),
    ("View", "ViewPosition"),
    ("Bits stored", "BitsStored"),
    ("Photometric interpretation", "PhotometricInterpretation"),
)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}


def display_png(data: bytes, *, max_pixels: int) -> bytes | None:
    """An 8-bit PNG of the stored image (DICOM windowed as the model sees it), or None when undecodable."""
    try:
        return thumbnail_png(decode_image(data, max_pixels=max_pixels), DISPLAY_SIDE)
    except ImageDecodeError as exc:
        log.info("image not displayable: %s", exc)
        return None


def dicom_summary(data: bytes) -> list[tuple[str, str]]:
    """Modality, view, bit depth and photometric interpretation of a DICOM file; [] for other formats."""
    if sniff_format(data) != "dicom":
        return []
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    except Exception as exc:  # noqa: BLE001 - a header we cannot read is shown as absent, in one log line
        log.info("DICOM header not readable: %s: %s", type(exc).__name__, exc)
        return []
    out = []
    for label, keyword in DICOM_FIELDS:
        value = ds.get(keyword)
        out.append((label, str(value) if value not in (None, "") else "—"))
    return out
