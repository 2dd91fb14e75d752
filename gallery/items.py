"""What an operator enrols: a folder of ``<subject>/<image>`` files, or a booking system's CSV manifest,
as :class:`EnrolItem` values; and the job id that makes a rerun of the same items resume."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import Code, InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class EnrolItem:
    """One gallery image to enrol: a file to upload, or an object already in the store."""

    subject_id: str
    path: Path | None = None
    key: str | None = None  # an object key in the store (a booking system that uploads its own photos)
    booking_date: str | None = None  # YYYY-MM-DD, kept with the subject's record (the sheet shows newest first)
    booking_number: str | None = None  # the booking system's number for this photo, shown on the sheet

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"key:{self.key}"

    def read_bytes(self) -> bytes:
        """The image file's bytes (an item from a transaction file reads its record: gallery.nist)."""
        assert self.path is not None
        return self.path.read_bytes()


def folder_items(root: Path) -> list[tuple[str, Path]]:
    """``<root>/<subject>/<image>`` -> [(subject, path)], sorted."""
    items = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for img in sorted(subject_dir.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                items.append((subject_dir.name, img))
    return items


MANIFEST_COLUMNS = ("subject_id", "image")


def manifest_items(path: Path) -> list[EnrolItem]:
    """A booking system's manifest: CSV with a header ``subject_id,image[,booking_date][,booking_number]``
    (never demographic labels: they would not be read). ``image`` is a
    file path (relative to the manifest's folder) or ``key:<object key>`` for an image already in the
    store. Raises ``INVALID_MESSAGE`` naming the line of the first malformed row."""
    items: list[EnrolItem] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(
                Code.INVALID_MESSAGE, f"{path}: the header must name {', '.join(MANIFEST_COLUMNS)}; missing {missing}"
            )
        for line, row in enumerate(reader, start=2):
            subject = (row.get("subject_id") or "").strip()
            image = (row.get("image") or "").strip()
            booking = (row.get("booking_date") or "").strip() or None
            number = (row.get("booking_number") or "").strip() or None
            if number is not None and (len(number) > 64 or not number.isprintable()):
                raise InputError(
                    Code.INVALID_MESSAGE, f"{path}:{line}: booking_number must be 1-64 printable characters"
                )
            if not subject or not image:
                raise InputError(Code.INVALID_MESSAGE, f"{path}:{line}: subject_id and image are both needed")
            if booking is not None:
                try:
                    dt.date.fromisoformat(booking)
                except ValueError as exc:
                    raise InputError(
                        Code.INVALID_MESSAGE, f"{path}:{line}: booking_date {booking!r} is not YYYY-MM-DD"
                    ) from exc
            if image.startswith("key:"):
                items.append(EnrolItem(subject, key=image[4:], booking_date=booking, booking_number=number))
            else:
                file = Path(image) if Path(image).is_absolute() else path.parent / image
                items.append(EnrolItem(subject, path=file, booking_date=booking, booking_number=number))
    return items


def enrol_job_id(items: list[EnrolItem], engines: Iterable[str]) -> str:
    """The same list of items for the same engines is the same job: a rerun resumes it."""
    h = hashlib.sha256(",".join(engines).encode())
    for it in items:
        h.update(f"\n{it.subject_id}|{it.source}".encode())
    return h.hexdigest()[:32]
