"""Cheap structural integrity checks for uploaded PNG and JPEG files: no pixel is decoded.

They catch what goes wrong with files in transit (truncation, flipped bytes, a different file renamed) at
upload, in microseconds per file. A file that passes them can still hold undecodable pixel data (e.g. a PNG
with valid chunks and CRCs around garbage compressed data); the worker decodes every image before inference
and turns such a study into FAILED with the decoder's readable reason.
"""

from __future__ import annotations

import struct
import zlib

from model.preprocess import ImageDecodeError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_CHUNK = 2**31 - 1  # the PNG spec's limit on a chunk length
# Valid (colour type: bit depths) pairs from the PNG spec.
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
# Start-of-frame markers (SOF0-SOF15 minus DHT C4, JPG C8 and DAC CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS = 0xDA


def check_png(data: bytes) -> None:
    """Walk a PNG's chunks (lengths, CRC32s, IHDR first, an IDAT, IEND); raise ImageDecodeError if broken."""
    if data[:8] != _PNG_SIGNATURE:
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
        if marker in _JPEG_SOF:
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
