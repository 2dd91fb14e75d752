"""ANSI/NIST-ITL transactions for the tests, written by the ``nistitl`` package's writer from real faces."""

from __future__ import annotations

import io
from dataclasses import dataclass

from nistitl import AsciiRecord, BinaryField, Field, Message
from PIL import Image


@dataclass(frozen=True)
class Face:
    """One Type-10 record: the image bytes, its declared compression (10.011) and pose (10.020)."""

    data: bytes
    compression: str = "JPEGB"
    pose: str | None = "F"
    photo_date: str | None = "20261130"
    image_type: str = "FACE"


def reencode(jpeg: bytes, fmt: str) -> bytes:
    """A JPEG as PNG or JPEG 2000 (Pillow, OpenJPEG), or mirrored (a stand-in profile view) as JPEG."""
    out = io.BytesIO()
    with Image.open(io.BytesIO(jpeg)) as im:
        if fmt == "MIRROR":
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="JPEG", quality=92)
        else:
            im.save(out, format=fmt)
    return out.getvalue()


def transaction(
    faces: list[Face], *, type2: dict[int, str] | None = None, tcn: str = "TCN-0001", date: str = "20261201"
) -> bytes:
    """Type-1 (TOT CAR, 1.005 date, 1.009 TCN), one Type-2 with ``type2`` fields (field number -> value;
    none at all when None), and one Type-10 per face."""
    msg = Message()
    msg.TOT = "CAR"
    msg[0].DAT = date
    msg[0].TCN = tcn
    idc = 0
    if type2 is not None:
        r2 = AsciiRecord(2)
        r2.IDC = idc
        for number, value in sorted(type2.items()):
            r2 += Field(2, number, value)
        msg += r2
    for face in faces:
        idc += 1
        r10 = AsciiRecord(10)
        r10.IDC = idc
        r10 += Field(10, 3, face.image_type)
        if face.photo_date:
            r10 += Field(10, 5, face.photo_date)
        r10 += Field(10, 11, face.compression)
        if face.pose:
            r10 += Field(10, 20, face.pose)
        if face.data:
            r10 += BinaryField(10, 999, face.data)
        msg += r10
    return msg.NIST
