"""Image formats and pixel limits, in one place: magic bytes, header sizes, structure checks, decoding.

Used by intake (validating uploads, previews), model.preprocess (training, evaluation, serving) and the CLI.
Imports only numpy, OpenCV and pydicom: no Flask, no SQL, no TensorFlow, nothing else of ours.

- `sniff_format`: PNG, JPEG or DICOM from the magic bytes alone, never the file name.
- `image_dimensions`: (width, height) from the headers; `check_pixel_cap` refuses a decompression bomb
  before any pixel is decoded. OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS, set here and only here, before
  cv2 is imported) is a second line of defence behind it.
- `check_structure`: cheap PNG/JPEG integrity checks (chunk lengths and CRCs, JPEG markers) with no decoding.
- `decode_image`: PNG 8/16-bit, JPEG, DICOM (modality LUT, VOI LUT / window, else the data range, MONOCHROME1
  inversion, then 8 bits like the training images; force=False) -> 2-D float32 in [0, 1], bone bright.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib

# OpenCV's own decoder ceiling, read when cv2 first decodes: set before the import. The configured cap
# (CXR_MAX_IMAGE_PIXELS) is enforced from the headers first, by every decode path (decode_image).
DECODER_PIXEL_CEILING = 2**30
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DECODER_PIXEL_CEILING))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

# Decoder chatter ("Corrupt JPEG data: ...", pydicom's traceback for a bad codestream) would put a warning or
# a traceback on stderr for one bad file; our own code reports each failure as one readable line instead.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)

DEFAULT_MAX_PIXELS = 50_000_000
MIN_IMAGE_SIDE = 8  # decode_image refuses anything smaller


class ImageDecodeError(ValueError):
    """An uploaded image could not be read; the message is a sentence a clinician can read."""


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> str | None:
    """Return "png", "jpeg" or "dicom" from the magic bytes alone, or None."""
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:3] == _JPEG_MAGIC:
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def _not_an_image() -> ImageDecodeError:
    return ImageDecodeError("file is not a PNG, JPEG or DICOM image")


def _png_dimensions(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageDecodeError("PNG file is truncated or has no image header")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageDecodeError("JPEG file is corrupt (bad marker before the image header)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            raise ImageDecodeError("JPEG file is corrupt (invalid segment length)")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            if width == 0 or height == 0:
                raise ImageDecodeError("JPEG image header gives a zero width or height")
            return int(width), int(height)
        i += 2 + length
    raise ImageDecodeError("JPEG file is truncated or has no image header")


_DEFLATED_TS = b"1.2.840.10008.1.2.1.99"
# Deflated DICOM: pydicom inflates the whole data set at once, so a small file could expand without bound.
# It is inflated here first, in chunks, and refused past this many bytes per pixel of the pixel cap.
DEFLATE_BYTES_PER_PIXEL = 4
_INFLATE_CHUNK = 1 << 20


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _file_meta(data: bytes) -> tuple[bytes, int]:
    """(transfer syntax UID, offset of the data set) from the file meta group (explicit VR, little endian)."""
    pos, n, syntax = 132, len(data), b""
    while pos + 8 <= n:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > n:
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_at = pos + 8
        if element == 0x0010:
            syntax = data[value_at : value_at + length].rstrip(b"\x00 ")
        pos = value_at + length
    return syntax, pos


def _check_deflated_size(data: bytes, max_pixels: int) -> None:
    """Refuse a deflated DICOM whose data set inflates past DEFLATE_BYTES_PER_PIXEL x the pixel cap."""
    syntax, start = _file_meta(data)
    if syntax != _DEFLATED_TS:
        return
    limit = DEFLATE_BYTES_PER_PIXEL * max_pixels
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data)
    total = 0
    try:
        # Inflate a chunk at a time, at most a chunk out per call, counting what comes out; nothing is kept.
        for offset in range(start, len(data), _INFLATE_CHUNK):
            pending: bytes | memoryview = view[offset : offset + _INFLATE_CHUNK]
            while pending:
                total += len(inflater.decompress(pending, _INFLATE_CHUNK))
                if total > limit:
                    raise ImageDecodeError(
                        f"its deflated data expands beyond {limit / 2**20:.0f} MB "
                        f"({DEFLATE_BYTES_PER_PIXEL} bytes per pixel of the pixel limit)"
                    )
                pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ImageDecodeError("its deflated data is corrupt") from exc


def _read_dicom(data: bytes, *, pixels: bool, max_pixels: int = DEFAULT_MAX_PIXELS):
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_deflated_size(data, max_pixels)
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels, force=False)
    except InvalidDicomError as exc:
        raise ImageDecodeError("file is not a valid DICOM file") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure is a readable decode error
        raise ImageDecodeError(f"DICOM header could not be read ({type(exc).__name__})") from exc


def _dicom_dimensions(data: bytes) -> tuple[int, int]:
    ds = _read_dicom(data, pixels=False)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ImageDecodeError("DICOM file holds no image (no Rows/Columns in the header)")
    return int(cols), int(rows)


def image_dimensions(data: bytes) -> tuple[int, int]:
    """Return (width, height) read from the file headers, without decoding any pixel data."""
    fmt = sniff_format(data)
    if fmt == "png":
        return _png_dimensions(data)
    if fmt == "jpeg":
        return _jpeg_dimensions(data)
    if fmt == "dicom":
        return _dicom_dimensions(data)
    raise _not_an_image()


def check_pixel_cap(width: int, height: int, max_pixels: int) -> None:
    """Raise ImageDecodeError when width x height exceeds max_pixels (from the headers, before decoding)."""
    total = width * height
    if total > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {total / 1e6:.0f} megapixels, "
            f"over the {max_pixels / 1e6:.0f} megapixel limit"
        )


def _to_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        else:
            raise ImageDecodeError(f"image has an unsupported number of channels ({img.shape[2]})")
    return img


def _decode_raster(data: bytes, fmt: str) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    except cv2.error as exc:
        raise ImageDecodeError(f"{fmt.upper()} pixel data could not be decoded") from exc
    if img is None or img.size == 0:
        raise ImageDecodeError(
            f"{fmt.upper()} pixel data could not be decoded (file is corrupt or truncated)"
        )
    img = _to_gray(img)
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        out = img.astype(np.float32) / 65535.0
    else:
        out = img.astype(np.float32)
        lo, hi = float(np.nanmin(out)), float(np.nanmax(out))
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _window(arr: np.ndarray, ds) -> np.ndarray:
    """Apply the VOI LUT or the first window; fall back to the data range when the window lies outside it."""
    from pydicom.pixels import apply_voi_lut

    lo_data, hi_data = float(arr.min()), float(arr.max())
    if "VOILUTSequence" in ds:
        src = arr.astype(np.int64) if np.array_equal(arr, np.round(arr)) else arr  # LUT lookup wants integers
        out = apply_voi_lut(src, ds, index=0).astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        lo, hi = c - w / 2.0, c + w / 2.0
        if w > 1 and hi > lo_data and lo < hi_data:  # window overlaps the data
            return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    if hi_data <= lo_data:
        return np.zeros_like(arr, dtype=np.float64)
    return (arr - lo_data) / (hi_data - lo_data)


def _decode_dicom(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    ds = _read_dicom(data, pixels=True, max_pixels=max_pixels)
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM file holds no pixel data")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = ts.name if ts is not None else "unknown transfer syntax"
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError("DICOM NumberOfFrames is not a number") from exc
    try:
        if frames > 1:  # only the first frame is read: a many-frame file must not decode every frame
            ds.pixel_array_options(index=0)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder errors vary by plugin
        if "2000" in ts_name:
            reason = "JPEG 2000 codestream is corrupt"
        elif "JPEG" in ts_name:
            reason = f"{ts_name} codestream is corrupt or its decoder is missing"
        else:
            reason = f"{ts_name} data is corrupt or truncated"
        raise ImageDecodeError(f"DICOM pixel data could not be decoded ({reason})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3 and arr.shape[-1] == 3:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space

                arr = convert_color_space(arr, photometric, "RGB")
            arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY)
        else:
            raise ImageDecodeError(f"DICOM photometric interpretation {photometric} is not supported")
    if arr.ndim != 2:
        raise ImageDecodeError("DICOM pixel data is not a 2-D image")
    try:
        arr = apply_modality_lut(arr, ds).astype(np.float64)
        out = _window(arr, ds)
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(
            f"DICOM grey-level transform could not be applied ({type(exc).__name__})"
        ) from exc
    # To 8 bits, as the training images were made (8-bit JPEGs rendered from the window): the model never
    # saw finer grey levels, and a DICOM scores like its 8-bit export (tests/intake/test_dicom_agreement).
    # Before the inversion, so that MONOCHROME1 and MONOCHROME2 of one image give exactly opposite levels.
    out = np.round(np.clip(out, 0.0, 1.0) * 255.0) / 255.0
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/DICOM bytes to a 2-D float32 array in [0, 1], bone bright (pixel cap checked first)."""
    fmt = sniff_format(data)
    if fmt is None:
        raise _not_an_image()
    width, height = image_dimensions(data)
    check_pixel_cap(width, height, max_pixels)
    img = _decode_dicom(data, max_pixels) if fmt == "dicom" else _decode_raster(data, fmt)
    if img.ndim != 2 or min(img.shape) < MIN_IMAGE_SIDE:
        raise ImageDecodeError(f"image is too small to read ({img.shape[1]}x{img.shape[0]} pixels)")
    return img


# Peak bytes per pixel while decoding (estimates from the decode paths above): DICOM holds its stored pixels,
# the float64 modality and window arrays and their temporaries; PNG/JPEG the decoded raster (up to 16-bit
# RGBA) and two float32 arrays.
DECODE_BYTES_PER_PIXEL = {"dicom": 32, "png": 16, "jpeg": 16}


def decode_cost(data: bytes) -> int:
    """Estimated peak memory in bytes of decode_image on data, from its headers (0 when they do not parse)."""
    fmt = sniff_format(data)
    if fmt is None:
        return 0
    try:
        width, height = image_dimensions(data)
    except Exception:  # noqa: BLE001 - any header failure: the validation that follows says why
        return 0
    return max(0, width) * max(0, height) * DECODE_BYTES_PER_PIXEL[fmt]


def make_thumbnail(data: bytes, max_side: int = 160) -> bytes:
    """Return PNG bytes of an 8-bit preview whose longest side is at most max_side."""
    return thumbnail_png(decode_image(data), max_side)


def thumbnail_png(gray: np.ndarray, max_side: int = 160) -> bytes:
    """PNG bytes of an 8-bit preview of an already decoded image (decode_image output)."""
    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        gray = cv2.resize(
            gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    ok, buf = cv2.imencode(".png", np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if not ok:
        raise ImageDecodeError("preview could not be encoded")
    return buf.tobytes()


def dicom_patient_id(data: bytes) -> str | None:
    """Return the raw DICOM PatientID (the caller hashes it), or None for non-DICOM or a missing tag."""
    if sniff_format(data) != "dicom":
        return None
    try:
        ds = _read_dicom(data, pixels=False)
    except ImageDecodeError:
        return None
    pid = ds.get("PatientID")
    return str(pid) if pid not in (None, "") else None


_PNG_MAX_CHUNK = 2**31 - 1  # the PNG spec's limit on a chunk length
# Valid (colour type: bit depths) pairs from the PNG spec.
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
_JPEG_SOS = 0xDA


def check_png(data: bytes) -> None:
    """Walk a PNG's chunks (lengths, CRC32s, IHDR first, an IDAT, IEND); raise ImageDecodeError if broken."""
    if data[:8] != _PNG_MAGIC:
        raise ImageDecodeError("it does not start with the PNG signature")
    view = memoryview(data)
    n = len(data)
    pos = 8
    index = 0
    seen_idat = False
    while True:
        if pos + 12 > n:
            raise ImageDecodeError("the file is truncated (it ends before its IEND chunk)")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = bytes(view[pos + 4 : pos + 8])
        if length > _PNG_MAX_CHUNK or not kind.isalpha() or not kind.isascii():
            raise ImageDecodeError(f"the file is corrupt (invalid chunk header at byte {pos})")
        end = pos + 8 + length
        if end + 4 > n:
            name = kind.decode("ascii")
            raise ImageDecodeError(f"the file is truncated (it ends inside its {name} chunk)")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[pos + 4 : end]) != crc:
            name = kind.decode("ascii")
            raise ImageDecodeError(f"the file is corrupt (its {name} chunk fails its CRC check)")
        if index == 0:
            if kind != b"IHDR" or length != 13:
                raise ImageDecodeError("the file is corrupt (the image header IHDR is not its first chunk)")
            depth, colour, compression, filtering, interlace = view[pos + 16 : pos + 21]
            if (
                depth not in _PNG_DEPTHS.get(colour, ())
                or compression != 0
                or filtering != 0
                or interlace not in (0, 1)
            ):
                raise ImageDecodeError("the image header (IHDR) holds an invalid bit depth or colour type")
        elif kind == b"IHDR":
            raise ImageDecodeError("the file is corrupt (it has a second IHDR chunk)")
        elif kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            if not seen_idat:
                raise ImageDecodeError("the file holds no image data (no IDAT chunk)")
            return  # bytes after IEND are ignored by every decoder
        pos = end + 4
        index += 1


def check_jpeg(data: bytes) -> None:
    """Check a JPEG's markers (SOI, a SOF, an SOS, EOI at the end); raise ImageDecodeError if broken."""
    if data[:2] != b"\xff\xd8":
        raise ImageDecodeError("it does not start with the JPEG start-of-image marker")
    n = len(data)
    pos = 2
    seen_sof = False
    while True:
        # Fill bytes (0xFF) may precede any marker.
        while pos + 1 < n and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1
        if pos + 2 > n:
            raise ImageDecodeError("the file is truncated (it ends before its image data)")
        if data[pos] != 0xFF:
            raise ImageDecodeError(f"the file is corrupt (no marker where one is expected, byte {pos})")
        marker = data[pos + 1]
        if marker == 0xD9:
            raise ImageDecodeError("the file is corrupt (it ends before any image data)")
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers: no length field
            pos += 2
            continue
        if pos + 4 > n:
            raise ImageDecodeError("the file is truncated (it ends before its image data)")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > n:
            raise ImageDecodeError("the file is truncated or corrupt (a header segment runs past its end)")
        if marker in _SOF_MARKERS:
            seen_sof = True
        elif marker == _JPEG_SOS:
            if not seen_sof:
                raise ImageDecodeError("the file is corrupt (image data before the frame header)")
            break
        pos += 2 + length
    # The entropy-coded data is not walked; a complete file ends with EOI, possibly followed by zero padding.
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageDecodeError("the file is truncated (it has no end-of-image marker)")


def check_structure(data: bytes, fmt: str) -> None:
    """Structural check for a PNG or JPEG (other formats pass); raise ImageDecodeError with the reason."""
    if fmt == "png":
        check_png(data)
    elif fmt == "jpeg":
        check_jpeg(data)
