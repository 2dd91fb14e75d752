"""Where a candidate sheet comes from: the stack, for one request id.

* who searched, for which case, offence and purpose, and when: the audit trail's accepted
  ``search.submitted`` record (it outlives the Redis result), which also names the probe's object key;
* the candidate list: the request's result key in Redis, kept ``result_ttl_s`` (``RESULT_EXPIRED``
  once it is gone; ``NO_CANDIDATE_LIST`` for a refusal, an error answer or a search still running);
* the probe: from the object store (probe images never stay in Redis), decoded as intake decoded it,
  and every face YuNet finds in it, numbered as ``--face-index`` counts them (0 = largest). A probe
  purged under retention leaves the sheet without a picture, and says so;
* each candidate's thumbnail: the subject's first enrolled image in the object store. A subject no
  longer in the gallery, or expunged at any time since the search, is shown as *removed*: no id, no
  picture, no scores.

:func:`gather` builds the :class:`~review.sheet.Sheet` (``review.sheet.build``) from them;
:func:`write_sheet` audits the view (``search.viewed``: who, which request, how) before it renders and
writes the file: no sheet leaves without its audit record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import structlog

from ..broker.redis_errors import connect
from ..schemas import CandidateList
from ..schemas.case import CaseContext
from ..schemas.messages import MAX_CANDIDATES
from .bands import Bands
from .render import render
from .sheet import Sheet, build

log = structlog.get_logger()


def _ts_text(iso: str) -> str:
    """An audit timestamp (``2026-11-29T23:41:07.123456Z``) as a person reads it."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


@dataclass(frozen=True)
class Submission:
    """The accepted ``search.submitted`` audit record of a request."""

    case: CaseContext
    image_key: str
    ts: str

    @property
    def request_id(self) -> str:
        return self.case.request_id

    @property
    def agency(self) -> str:
        return self.case.agency_id


def find_submission(eng: Any, request_id: str, agency: str | None = None) -> Submission:
    """The accepted submission of ``request_id`` (of ``agency`` when given), or a coded refusal."""
    from ..accountability import audit
    from ..core.errors import Code, InputError

    recs = [
        r
        for r in audit.query(eng, request_id=request_id, action=audit.SEARCH_SUBMITTED)
        if agency is None or r["agency"] == agency
    ]
    accepted = [r for r in recs if r["outcome"] == "accepted"]
    if not accepted:
        if recs:
            r = recs[-1]
            raise InputError(
                Code.NO_CANDIDATE_LIST,
                f"request {request_id} was refused at submission ({r['code']}): there is no candidate list",
            )
        where = f" of agency {agency!r}" if agency else ""
        raise InputError(Code.REQUEST_UNKNOWN, f"no search {request_id!r}{where} in the audit trail")
    agencies = sorted({r["agency"] for r in accepted})
    if len(agencies) > 1:
        raise InputError(
            Code.REQUEST_UNKNOWN,
            f"request id {request_id!r} was used by agencies {', '.join(agencies)}: pass --agency",
        )
    r = accepted[0]
    details = json.loads(r["details"] or "{}")
    case = CaseContext(
        agency_id=r["agency"],
        user_id=r["actor"],
        request_id=request_id,
        case_number=r["case_number"],
        offence_code=r["offence_code"],
        purpose=r["purpose"],
        probe_sha256=r["probe_sha256"],
    )
    return Submission(
        case=case,
        image_key=details.get("image_key") or f"probes/{r['probe_sha256']}",
        ts=r["ts"],
    )


def load_result(s: Any, redis: Any, eng: Any, sub: Submission, store: Any = None) -> CandidateList:
    """The request's candidate list (from Redis while it holds it, then from the object store), or why
    there is none (a coded error)."""
    from ..accountability import audit
    from ..broker.results import fetch
    from ..core.errors import Code, InputError

    result = fetch(redis, sub.agency, sub.request_id, store)
    if result is None:
        answered = audit.query(eng, request_id=sub.request_id, action=audit.SEARCH_RESULT)
        if answered:
            days = s.result_ttl_s / 86400
            raise InputError(
                Code.RESULT_EXPIRED,
                f"the result of request {sub.request_id} is no longer kept (results are kept {days:g} days, "
                f"QUORUM_RESULT_TTL_S); search again for a new list",
            )
        raise InputError(Code.NO_CANDIDATE_LIST, f"request {sub.request_id} has not been answered yet")
    if not isinstance(result, CandidateList):
        raise InputError(
            Code.NO_CANDIDATE_LIST,
            f"request {sub.request_id} was answered with an error, not a candidate list: "
            f"{result.code}: {result.message}",
        )
    return result


def removed_subjects(redis: Any, eng: Any, subjects: Sequence[str], since: str) -> tuple[frozenset[str], dict]:
    """Subjects not to show (not in the gallery now, or expunged since ``since``), and the gallery
    records of the others (subject -> {images: [...], ...})."""
    from ..accountability import audit
    from ..broker import keys

    names = list(dict.fromkeys(subjects))
    raw = redis.hmget(keys.GALLERY_SUBJECTS, names) if names else []
    records = {n: json.loads(v) for n, v in zip(names, raw, strict=True) if v}
    expunged = set()
    for r in audit.query(eng, action=audit.GALLERY_EXPUNGE, since=since):
        try:
            expunged.add(json.loads(r["details"] or "{}").get("subject_id"))
        except ValueError:
            continue
    gone = frozenset(n for n in names if n not in records or n in expunged)
    return gone, {n: rec for n, rec in records.items() if n not in gone}


def shown_candidates(
    s: Any, redis: Any, eng: Any, request_id: str, agency: str | None = None, store: Any = None
) -> dict[str, int]:
    """The candidates the sheet of ``request_id`` shows (subject -> rank): its list still kept, subjects
    removed from the gallery left out; what a decision may name, in the review app and the CLI alike."""
    sub = find_submission(eng, request_id, agency)
    result = load_result(s, redis, eng, sub, store)
    gone, _ = removed_subjects(redis, eng, [c.subject_id for c in result.candidates], sub.ts)
    return {c.subject_id: c.rank for c in result.candidates if c.subject_id not in gone}


def booking_label(record: dict, key: str) -> str:
    """``booked 2024-02-11 · no. B-1234`` for the photo ``key`` (empty when the booking system gave neither)."""
    date = record.get("booking_dates", {}).get(key)
    number = record.get("booking_numbers", {}).get(key)
    parts = ([f"booked {date}"] if date else []) + ([f"no. {number}"] if number else [])
    return " · ".join(parts)


def newest_booking_first(record: dict) -> list[str]:
    """A subject's image keys, the newest booking photo first (booking dates from the booking system's
    manifest at enrolment); images without a date after those with one, in key order."""
    dates = record.get("booking_dates", {})
    dated = sorted((k for k in record.get("images", []) if k in dates), key=lambda k: (dates[k], k), reverse=True)
    return dated + sorted(k for k in record.get("images", []) if k not in dates)


@cache
def _detector(kind: str = "yunet") -> Any:
    """The detector ``kind`` (the settings' ``detector``), loaded once per process and kind."""
    from ..workers.detect import make_detector

    return make_detector(kind, "cpu")


def probe_faces(s: Any, store: Any, image_key: str) -> tuple[str | None, tuple[int, int] | None, list, str]:
    """The probe as a data URI, its size, every face box (largest first) and a note when it is missing."""
    from ..core.errors import Code, QuorumError
    from ..workers.images import decode_image
    from .images import probe_uri

    try:
        data = store.get(image_key, max_bytes=s.max_image_bytes)
    except QuorumError as err:
        if err.code == Code.IMAGE_MISSING:
            return None, None, [], "the probe image is no longer stored (purged under the retention policy)"
        raise
    image = decode_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
    faces = _detector(getattr(s, "detector", "yunet")).detect(image)
    h, w = image.shape[:2]
    return probe_uri(image), (w, h), [f.box for f in faces], ""


def gather(s: Any, request_id: str, *, agency: str | None = None, generated_by: str = "") -> Sheet:
    """Everything a sheet shows for ``request_id``, read from the audit trail, Redis and the object store."""

    from ..accountability import db
    from ..core.objectstore import open_store
    from ..workers.fusion import load_calibration
    from . import bands as bands_mod
    from .images import thumbnail_uri

    eng = db.get_engine(s)
    r = connect(s.redis_url)
    sub = find_submission(eng, request_id, agency)
    store = open_store(s)
    result = load_result(s, r, eng, sub, store)
    uri, size, boxes, note = probe_faces(s, store, sub.image_key)
    gone, records = removed_subjects(r, eng, [c.subject_id for c in result.candidates], sub.ts)
    thumbs: dict[str, str | None] = {}
    images: dict[str, int] = {}
    bookings: dict[str, str] = {}
    for subject, rec in records.items():
        keys_ = newest_booking_first(rec)
        images[subject] = len(keys_)
        thumbs[subject] = None
        for key in keys_:  # the first image that is still there and decodes
            try:
                thumbs[subject] = thumbnail_uri(store.get(key, max_bytes=s.max_image_bytes))
            except Exception as exc:  # a missing or unreadable thumbnail leaves a blank, not a failed sheet
                log.warning("sheet.thumbnail_unavailable", subject=subject, key=key, error=repr(exc))
                continue
            if thumbs[subject]:
                bookings[subject] = booking_label(rec, key)
                break
    bands: Bands | None = bands_mod.load()
    bands_note = ""
    cal = load_calibration(s.calibration_file)
    fitted = (cal.meta.get("fitted") if cal else None) or ""
    if bands is not None and fitted != bands.calibration_fitted:
        bands_note = (
            f"no strength bands: the calibration in use (fitted {fitted or 'none'}) is not the one the bands "
            f"were measured with ({bands.calibration_fitted})"
        )
        bands = None
    return build(
        result,
        case=sub.case,
        submitted_at=_ts_text(sub.ts),
        probe_uri=uri,
        probe_size=size,
        probe_note=note,
        faces=boxes,
        min_face_pixels=s.min_face_pixels,
        removed=gone,
        thumbs=thumbs,
        images=images,
        bookings=bookings,
        bands=bands,
        bands_note=bands_note,
        list_length=MAX_CANDIDATES,  # engines return full lists (workers.stages.engine_list_length)
        generated_by=generated_by,
    )


def _check_on_behalf(eng: Any, user_id: str, agency: str) -> None:
    """A view for ``user_id`` is for a registered, active user of the search's agency."""
    from ..accountability.registry import snapshot
    from ..core.errors import Code, InputError

    user = snapshot(eng).users.get(user_id)
    if user is None:
        raise InputError(Code.USER_UNKNOWN, f"user {user_id!r} is not registered")
    if user.agency_id != agency:
        raise InputError(Code.USER_OTHER_AGENCY, f"user {user_id!r} belongs to another agency than the search's")
    if not user.active:
        raise InputError(Code.USER_INACTIVE, f"user {user_id!r} is deactivated")


def view_sheet(
    s: Any,
    request_id: str,
    *,
    actor: str,
    agency: str | None = None,
    via: str = "cli",
    on_behalf_of: str = "",
    **details: Any,
) -> Sheet:
    """Gather the sheet of ``request_id`` and audit the view (``search.viewed``: who, which request, how).

    A view that cannot be given (unknown request, no list, result expired; a user it is for who is not
    one of the search's agency) is audited as refused, with its code, and raised. ``agency``: only a
    search of this agency (a reviewer's own). ``on_behalf_of``: the user an operator (``actor``) acts for."""
    from ..accountability import audit, db
    from ..core.errors import QuorumError

    eng = db.get_engine(s)
    if on_behalf_of:
        details = {"on_behalf_of": on_behalf_of, **details}
    case = None  # the search's case, once known: a refusal for the user is audited under it
    try:
        sheet = gather(s, request_id, agency=agency, generated_by=on_behalf_of or actor)
        case = sheet.case
        if on_behalf_of:
            _check_on_behalf(eng, on_behalf_of, sheet.case.agency_id)
    except QuorumError as err:
        if err.code.value in {
            "REQUEST_UNKNOWN",
            "NO_CANDIDATE_LIST",
            "RESULT_EXPIRED",
            "USER_UNKNOWN",
            "USER_OTHER_AGENCY",
            "USER_INACTIVE",
        }:
            code, why = err.code.value, {"via": via, **details}
            if case is not None:
                event = audit.AuditEvent.of_case(
                    case, action=audit.SEARCH_VIEWED, outcome="refused", code=code, actor=actor, details=why
                )
            else:
                event = audit.AuditEvent(
                    action=audit.SEARCH_VIEWED,
                    outcome="refused",
                    code=code,
                    actor=actor,
                    agency=agency or "",
                    request_id=request_id,
                    details=why,
                )
            audit.append(eng, event)
        raise
    details = {"via": via, "candidates": sheet.candidates, "removed": sheet.removed, **details}
    viewed = audit.AuditEvent.of_case(
        sheet.case, action=audit.SEARCH_VIEWED, outcome="ok", actor=actor, details=details
    )
    audit.append(eng, viewed)
    return sheet


def write_sheet(
    s: Any,
    request_id: str,
    out: Path,
    *,
    actor: str,
    agency: str | None = None,
    via: str = "cli",
    on_behalf_of: str = "",
) -> Sheet:
    """Gather, audit, render and write the sheet of ``request_id`` to ``out`` (audited before it is written)."""
    sheet = view_sheet(s, request_id, actor=actor, agency=agency, via=via, on_behalf_of=on_behalf_of, file=out.name)
    out.write_text(render(sheet), encoding="utf-8")
    log.info("sheet.written", request_id=request_id, actor=actor, candidates=sheet.candidates, path=str(out))
    return sheet
