"""ANSI/NIST-ITL transactions (traditional encoding): the booking system's and the examiner's file format.

A transaction is a Type-1 record (its ``1.003`` CNT lists every other record's type and IDC), then the
records, each ``<type>.001:<length>`` first (binary records of types 3-8 begin with a 4-byte length
instead). Quorum reads the subject's fields (Type-1, Type-2) and the facial images (Type-10 with
``10.003`` FACE): their compression (``10.011``: JPEGB/JPEGL JPEG, JP2/JP2L JPEG 2000, PNG), pose
(``10.020``: F frontal, L/R profile, A angled; absent read as frontal) and photo date (``10.005``).

The walk is our own, record by record with seeks, so a file is never held whole and each fault has
its stable code (a file that lies about a length must not be read as another one): a file that is not a
transaction (``NIST_NOT_A_TRANSACTION``), one cut short (``NIST_TRUNCATED``), a length field that does not
end its record where a record ends (``NIST_LENGTH_MISMATCH``), a record over the size limit
(``NIST_RECORD_TOO_LARGE``, refused before it is read), text fields that do not parse
(``NIST_MALFORMED``). Each record's text fields are parsed by the ``nistitl`` package's
``parse_record``; the image is kept as its position in the file and read when it is needed. Per Type-10
record: no image (``NIST_NO_IMAGE``), a compression Quorum does not read or data that is not what it
declares (``NIST_UNSUPPORTED_COMPRESSION``). JPEG 2000 is decoded by Pillow (OpenJPEG) into a PNG the
rest of the pipeline reads; a Pillow built without OpenJPEG refuses it with the same code, saying why.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Code, InputError

FS, GS, RS, US = b"\x1c", b"\x1d", b"\x1e", b"\x1f"
BINARY_TYPES = frozenset({3, 4, 5, 6, 7, 8})  # length in a 4-byte header, no tagged fields
TEXT_LIMIT = 1 << 20  # the text fields of one record (an image record's image is on top of this)
# 10.011 as declared -> the format its bytes must be in
COMPRESSIONS = {"JPEGB": "JPEG", "JPEGL": "JPEG", "JP2": "JPEG2000", "JP2L": "JPEG2000", "PNG": "PNG"}
MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "JPEG2000": (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"),  # JP2 box, raw codestream
    "PNG": (b"\x89PNG\r\n\x1a\n",),
}
FRONTAL = frozenset({"", "F"})  # 10.020 POS: absent or F
SUFFIXES = frozenset({".eft", ".an2", ".nist", ".int", ".ebts"})  # names transaction files go by
_HEAD = re.compile(rb"(\d{1,2})\.0*1:(\d{1,12})\x1d")


@dataclass(frozen=True)
class FaceImage:
    """A Type-10 facial image: where its bytes are in the file, and what the record says of it."""

    record: int  # the record's position in the transaction (0: the Type-1 record)
    idc: str
    compression: str  # 10.011 as declared
    pose: str  # 10.020 ('' when absent)
    photo_date: str | None  # 10.005 as YYYY-MM-DD, when it is a date
    offset: int  # of the image bytes in the file
    length: int

    @property
    def frontal(self) -> bool:
        return self.pose in FRONTAL


@dataclass(frozen=True)
class RecordRefusal:
    """A record (or a whole transaction: ``record`` None) that cannot be used, and why."""

    source: str
    record: int | None
    code: Code
    message: str


@dataclass
class Transaction:
    path: Path
    fields: dict[str, str]  # "1.009" -> value: the first Type-1 and Type-2 records' fields
    faces: list[FaceImage] = field(default_factory=list)  # usable Type-10 FACE records, in order
    refused: list[RecordRefusal] = field(default_factory=list)  # Type-10 records that cannot be used
    other_images: int = 0  # Type-10 records that are not faces (10.003 SMT: scars, marks, tattoos)

    def value(self, tag: str) -> str | None:
        """A field's value ("2.015"), stripped; None when absent or blank."""
        v = self.fields.get(normal_tag(tag), "").strip()
        return v or None


def normal_tag(tag: str) -> str:
    """``2.15`` / ``2.015:`` -> ``2.015``; refuses anything that is not a Type-1 or Type-2 field tag."""
    m = re.fullmatch(r"\s*(\d{1,2})\.(\d{1,3}):?\s*", tag)
    if not m:
        raise ValueError(f"{tag!r} is not a field tag like 2.015")
    return f"{int(m[1])}.{int(m[2]):03d}"


def is_transaction(path: Path) -> bool:
    """Whether a file is to be read as a transaction: named like one, or beginning as a traditional-encoding
    transaction does (``1.001:``)."""
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(6) == b"1.001:"
    except OSError:
        return False


def _refuse(code: Code, path: Path, message: str, record: int | None = None) -> InputError:
    where = f"{path}" + (f" record {record}" if record is not None else "")
    return InputError(code, f"{where}: {message}", source=str(path), record=record)


def read_transaction(path: Path, *, max_record_bytes: int) -> Transaction:
    """Walk a transaction file: its Type-1/Type-2 fields and its Type-10 faces (the images are not read).
    Raises ``InputError`` with a ``NIST_*`` code for a file that cannot be trusted as a whole; a Type-10
    record that cannot be used is listed in ``refused`` and the others are kept."""
    with path.open("rb") as fh:
        size = fh.seek(0, io.SEEK_END)
        fh.seek(0)
        if fh.read(6) != b"1.001:":
            raise _refuse(Code.NIST_NOT_A_TRANSACTION, path, "not an ANSI/NIST-ITL transaction (no 1.001 field first)")
        type1 = _fields(path, 0, _ascii_record(fh, path, 0, 0, size, max_record_bytes)[1])
        order = _content(path, type1)
        tx = Transaction(path, dict(type1))
        offset = int(type1["1.001"])
        for index, (rtype, idc) in enumerate(order, start=1):
            if offset >= size:
                raise _refuse(Code.NIST_TRUNCATED, path, f"ends before record {index} of {len(order)}", index)
            if rtype in BINARY_TYPES:
                offset = _skip_binary(fh, path, index, offset, size, max_record_bytes)
                continue
            length, raw = _ascii_record(fh, path, index, offset, size, max_record_bytes, rtype)
            _take(tx, path, index, rtype, idc, offset, raw)
            offset += length
        if offset != size:
            raise _refuse(Code.NIST_LENGTH_MISMATCH, path, f"{size - offset} bytes after the last record 1.003 lists")
    return tx


def _ascii_record(fh, path: Path, index: int, offset: int, size: int, limit: int, rtype: int = 1) -> tuple[int, bytes]:
    """(length, the record's bytes) of the tagged record of type ``rtype`` at ``offset``, its length
    field checked."""
    fh.seek(offset)
    m = _HEAD.match(fh.read(24))
    if not m:
        raise _refuse(Code.NIST_MALFORMED, path, "does not begin with its length field (N.001:LEN)", index)
    if int(m[1]) != rtype:
        raise _refuse(Code.NIST_MALFORMED, path, f"is a Type-{int(m[1])} record where 1.003 lists Type-{rtype}", index)
    length = int(m[2])
    if length > limit + TEXT_LIMIT:
        raise _refuse(Code.NIST_RECORD_TOO_LARGE, path, f"declares {length} bytes, over the limit {limit}", index)
    if length < m.end() + 1:
        raise _refuse(Code.NIST_LENGTH_MISMATCH, path, f"length field {length} is shorter than its own fields", index)
    if offset + length > size:
        raise _refuse(Code.NIST_TRUNCATED, path, f"declares {length} bytes; the file ends {size - offset} in", index)
    fh.seek(offset)
    raw = fh.read(length)
    if raw[-1:] != FS:
        raise _refuse(Code.NIST_LENGTH_MISMATCH, path, f"its length field ({length}) does not end the record", index)
    return length, raw


def _skip_binary(fh, path: Path, index: int, offset: int, size: int, limit: int) -> int:
    fh.seek(offset)
    head = fh.read(4)
    length = int.from_bytes(head, "big") if len(head) == 4 else 0
    if length > limit + TEXT_LIMIT:
        raise _refuse(Code.NIST_RECORD_TOO_LARGE, path, f"declares {length} bytes, over the limit {limit}", index)
    if length < 5:
        raise _refuse(Code.NIST_LENGTH_MISMATCH, path, f"binary record length {length}", index)
    if offset + length > size:
        raise _refuse(Code.NIST_TRUNCATED, path, f"declares {length} bytes; the file ends {size - offset} in", index)
    return offset + length


def _fields(path: Path, index: int, text: bytes) -> dict[str, str]:
    """The tagged fields of a record's text (up to its binary field, if any), parsed by nistitl:
    tag -> value (subfields joined by RS, their items by US, as the file has them)."""
    import nistitl

    fields: dict[str, str] = {}
    subfields: list[bytes] = []
    items: list[bytes] = []

    def push_value(v: bytes) -> None:
        items.append(v)

    def push_subfield(v: bytes | None) -> None:
        subfields.append(US.join(items) if v is None else v)
        items.clear()

    def push_field(tag: str, v: bytes | None) -> None:
        value = RS.join(subfields) if v is None else v
        subfields.clear()
        fields[normal_tag(tag)] = value.decode("latin-1")

    try:
        nistitl.parse_record(
            text if text.endswith(FS) else text + FS, lambda: None, push_field, push_subfield, push_value
        )
    except (nistitl.NistException, ValueError) as exc:
        raise _refuse(Code.NIST_MALFORMED, path, f"fields do not parse ({exc})", index) from None
    return fields


def _content(path: Path, type1: dict[str, str]) -> list[tuple[int, str]]:
    """The records after Type-1 that 1.003 (CNT) lists: [(type, idc)]."""
    try:
        entries = [sf.split("\x1f") for sf in type1["1.003"].split("\x1e")]
        declared = [(int(t), i) for t, i in entries]
        assert declared and declared[0][0] == 1 and int(declared[0][1]) == len(declared) - 1
    except (KeyError, ValueError, AssertionError):
        raise _refuse(Code.NIST_MALFORMED, path, "1.003 (CNT) does not list the records", 0) from None
    return declared[1:]


def _take(tx: Transaction, path: Path, index: int, rtype: int, idc: str, offset: int, raw: bytes) -> None:
    """Keep what Quorum reads of one tagged record: Type-1/2 fields, a Type-10 face."""
    tag = f"{GS.decode()}{rtype}.999:".encode()
    pos = raw.find(tag)
    text = raw if pos < 0 else raw[:pos]
    fields = _fields(path, index, text)
    if rtype == 2 and not any(k.startswith("2.") for k in tx.fields):
        tx.fields.update(fields)
    if rtype != 10:
        return
    if fields.get("10.003", "FACE").strip().upper() != "FACE":
        tx.other_images += 1
        return
    start = offset + pos + len(tag) if pos >= 0 else 0
    length = len(raw) - 1 - (pos + len(tag)) if pos >= 0 else 0
    problem = _face_problem(raw[pos + len(tag) : pos + len(tag) + 16] if pos >= 0 else b"", length, fields)
    if problem:
        tx.refused.append(RecordRefusal(str(path), index, problem[0], f"{path} record {index}: {problem[1]}"))
        return
    cga = fields["10.011"].strip().upper()
    tx.faces.append(
        FaceImage(
            index, idc, cga, fields.get("10.020", "").strip().upper(), iso_date(fields.get("10.005")), start, length
        )
    )


def _face_problem(head: bytes, length: int, fields: dict[str, str]) -> tuple[Code, str] | None:
    if length <= 0:
        return Code.NIST_NO_IMAGE, "Type-10 record with no image (10.999 absent or empty)"
    cga = fields.get("10.011", "").strip().upper()
    fmt = COMPRESSIONS.get(cga)
    if fmt is None:
        return Code.NIST_UNSUPPORTED_COMPRESSION, (
            f"compression {cga or '(none given)'!r} (10.011) is not one Quorum reads: {', '.join(COMPRESSIONS)}"
        )
    if not head.startswith(MAGIC[fmt]):
        return Code.NIST_UNSUPPORTED_COMPRESSION, f"10.011 declares {cga} but the image data is not {fmt}"
    if fmt == "JPEG2000" and not jpeg2000_available():
        return Code.NIST_UNSUPPORTED_COMPRESSION, (
            f"{cga} (JPEG 2000) images need Pillow built with OpenJPEG, which this installation lacks"
        )
    return None


def jpeg2000_available() -> bool:
    from PIL import features

    return bool(features.check("jpg_2000"))


def iso_date(value: str | None) -> str | None:
    """``YYYYMMDD`` (the standard's dates) -> ``YYYY-MM-DD``; None when it is not a date."""
    v = (value or "").strip()
    try:
        return dt.datetime.strptime(v, "%Y%m%d").date().isoformat() if len(v) == 8 else None
    except ValueError:
        return None


def face_bytes(path: Path, face: FaceImage) -> bytes:
    """The image of a Type-10 record as the pipeline reads it: JPEG and PNG as stored, JPEG 2000
    decoded (Pillow, OpenJPEG) and stored as PNG, losslessly."""
    with path.open("rb") as fh:
        fh.seek(face.offset)
        data = fh.read(face.length)
    if len(data) != face.length:
        raise _refuse(Code.NIST_TRUNCATED, path, "the image ends before its record does", face.record)
    if COMPRESSIONS.get(face.compression) != "JPEG2000":
        return data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            out = io.BytesIO()
            im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(out, format="PNG")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _refuse(
            Code.NIST_UNSUPPORTED_COMPRESSION, path, f"JPEG 2000 image does not decode ({exc})", face.record
        ) from None
    return out.getvalue()


def first_frontal(tx: Transaction) -> FaceImage:
    """The probe of a transaction: its first frontal face (else its first face); ``NIST_NO_IMAGE`` if none."""
    for face in tx.faces:
        if face.frontal:
            return face
    if tx.faces:
        return tx.faces[0]
    if tx.refused:  # the face record there is, refused: its own code
        bad = tx.refused[0]
        raise InputError(bad.code, bad.message, source=bad.source, record=bad.record)
    raise _refuse(Code.NIST_NO_IMAGE, tx.path, "no Type-10 facial image")
