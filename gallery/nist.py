"""Enrolment from ANSI/NIST-ITL transactions (``quorum enroll --nist FILE_OR_FOLDER``): each Type-10
facial image of a transaction enrolled under the subject the transaction names (``QUORUM_NIST_SUBJECT_FIELD``,
by default 2.015, the State Identification Number), with its booking date (10.005, else 1.005) and booking
number (``QUORUM_NIST_BOOKING_NUMBER_FIELD``, by default 1.009, the TCN) kept as a manifest's are.

Only frontal faces are enrolled (10.020 F or absent) unless ``profiles``; the others are counted and
said so. Every file is walked first (``core.nist``: no image held), the images are read batch by batch
when the enrolment uploads them, so memory stays flat and a rerun of the same files resumes (the items'
sources name file and record). A file or a record that cannot be used is refused with its ``NIST_*``
code and the rest goes on: nothing good is lost for a bad neighbour, and nothing bad passes unnamed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ..core import nist
from ..core.config import Settings
from ..core.errors import Code, InputError
from .items import EnrolItem

log = structlog.get_logger()


@dataclass(frozen=True)
class NistEnrolItem(EnrolItem):
    """One Type-10 image of a transaction file, read (and JPEG 2000 decoded) when it is uploaded."""

    face: nist.FaceImage | None = None

    @property
    def source(self) -> str:
        return f"{self.path}#record-{self.face.record if self.face else '?'}"

    def read_bytes(self) -> bytes:
        assert self.path is not None and self.face is not None
        return nist.face_bytes(self.path, self.face)


@dataclass
class NistItems:
    items: list[EnrolItem] = field(default_factory=list)
    refused: list[nist.RecordRefusal] = field(default_factory=list)  # with their codes: nothing is dropped unsaid
    profiles_skipped: int = 0  # faces not frontal (10.020), not enrolled without --profiles
    other_images: int = 0  # Type-10 records that are not faces (scars, marks, tattoos)
    transactions: int = 0


def transaction_files(paths: Iterable[Path]) -> list[Path]:
    """Files given, and the transaction-looking files under folders given (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in nist.SUFFIXES)
        else:
            out.append(p)
    return out


def nist_items(s: Settings, paths: Iterable[Path], *, profiles: bool = False) -> NistItems:
    """The enrolment items of every transaction under ``paths``, and what was refused or skipped."""
    found = NistItems()
    for path in transaction_files(paths):
        try:
            tx = nist.read_transaction(path, max_record_bytes=s.max_image_bytes)
        except InputError as err:
            found.refused.append(nist.RecordRefusal(str(path), _record_of(err), err.code, err.message))
            continue
        except OSError as err:
            found.refused.append(nist.RecordRefusal(str(path), None, Code.IMAGE_MISSING, f"{path}: {err}"))
            continue
        found.transactions += 1
        found.refused += tx.refused
        found.other_images += tx.other_images
        _add_transaction(s, tx, found, profiles)
    for bad in found.refused:
        log.warning("gallery.nist_refused", source=bad.source, record=bad.record, code=bad.code.value)
    return found


def _record_of(err: InputError) -> int | None:
    record = err.details.get("record")
    return record if isinstance(record, int) else None


def _add_transaction(s: Settings, tx: nist.Transaction, found: NistItems, profiles: bool) -> None:
    subject = tx.value(s.nist_subject_field)
    if subject is None:
        if tx.faces:
            found.refused.append(
                nist.RecordRefusal(
                    str(tx.path),
                    None,
                    Code.NIST_SUBJECT_MISSING,
                    f"{tx.path}: no subject field {s.nist_subject_field} (QUORUM_NIST_SUBJECT_FIELD): "
                    f"its {len(tx.faces)} face image(s) are not enrolled",
                )
            )
        return
    number = tx.value(s.nist_booking_number_field) if s.nist_booking_number_field else None
    if number is not None and (len(number) > 64 or not number.isprintable()):
        number = None  # kept only as a manifest's would be: 1-64 printable characters
    for face in tx.faces:
        if not face.frontal and not profiles:
            found.profiles_skipped += 1
            continue
        date = face.photo_date or nist.iso_date(tx.value("1.005"))
        found.items.append(NistEnrolItem(subject, path=tx.path, booking_date=date, booking_number=number, face=face))
