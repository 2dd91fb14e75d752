"""Images embedded in a sheet as ``data:`` URIs (so it opens offline): the probe, and thumbnails.

Everything is re-encoded as JPEG by Pillow from decoded pixels, never copied byte for byte: what the
sheet embeds is a picture, not whatever else an uploaded file carried (metadata, trailing data).
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageOps

PROBE_MAX_SIDE = 900
THUMB_MAX_SIDE = 160


def _jpeg_uri(im: Image.Image, quality: int) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def probe_uri(bgr: np.ndarray, *, max_side: int = PROBE_MAX_SIDE) -> str:
    """The decoded probe (BGR, as the detector saw it: EXIF orientation applied), scaled to fit ``max_side``.

    Face boxes keep the decoded image's pixel coordinates: the sheet draws the picture over the full
    width and height of the decoded image, whatever its embedded size."""
    im = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    im.thumbnail((max_side, max_side))
    return _jpeg_uri(im, 88)


def thumbnail_uri(data: bytes, *, max_side: int = THUMB_MAX_SIDE) -> str | None:
    """A gallery image as a small JPEG ``data:`` URI (None if it cannot be decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as src:
            src.draft("RGB", (max_side * 2, max_side * 2))
            im: Image.Image = ImageOps.exif_transpose(src) or src
            im.thumbnail((max_side, max_side))
            return _jpeg_uri(im, 82)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
