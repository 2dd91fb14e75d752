"""Admission: the rules an intake stream entry must pass before its search starts, as plain steps.

One entry goes through ``parse -> check_version -> authenticate -> validate -> claim -> authorise ->
store -> admit``; each step takes an explicit :class:`AdmissionContext` (Redis, the object store, the
settings, the registry, a clock) and returns the next step's input or raises the
:class:`~core.errors.InputError` that refuses the entry, with its stable code. :func:`admit_entry` runs
the chain and returns an :class:`Admission` (the :class:`~schemas.job.Job` to dispatch) or a
:class:`Refusal` (the error and how to answer it). Nothing here reads a stream, publishes an answer,
counts a metric or writes a refusal's audit record: the gateway does that once per outcome
(:func:`record_refusal` is the audit hook it calls).

The rules, in order (the first failure wins):

0. ``screen``, before anything is parsed: at most ``MAX_FIELDS`` fields (``INVALID_MESSAGE``) and
   ``entry_limit`` bytes in all (``PAYLOAD_TOO_LARGE``). The gateway's intake reader (``broker.intake``)
   measures entries inside Redis and never brings one over the limits into the gateway at all.
1. ``parse``: the entry has a ``payload`` field (at most ``payload_limit`` bytes: ``PAYLOAD_TOO_LARGE``)
   with at most ``MAX_JSON_STRUCTURE`` brackets, commas and colons (``INVALID_MESSAGE``: a bounded parse)
   holding JSON (``INVALID_MESSAGE``). A ``request_id`` string in it (at most 128 characters) is
   remembered for the answer, unvalidated.
2. ``check_version``: a ``schema_version`` other than the one supported (``UNSUPPORTED_SCHEMA_VERSION``).
3. ``authenticate`` (README "Accountability"; only for a JSON object): the agency of the stream is
   registered (``UNKNOWN_AGENCY``), an inline image is not over ``max_image_bytes`` (``IMAGE_TOO_LARGE``,
   before it is hashed for the signature), the entry is signed with the agency's secret
   (``broker.signing``: ``BAD_SIGNATURE``), recently (``STALE_TIMESTAMP``: judged at the entry's
   arrival, which Redis stamps into its id, so an entry redelivered after an outage is judged as it
   was then; an id in the future, which a client may choose, counts as arriving now), and once
   (``REPLAYED_NONCE``: ``SET broker.keys.nonce_key NX`` for twice the window; the same entry
   redelivered keeps its nonce).
4. ``validate``: a case number is present and not a placeholder (``CASE_NUMBER_MISSING``, before the
   schema, so that a missing one is named as such), the message fits :class:`~schemas.ProbeRequest`
   (``INVALID_MESSAGE`` with a summary of the first five problems), and names the agency of the stream
   it came on (``AGENCY_MISMATCH``).

   Refusals up to here answer on the results stream only (``keyed=False``): a request id we could not
   validate is not claimed, and does not set the request's result key.
5. ``claim``: the request id is claimed for this entry (``SET broker.keys.request_key NX`` for
   ``result_ttl_s``); another entry holding it is ``DUPLICATE_REQUEST`` (also answered on the stream
   only: it is not *the* answer to that request id). The same entry redelivered (a gateway died
   mid-way) finds its own claim and carries on: every later step is idempotent.
6. ``authorise``: the registry policy (``accountability.policy.check``: agency, user, role,
   certificate, case number, offence, purpose), then the agency's daily quota (``QUOTA_EXCEEDED``;
   ``broker.keys.quota_key`` counts a UTC day, 0 is unlimited; searches are counted while unlimited
   too, so a quota set mid-day sees the day's earlier ones).
7. ``store``: an inline image (base64) is decoded (``INVALID_MESSAGE``), must not be empty
   (``IMAGE_EMPTY``) or over ``max_image_bytes`` (``IMAGE_TOO_LARGE``), and is stored under
   ``probes/<sha256>``; an object key must name an object (``IMAGE_MISSING``) that is neither empty nor
   too large.
8. ``admit``: the accepted submission is written to the audit trail, then the job is saved
   (``broker.jobs.save_job``); the caller's ``dispatch`` then starts the pipeline.

Refusals from step 6 on are the request's answer (keyed under its result key). If a dependency fails
(a :class:`~core.errors.ServiceError`: Redis, the store, the audit database, the broker) anywhere after
the claim, the claim is released in one place, so that the entry, left pending by the gateway, can be
admitted when it is retried.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from ..accountability import audit, policy
from ..accountability.policy import RegistrySnapshot
from ..broker import keys, signing
from ..broker.jobs import save_job
from ..broker.keys import as_str
from ..broker.redis_errors import redis_boundary
from ..core import metrics
from ..core.config import Settings
from ..core.errors import Code, InputError, QuorumError, ServiceError
from ..core.objectstore import ObjectStore, put_content
from ..schemas import InlineImage, ProbeRequest
from ..schemas.case import CaseContext
from ..schemas.job import Job
from ..schemas.messages import SCHEMA_VERSION

log = structlog.get_logger()

MAX_REQUEST_ID = 128  # longer request ids are not echoed back in a refusal
MAX_FIELDS = 16  # an entry's fields: payload, timestamp, nonce, signature and a few of the client's own
# Brackets, commas and colons a payload may hold: a probe request has about 25 (its strings are short);
# the bound makes every parse cheap, however the payload is built (1.5 million keys in 18 MB, say).
MAX_JSON_STRUCTURE = 1024


class Registry(Protocol):
    """What admission needs of the registry (``accountability.registry.SnapshotCache`` is one)."""

    def get(self) -> RegistrySnapshot: ...

    def secret(self, agency_id: str) -> str | None: ...


@dataclass(frozen=True)
class AdmissionContext:
    redis: Any
    store: ObjectStore
    settings: Settings
    registry: Registry
    now: Callable[[], float] = field(default=time.time)  # epoch seconds


@dataclass(frozen=True)
class Parsed:
    """An entry whose payload is JSON (``doc``: anything JSON can hold, not yet validated)."""

    fields: dict[str, Any]
    doc: Any
    request_id: str | None  # the doc's request id, unvalidated: echoed in a refusal, never claimed


@dataclass(frozen=True)
class StoredImage:
    key: str
    sha256: str


@dataclass(frozen=True)
class Admission:
    """An accepted entry: its audit record is written and its job saved; dispatch ``job``."""

    job: Job
    request: ProbeRequest


@dataclass(frozen=True)
class Refusal:
    """How to answer a refused entry.

    ``request_id``: the one to echo (validated from ``claim`` on, else whatever the payload said);
    ``keyed``: whether the answer is the request's result (set under its result key) or only an entry
    on the results stream; ``doc``: the parsed payload, for the audit record's context.
    """

    error: QuorumError
    request_id: str | None = None
    keyed: bool = False
    doc: Any = None


# ---- the chain ------------------------------------------------------------------------------------


def admit_entry(
    ctx: AdmissionContext,
    agency: str,
    entry_id: str,
    fields: Mapping[Any, Any],
    *,
    dispatch: Callable[[Job], None] | None = None,
) -> Admission | Refusal:
    """Run the steps for one entry of ``agency``'s intake stream.

    Returns the :class:`Admission` (after ``dispatch(job)``, when given, has returned) or the
    :class:`Refusal`. Raises a ``retryable`` error when a dependency fails: the entry must then stay
    pending, and its request id claim has been released.
    """
    parsed: Parsed | None = None
    try:
        screen(entry_size(fields), len(fields), max_bytes=entry_limit(ctx.settings.max_image_bytes))
        parsed = parse(fields, max_bytes=payload_limit(ctx.settings.max_image_bytes))
        check_version(parsed)
        authenticate(ctx, agency, entry_id, parsed)
        req = validate(agency, parsed)
    except QuorumError as err:
        if err.retryable:  # a dependency away: the entry stays pending and is tried again
            raise
        return Refusal(err, parsed.request_id if parsed else None, keyed=False, doc=parsed.doc if parsed else None)
    try:
        claim_key = claim(ctx, agency, entry_id, req)
    except QuorumError as err:  # DUPLICATE_REQUEST: the audit record names no more than the request id
        if err.retryable:
            raise
        return Refusal(err, req.request_id, keyed=False)
    try:
        authorise(ctx, agency, req)
        image = store(ctx, req)
        admission = admit(ctx, agency, entry_id, req, image)
        if dispatch is not None:
            dispatch(admission.job)
        return admission
    except QuorumError as err:
        if not err.retryable:
            return Refusal(err, req.request_id, keyed=True, doc=parsed.doc)
        release(ctx, claim_key)
        raise


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys repeat is refused: parsers disagree on which value wins, and the
    signature must cover exactly what is acted on."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def payload_limit(max_image_bytes: int) -> int:
    """The largest payload read: an inline image at the limit, base64-encoded, plus 64 KiB of fields."""
    return max_image_bytes * 4 // 3 + 4 + 64 * 1024


def entry_limit(max_image_bytes: int) -> int:
    """The largest entry read, all its fields' names and values together: a payload at its limit and
    64 KiB for the others."""
    return payload_limit(max_image_bytes) + 64 * 1024


def entry_size(fields: Mapping[Any, Any]) -> int:
    """An entry's bytes as the intake reader counts them: every field's name and value."""
    return sum(len(k) + len(v) for k, v in fields.items() if isinstance(v, (bytes, str)))


def screen(size: int, n_fields: int, *, max_bytes: int) -> None:
    """Step 0, before anything is parsed: the entry's field count and bytes are within the limits."""
    if n_fields > MAX_FIELDS:
        raise InputError(Code.INVALID_MESSAGE, f"the entry has {n_fields} fields, at most {MAX_FIELDS}")
    if size > max_bytes:
        raise InputError(Code.PAYLOAD_TOO_LARGE, f"entry of {size} bytes, over the limit of {max_bytes}")


def _structure(raw: bytes | str) -> int:
    """How many brackets, commas and colons ``raw`` holds (inside strings too: an upper bound on the
    values a parse would build)."""
    if isinstance(raw, str):
        return raw.count("{") + raw.count("[") + raw.count(",") + raw.count(":")
    return raw.count(b"{") + raw.count(b"[") + raw.count(b",") + raw.count(b":")


def parse(fields: Mapping[Any, Any], *, max_bytes: int | None = None) -> Parsed:
    """The entry's fields (keys as str) and its payload parsed as JSON (strict: one value per key, UTF-8,
    nesting bounded by Python's recursion limit, at most ``max_bytes``)."""
    f = {as_str(k): v for k, v in fields.items()}
    raw = f.get("payload")
    if raw is None:
        raise InputError(Code.INVALID_MESSAGE, "the entry has no 'payload' field")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InputError(Code.PAYLOAD_TOO_LARGE, f"payload of {len(raw)} bytes, over the limit of {max_bytes}")
    if not isinstance(raw, (bytes, str)):
        raise InputError(Code.INVALID_MESSAGE, "the 'payload' field is not a string")
    structure = _structure(raw)
    if structure > MAX_JSON_STRUCTURE:
        raise InputError(
            Code.INVALID_MESSAGE,
            f"payload has {structure} brackets, commas and colons, at most {MAX_JSON_STRUCTURE}: not a probe request",
        )
    try:
        doc = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(Code.INVALID_MESSAGE, f"payload is not JSON: {exc}") from exc
    except RecursionError:
        raise InputError(Code.INVALID_MESSAGE, "payload is nested too deeply") from None
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return Parsed(f, doc, rid if isinstance(rid, str) and len(rid) <= MAX_REQUEST_ID else None)


def check_version(parsed: Parsed) -> Parsed:
    doc = parsed.doc
    if isinstance(doc, dict) and "schema_version" in doc and doc["schema_version"] != SCHEMA_VERSION:
        raise InputError(
            Code.UNSUPPORTED_SCHEMA_VERSION,
            f"schema_version {doc['schema_version']!r} is not supported (use {SCHEMA_VERSION})",
        )
    return parsed


def authenticate(ctx: AdmissionContext, agency: str, entry_id: str, parsed: Parsed) -> Parsed:
    """The agency exists and signed this entry, recently, once (see ``broker.signing``).

    A payload that is not a JSON object is left to :func:`validate` to refuse.
    """
    doc = parsed.doc
    if not isinstance(doc, dict):
        return parsed
    snapshot(ctx)  # refreshes the secrets too
    secret = ctx.registry.secret(agency)
    if secret is None:
        raise InputError(Code.UNKNOWN_AGENCY, f"agency {agency!r} is not a registered member")
    image = doc.get("image")
    limit = ctx.settings.max_image_bytes
    b64 = image.get("data_b64") if isinstance(image, dict) else None
    if isinstance(b64, str) and len(b64) * 3 // 4 > limit + 3:  # before hashing it for the signature
        raise InputError(Code.IMAGE_TOO_LARGE, f"inline image over the limit of {limit} bytes")
    window = ctx.settings.signature_window_s
    # Judged at the entry's arrival: Redis stamps it into the id, so an entry redelivered after an
    # outage is judged as it was then. The id is the client's choice when it gives one (XADD <id>):
    # one in the future counts as arriving now, and blocks nothing. One in the past cannot be chosen
    # (Redis takes only ids above the stream's last, and an agency's user may not delete its stream).
    received = min(int(entry_id.split("-", 1)[0]) / 1000.0, ctx.now())
    signed = signing.verify(secret, doc, parsed.fields, now=received, window_s=window)
    key = keys.nonce_key(agency, signed.nonce)
    with redis_boundary("checking a nonce"):
        fresh = ctx.redis.set(key, entry_id, nx=True, ex=2 * window + 60)
        if not fresh and as_str(ctx.redis.get(key) or b"") != entry_id:
            raise InputError(Code.REPLAYED_NONCE, f"nonce {signed.nonce} was used before")
    return parsed


def validate(agency: str, parsed: Parsed) -> ProbeRequest:
    doc = parsed.doc
    if isinstance(doc, dict):
        case = doc.get("case_number")
        if case is None or isinstance(case, str):
            missing = policy.case_number_problem(case)
            if missing is not None and missing.code == Code.CASE_NUMBER_MISSING:
                raise missing
    try:
        req = ProbeRequest.model_validate(doc)
    except ValidationError as exc:
        raise InputError(Code.INVALID_MESSAGE, _validation_summary(exc)) from exc
    if req.agency_id != agency:
        raise InputError(Code.AGENCY_MISMATCH, f"agency_id {req.agency_id!r} written to the stream of {agency!r}")
    return req


def claim(ctx: AdmissionContext, agency: str, entry_id: str, req: ProbeRequest) -> str:
    """Claim the request id for this entry; returns the claim's key (for :func:`release`)."""
    key = keys.request_key(agency, req.request_id)
    with redis_boundary("claiming a request id"):
        if ctx.redis.set(key, entry_id, nx=True, ex=ctx.settings.result_ttl_s):
            return key
        first = as_str(ctx.redis.get(key) or b"")
    if first != entry_id:
        raise InputError(Code.DUPLICATE_REQUEST, f"request id already used by entry {first}")
    return key  # the same entry redelivered: carry on, every later step is idempotent


def release(ctx: AdmissionContext, claim_key: str) -> None:
    """Give a request id back (a dependency failed after the claim); best effort when Redis is down."""
    try:
        with redis_boundary("releasing a request id"):
            ctx.redis.delete(claim_key)
    except ServiceError as err:  # the claim names this entry, so its retry still carries on
        log.warning("admission.release_failed", claim=claim_key, error=err.message)


def authorise(ctx: AdmissionContext, agency: str, req: ProbeRequest) -> ProbeRequest:
    """The registry policy, then the daily quota (counted only for a search the policy allows)."""
    snap = snapshot(ctx)
    now = ctx.now()
    refusal = policy.check(req, snap, datetime.fromtimestamp(now, UTC))
    if refusal is not None:
        raise refusal
    take_quota(ctx, agency, snap.agencies[agency].daily_quota, now)
    return req


def take_quota(ctx: AdmissionContext, agency: str, quota: int, now: float) -> None:
    """Count one search against the agency's daily quota; ``QUOTA_EXCEEDED`` when over.

    Searches are counted even while the quota is 0 (unlimited), so a quota set during the day counts the
    day's earlier searches: an agency cannot run an unlimited morning and then a full quota."""
    day = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
    key = keys.quota_key(agency, day)
    with redis_boundary("counting the quota"):
        pipe = ctx.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 2 * 86400)
        used, _ = pipe.execute()
        if 0 < quota < used:
            ctx.redis.decr(key)
            metrics.QUOTA_USED.labels(agency).set(quota)
            metrics.QUOTA_LIMIT.labels(agency).set(quota)
            raise InputError(Code.QUOTA_EXCEEDED, f"agency {agency!r} used its {quota} searches for {day}")
    metrics.QUOTA_USED.labels(agency).set(used)
    metrics.QUOTA_LIMIT.labels(agency).set(quota)


def store(ctx: AdmissionContext, req: ProbeRequest) -> StoredImage:
    """Store an inline image under its SHA-256, or check the object an image key names."""
    limit = ctx.settings.max_image_bytes
    if isinstance(req.image, InlineImage):
        b64 = req.image.data_b64
        if len(b64) * 3 // 4 > limit + 3:
            raise InputError(Code.IMAGE_TOO_LARGE, f"inline image over the limit of {limit} bytes")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(Code.INVALID_MESSAGE, "image.data_b64 is not valid base64") from exc
        if not data:
            raise InputError(Code.IMAGE_EMPTY, "the image is empty")
        if len(data) > limit:
            raise InputError(Code.IMAGE_TOO_LARGE, f"{len(data)} bytes is over the limit of {limit}")
        key = put_content(ctx.store, "probes", data)
        return StoredImage(key, hashlib.sha256(data).hexdigest())
    key = req.image.key
    size = ctx.store.size(key)
    if size is None:
        raise InputError(Code.IMAGE_MISSING, f"no object {key} in the store")
    if size == 0:
        raise InputError(Code.IMAGE_EMPTY, "the image is empty")
    if size > limit:
        raise InputError(Code.IMAGE_TOO_LARGE, f"{size} bytes is over the limit of {limit}")
    return StoredImage(key, key.rsplit("/", 1)[-1])


def admit(ctx: AdmissionContext, agency: str, entry_id: str, req: ProbeRequest, image: StoredImage) -> Admission:
    """Audit the accepted submission, then save its job (nothing runs unaudited)."""
    case = CaseContext(
        agency_id=agency,
        user_id=req.user_id,
        request_id=req.request_id,
        case_number=req.case_number,
        offence_code=req.offence_code,
        purpose=req.purpose,
        probe_sha256=image.sha256,
    )
    details = {"entry_id": entry_id, "image_key": image.key}
    audit.record(
        ctx.settings, audit.AuditEvent.of_case(case, action=audit.SEARCH_SUBMITTED, outcome="accepted", details=details)
    )
    job = Job.for_case(
        case,
        image_key=image.key,
        candidates=req.candidates,
        face_index=req.face_index,
        engines=tuple(ctx.settings.engines),
        received_at=ctx.now(),
        stream_entry_id=entry_id,
    )
    with redis_boundary("saving a job"):
        save_job(ctx.redis, job, ttl_s=ctx.settings.result_ttl_s)
    return Admission(job, req)


# ---- helpers and the refusal hook ------------------------------------------------------------------


def snapshot(ctx: AdmissionContext) -> RegistrySnapshot:
    """The registry snapshot; the database's errors become ``AUDIT_UNAVAILABLE``."""
    try:
        return ctx.registry.get()
    except ServiceError:
        raise
    except Exception as exc:  # the database's errors, translated at the boundary
        raise ServiceError(Code.AUDIT_UNAVAILABLE, f"registry read failed: {type(exc).__name__}") from exc


def record_refusal(ctx: AdmissionContext, agency: str, entry_id: str, refusal: Refusal) -> None:
    """Write a refusal's audit record (before it is answered). Raises ``AUDIT_UNAVAILABLE`` if it cannot."""
    err = refusal.error
    case = audit_context(refusal.doc, agency, refusal.request_id or "")
    details = {"entry_id": entry_id, "reason": err.message[:500]}
    event = audit.AuditEvent.of_case(
        case, action=audit.SEARCH_SUBMITTED, outcome="refused", code=err.code.value, details=details
    )
    audit.record(ctx.settings, event)


def audit_context(doc: object, agency: str = "", request_id: str = "") -> CaseContext:
    """What a (possibly broken) request says about who, why and which image, for its audit record."""
    if not isinstance(doc, dict):
        return CaseContext(agency_id=agency, request_id=request_id)
    said = {
        k: str(doc[k])
        for k in ("user_id", "case_number", "offence_code", "purpose")
        if isinstance(doc.get(k), (str, int))
    }
    image = doc.get("image")
    if isinstance(image, dict):
        if isinstance(image.get("key"), str):
            said["probe_sha256"] = image["key"].rsplit("/", 1)[-1]
        elif isinstance(image.get("data_b64"), str):
            with contextlib.suppress(binascii.Error, ValueError):
                said["probe_sha256"] = hashlib.sha256(base64.b64decode(image["data_b64"], validate=True)).hexdigest()
    return CaseContext(agency_id=agency, request_id=request_id, **said)


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "(message)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
