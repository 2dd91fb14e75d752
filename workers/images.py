"""Decoding untrusted image bytes into the BGR array every detector and engine reads.

Done with Pillow, which reads an image's format and dimensions from its header before any pixel is
decoded (a small file claiming 100000x100000 pixels is refused before it allocates anything) and
converts every mode agencies send (CMYK, 16-bit, grey, alpha, palette; EXIF orientation applied). What
Pillow does not catch is kept here, small and pure: a JPEG cut short or missing its end marker, or a PNG
without IEND, decodes with grey rows in place of the lost data and would silently poison an embedding,
so both are walked to their end first. Every refusal is an ``InputError`` with its stable code.
"""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import Code, InputError

MIN_IMAGE_SIDE = 32  # smaller images cannot hold a face the detector can find


def _truncated(kind: str) -> InputError:
    return InputError(Code.IMAGE_TRUNCATED, f"{kind} data ends before the end of the image")


def _check_jpeg_complete(data: bytes) -> None:
    """Walk the JPEG segments to EOI (a first SOF is required); raise IMAGE_TRUNCATED if the data ends first.

    Entropy-coded data after SOS is scanned for the next real marker (0xFF not followed by a stuffed
    0x00 or a restart marker), so an EXIF thumbnail's own EOI (inside APP1, skipped by length) and
    data appended after EOI (e.g. motion photos) are both handled correctly.
    """
    n = len(data)
    pos = 2
    width = height = 0
    while True:
        # Find the next marker (skip fill bytes 0xFF).
        if pos >= n:
            raise _truncated("JPEG")
        if data[pos] != 0xFF:
            raise InputError(Code.NOT_AN_IMAGE, "corrupt JPEG: marker expected")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise _truncated("JPEG")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > n:
            raise _truncated("JPEG")
        seg_len = struct.unpack(">H", data[pos : pos + 2])[0]
        if seg_len < 2:
            raise InputError(Code.NOT_AN_IMAGE, "corrupt JPEG segment length")
        if pos + seg_len > n:
            raise _truncated("JPEG")
        if marker in _JPEG_SOF and not width:
            if seg_len < 7:
                raise InputError(Code.NOT_AN_IMAGE, "corrupt JPEG frame header")
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
        pos += seg_len
        if marker == 0xDA:  # SOS: entropy-coded data follows until the next real marker
            while True:
                ff = data.find(b"\xff", pos)
                if ff < 0 or ff + 1 >= n:
                    raise _truncated("JPEG")
                nxt = data[ff + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos = ff + 1 if nxt == 0xFF else ff + 2
                    continue
                pos = ff
                break
    if not width or not height:
        raise InputError(Code.NOT_AN_IMAGE, "JPEG without a frame header")


def _check_png_complete(data: bytes) -> None:
    """Walk the chunks from IHDR to IEND (missing IEND = truncated)."""
    n = len(data)
    if n < 33:
        raise _truncated("PNG")
    if data[12:16] != b"IHDR":
        raise InputError(Code.NOT_AN_IMAGE, "PNG without IHDR")
    pos = 8
    while True:
        if pos + 8 > n:
            raise _truncated("PNG")
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise _truncated("PNG")
        if ctype == b"IEND":
            break
        pos = end


# Formats accepted from agencies. Pillow reads more (PDF, EPS, ICNS ...): those are refused.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and read the dimensions without decoding any pixel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked next
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(Code.IMAGE_TOO_LARGE, f"image over the decompression-bomb limit: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(Code.NOT_AN_IMAGE, "not a JPEG, PNG, WebP, BMP, TIFF or GIF image") from exc
    if im.format not in ACCEPTED_FORMATS:
        raise InputError(Code.NOT_AN_IMAGE, f"{im.format} images are not accepted")
    width, height = im.size
    if width * height > max_pixels:
        raise InputError(
            Code.IMAGE_TOO_LARGE, f"image is {width}x{height}, over {max_pixels} pixels", width=width, height=height
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(Code.IMAGE_TOO_SMALL, f"image is {width}x{height}, under {MIN_IMAGE_SIDE} px a side")
    return im


def _to_bgr(im: Image.Image) -> np.ndarray:
    """Any decoded mode as 8-bit BGR: CMYK and palette through Pillow, 16-bit and float grey scaled."""
    if im.mode in {"I;16", "I;16B", "I;16L", "I"}:
        grey = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey8 = np.clip(grey * (255.0 / top), 0, 255).round().astype(np.uint8)
        return cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR)
    if im.mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        lo, hi = float(grey.min()), float(grey.max())
        grey8 = ((grey - lo) * (255.0 / (hi - lo or 1.0))).round().astype(np.uint8)
        return cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR)
    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode untrusted bytes into a BGR uint8 image, refusing bombs, truncation and tiny images.

    Pillow identifies the format and reads the dimensions from the header alone, so a small file
    claiming 100000x100000 pixels is refused before any pixel is allocated; it decodes, converts any
    mode (CMYK, 16-bit, grey, alpha, palette) to 8-bit colour and applies the EXIF orientation, so a
    phone photo stored sideways reaches the detector upright. JPEG and PNG completeness is checked by
    walking their structure: libjpeg decodes a JPEG cut short (or missing its end marker) and fills the
    missing rows with grey, which would silently poison an embedding. (Pillow's pixels are identical
    to OpenCV's decoder on the LFW JPEGs, so templates do not change with the decoder.)
    """
    if not data:
        raise InputError(Code.IMAGE_EMPTY, "image is empty")
    if len(data) > max_bytes:
        raise InputError(Code.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, over {max_bytes}", bytes=len(data))
    data = bytes(data)
    im = _open(data, max_pixels)
    if im.format in {"JPEG", "MPO"}:
        _check_jpeg_complete(data)
    elif im.format == "PNG":
        _check_png_complete(data)
    try:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        image = _to_bgr(im)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(Code.NOT_AN_IMAGE, f"{im.format} could not be decoded: {type(exc).__name__}") from exc
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:  # headers can lie
        raise InputError(Code.IMAGE_TOO_SMALL, "image under the minimum size")
    return image


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


_JPEG_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}
