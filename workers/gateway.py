"""The gateway: reads agencies' probe requests from Redis streams and starts the pipeline.

Agencies need no Python: each writes ``XADD quorum:intake:<agency> * payload <ProbeRequest JSON>``.
The gateway reads every agency stream through one consumer group (several gateways share the work),
validates the message, stores an inline image under its SHA-256, records the job and sends
``quorum.intake.prepare``. Every entry gets an answer on ``quorum:results:<agency>``: a candidate
list later, or an error result with a stable code now. An entry is acknowledged only once it has
been answered or handed to Celery; entries left pending by a gateway that died are claimed by
another after ``claim_idle_ms``.

Accountability (README "Accountability"): before any image is stored, the gateway checks the entry's
signature (``quorum.signing``: ``BAD_SIGNATURE``, ``STALE_TIMESTAMP``, ``REPLAYED_NONCE``), then the
registry policy (``quorum.policy.check``) and the agency's daily quota (``QUOTA_EXCEEDED``). Every
entry, accepted or refused, is recorded in the audit trail (``quorum.audit``) before it is answered
or dispatched; if the audit database cannot be written the entry stays pending (nothing runs
unaudited). The gateway also anchors the audit chain head every ``audit_anchor_interval_s``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime

import structlog
from pydantic import ValidationError

from broker import keys
from broker.keys import as_str
from broker.app import ALL_QUEUES, INTAKE_QUEUE
from broker.results import publish
from quorum import audit, metrics, policy, signing
from quorum.config import Settings
from quorum.errors import Code, InputError, QuorumError, ServiceError
from quorum.objectstore import ObjectStore, put_content
from schemas import ErrorResult, InlineImage, ProbeRequest
from schemas.messages import SCHEMA_VERSION
from workers.job import Job

log = structlog.get_logger()



def nonce_key(agency: str, nonce: str) -> str:
    """A signed entry's nonce, kept for twice the signature window (replay refusal)."""
    return f"quorum:nonce:{agency}:{nonce}"


def quota_key(agency: str, day: str) -> str:
    """Searches accepted for an agency on a UTC day (``YYYYMMDD``)."""
    return f"quorum:quota:{agency}:{day}"


def _audit_context(doc: object) -> dict[str, str]:
    """What a (possibly broken) request says about who, why and which image, for its audit record."""
    if not isinstance(doc, dict):
        return {}
    out = {k: doc[k] for k in ("user_id", "case_number", "offence_code", "purpose")
           if isinstance(doc.get(k), (str, int))}
    image = doc.get("image")
    if isinstance(image, dict):
        if isinstance(image.get("key"), str):
            out["probe_sha256"] = image["key"].rsplit("/", 1)[-1]
        elif isinstance(image.get("data_b64"), str):
            try:
                out["probe_sha256"] = hashlib.sha256(base64.b64decode(image["data_b64"], validate=True)).hexdigest()
            except (binascii.Error, ValueError):
                pass
    return out


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "(message)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class Gateway:
    def __init__(self, redis, store: ObjectStore, settings: Settings, *, consumer: str | None = None,
                 claim_idle_ms: int = 60_000) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.streams: set[str] = set()
        self._last_discover = 0.0
        self._last_sample = 0.0
        self._registry = None
        self._last_anchor = time.monotonic()

    @property
    def registry(self):
        """The registry snapshot cache (opens the database, migrating it, on first use)."""
        if self._registry is None:
            from quorum import db
            from quorum.registry import SnapshotCache

            try:
                self._registry = SnapshotCache(db.get_engine(self.settings))
            except Exception as exc:
                raise ServiceError(Code.AUDIT_UNAVAILABLE, f"registry database unavailable: {exc}") from exc
        return self._registry

    def _snapshot(self):
        try:
            return self.registry.get()
        except ServiceError:
            raise
        except Exception as exc:  # the database's errors, translated at the boundary
            raise ServiceError(Code.AUDIT_UNAVAILABLE, f"registry read failed: {type(exc).__name__}") from exc

    def anchor_audit(self, force: bool = False) -> None:
        """Anchor the audit chain head in the object store every ``audit_anchor_interval_s``."""
        every = self.settings.audit_anchor_interval_s
        if not force and (every <= 0 or time.monotonic() - self._last_anchor < every):
            return
        self._last_anchor = time.monotonic()
        try:
            from quorum import db

            audit.anchor(db.get_engine(self.settings), audit.open_anchors(self.settings), actor="gateway")
        except Exception as exc:  # anchoring is periodic: a failure is logged and retried next time
            log.warning("audit.anchor_failed", error=f"{type(exc).__name__}: {exc}")

    # ---- stream bookkeeping ----------------------------------------------------------------
    def discover(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_discover < 2.0:
            return
        self._last_discover = time.monotonic()
        for key in self.redis.scan_iter(match=keys.INTAKE_STREAM_PREFIX + "*", _type="STREAM", count=1000):
            name = as_str(key)
            if name in self.streams:
                continue
            try:
                self.redis.xgroup_create(name, keys.INTAKE_GROUP, id="0", mkstream=True)
            except Exception as exc:  # BUSYGROUP: the group exists already
                if "BUSYGROUP" not in str(exc):
                    raise
            self.streams.add(name)
            log.info("gateway.stream_added", stream=name)

    def sample_queues(self) -> None:
        if time.monotonic() - self._last_sample < 5.0:
            return
        self._last_sample = time.monotonic()
        pipe = self.redis.pipeline()
        for q in ALL_QUEUES:
            pipe.llen(q)
        for q, n in zip(ALL_QUEUES, pipe.execute(), strict=True):
            metrics.QUEUE_LENGTH.labels(q).set(n)

    # ---- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, block_ms: int = 1000) -> None:
        stop = stop or threading.Event()
        log.info("gateway.started", consumer=self.consumer)
        self.discover(force=True)
        self.recover()
        last_recover = time.monotonic()
        while not stop.is_set():
            self.redis.set(f"quorum:gateway:alive:{self.consumer}", "1", ex=15)
            self.poll(block_ms=block_ms)
            self.anchor_audit()
            if time.monotonic() - last_recover > self.claim_idle_ms / 2000:
                self.recover()
                last_recover = time.monotonic()
        log.info("gateway.stopped", consumer=self.consumer)

    def recover(self) -> int:
        """Handle entries left pending: ours from a previous life, and others' idle too long."""
        n = 0
        for stream in sorted(self.streams):
            resp = self.redis.xreadgroup(keys.INTAKE_GROUP, self.consumer, {stream: "0"}, count=1000)
            for _, entries in resp or []:
                for entry_id, fields in entries:
                    if fields:
                        self.handle(stream, as_str(entry_id), fields)
                        n += 1
            start = "0-0"
            while True:
                nxt, claimed, *_ = self.redis.xautoclaim(stream, keys.INTAKE_GROUP, self.consumer,
                                                         self.claim_idle_ms, start_id=start, count=100)
                for entry_id, fields in claimed:
                    if fields:
                        self.handle(stream, as_str(entry_id), fields)
                        n += 1
                start = as_str(nxt)
                if start == "0-0":
                    break
        return n

    def poll(self, block_ms: int = 1000) -> int:
        self.discover()
        self.sample_queues()
        if not self.streams:
            time.sleep(block_ms / 1000)
            return 0
        resp = self.redis.xreadgroup(keys.INTAKE_GROUP, self.consumer, {s: ">" for s in self.streams},
                                     count=50, block=block_ms)
        n = 0
        for stream, entries in resp or []:
            for entry_id, fields in entries:
                self.handle(as_str(stream), as_str(entry_id), fields)
                n += 1
        return n

    # ---- one message ----------------------------------------------------------------------
    def handle(self, stream: str, entry_id: str, fields: dict) -> None:
        """Answer or dispatch one entry, then acknowledge it. Never raises on bad input."""
        agency = stream[len(keys.INTAKE_STREAM_PREFIX):]
        metrics.PROBES_RECEIVED.labels(agency).inc()
        structlog.contextvars.bind_contextvars(agency=agency, entry_id=entry_id)
        try:
            self._handle(agency, entry_id, fields)
        except ServiceError as err:
            # The store or broker is down: leave the entry pending so it is retried (by us on the
            # next recover, or by another gateway), and release the request id so it can be.
            log.warning("gateway.service_error", code=err.code.value, error=err.message)
            return
        except Exception as exc:  # a bug must not take the gateway down or lose the message
            log.exception("gateway.unexpected")
            try:
                self._reject(agency, entry_id, None, QuorumError(Code.INTERNAL, type(exc).__name__))
            except ServiceError as err:
                log.warning("gateway.service_error", code=err.code.value, error=err.message)
                return
        finally:
            structlog.contextvars.unbind_contextvars("agency", "entry_id")
        self.redis.xack(stream, keys.INTAKE_GROUP, entry_id)

    def _reject(self, agency: str, entry_id: str, request_id: str | None, err: QuorumError,
                *, keyed: bool = True, doc: object = None) -> None:
        ctx = _audit_context(doc)
        audit.record(self.settings, audit.AuditEvent(
            action=audit.SEARCH_SUBMITTED, outcome="refused", code=err.code.value, agency=agency,
            actor=ctx.get("user_id", ""), request_id=request_id or "", case_number=ctx.get("case_number", ""),
            offence_code=ctx.get("offence_code", ""), purpose=ctx.get("purpose", ""),
            probe_sha256=ctx.get("probe_sha256", ""), details={"entry_id": entry_id, "reason": err.message[:500]}))
        result = ErrorResult(request_id=request_id, agency_id=agency, stream_entry_id=entry_id,
                             code=err.code.value, message=err.message, retryable=err.retryable, stage="gateway")
        publish(self.redis, result, ttl_s=self.settings.result_ttl_s, keyed=keyed)
        self.redis.xadd(keys.REJECTED_STREAM, {"agency": agency, "entry_id": entry_id, "request_id": request_id or "",
                                               "code": err.code.value}, maxlen=100_000, approximate=True)
        metrics.PROBES_REJECTED.labels(agency, err.code.value).inc()
        log.info("probe.rejected", request_id=request_id, code=err.code.value, reason=err.message)

    def _handle(self, agency: str, entry_id: str, fields: dict) -> None:
        f = {as_str(k): v for k, v in fields.items()}
        raw = f.get("payload")
        request_id = None
        doc = None
        try:
            if raw is None:
                raise InputError(Code.INVALID_MESSAGE, "the entry has no 'payload' field")
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InputError(Code.INVALID_MESSAGE, f"payload is not JSON: {exc}") from exc
            if isinstance(doc, dict) and isinstance(doc.get("request_id"), str) and len(doc["request_id"]) <= 128:
                request_id = doc["request_id"]
            if isinstance(doc, dict) and "schema_version" in doc and doc["schema_version"] != SCHEMA_VERSION:
                raise InputError(Code.UNSUPPORTED_SCHEMA_VERSION,
                                 f"schema_version {doc['schema_version']!r} is not supported (use {SCHEMA_VERSION})")
            if isinstance(doc, dict):
                self._authenticate(agency, entry_id, doc, f)
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
                raise InputError(Code.AGENCY_MISMATCH,
                                 f"agency_id {req.agency_id!r} written to the stream of {agency!r}")
        except InputError as err:
            # A request id we could not validate is not claimed: the answer goes to the stream only.
            self._reject(agency, entry_id, request_id, err, keyed=False, doc=doc)
            return

        claim = keys.request_key(agency, req.request_id)
        ttl = self.settings.result_ttl_s
        if not self.redis.set(claim, entry_id, nx=True, ex=ttl):
            first = as_str(self.redis.get(claim) or b"")
            if first != entry_id:
                self._reject(agency, entry_id, req.request_id,
                             InputError(Code.DUPLICATE_REQUEST, f"request id already used by entry {first}"),
                             keyed=False)
                return
            # Same entry redelivered (a gateway died mid-way): carry on, every step is idempotent.
        try:
            refusal = policy.check(req, self._snapshot(), datetime.now(UTC)) or self._take_quota(agency, entry_id)
        except ServiceError:
            self.redis.delete(claim)
            raise
        if refusal is not None:
            self._reject(agency, entry_id, req.request_id, refusal, doc=doc)
            return
        try:
            image_key, sha = self._store_image(req)
        except InputError as err:
            self._reject(agency, entry_id, req.request_id, err, doc=doc)
            return
        except ServiceError:
            self.redis.delete(claim)
            raise
        try:
            audit.record(self.settings, audit.AuditEvent(
                action=audit.SEARCH_SUBMITTED, outcome="accepted", agency=agency, actor=req.user_id,
                request_id=req.request_id, case_number=req.case_number, offence_code=req.offence_code,
                purpose=req.purpose, probe_sha256=sha, details={"entry_id": entry_id, "image_key": image_key}))
        except ServiceError:
            self.redis.delete(claim)
            raise
        job = Job(request_id=req.request_id, agency_id=agency, user_id=req.user_id, case_number=req.case_number,
                  offence_code=req.offence_code, purpose=req.purpose, image_key=image_key, probe_sha256=sha,
                  candidates=req.candidates, face_index=req.face_index, engines=list(self.settings.engines),
                  received_at=time.time(), stream_entry_id=entry_id)
        job.save(self.redis, ttl)
        from workers.tasks import prepare

        try:
            prepare.apply_async(args=[req.request_id], queue=INTAKE_QUEUE, task_id=f"{req.request_id}.prepare")
        except Exception as exc:
            self.redis.delete(claim)
            raise ServiceError(Code.BROKER_UNAVAILABLE, str(exc)) from exc
        log.info("probe.accepted", request_id=req.request_id, case=req.case_number, purpose=req.purpose)

    def _authenticate(self, agency: str, entry_id: str, doc: dict, fields: dict) -> None:
        """The agency exists and signed this entry, recently, once (see ``quorum.signing``)."""
        self._snapshot()
        secret = self.registry.secret(agency)
        if secret is None:
            raise InputError(Code.UNKNOWN_AGENCY, f"agency {agency!r} is not a registered member")
        image = doc.get("image")
        limit = self.settings.max_image_bytes
        b64 = image.get("data_b64") if isinstance(image, dict) else None
        if isinstance(b64, str) and len(b64) * 3 // 4 > limit + 3:  # before hashing it for the signature
            raise InputError(Code.IMAGE_TOO_LARGE, f"inline image over the limit of {limit} bytes")
        # Freshness is judged at the entry's arrival (Redis stamps its id), so an entry redelivered
        # after an outage is judged as it was then; an id forged into the future is stale too.
        window = self.settings.signature_window_s
        received = int(entry_id.split("-", 1)[0]) / 1000.0
        if received > time.time() + window:
            raise InputError(Code.STALE_TIMESTAMP, "the stream entry id lies in the future")
        signed = signing.verify(secret, doc, fields, now=received, window_s=window)
        key = nonce_key(agency, signed.nonce)
        if not self.redis.set(key, entry_id, nx=True, ex=2 * window + 60) and as_str(self.redis.get(key) or b"") != entry_id:
            raise InputError(Code.REPLAYED_NONCE, f"nonce {signed.nonce} was used before")

    def _take_quota(self, agency: str, entry_id: str) -> InputError | None:
        """Count one search against the agency's daily quota (0: unlimited); a refusal when over."""
        quota = self._snapshot().agencies[agency].daily_quota
        if quota <= 0:
            return None
        day = datetime.now(UTC).strftime("%Y%m%d")
        key = quota_key(agency, day)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 2 * 86400)
        used, _ = pipe.execute()
        if used > quota:
            self.redis.decr(key)
            return InputError(Code.QUOTA_EXCEEDED, f"agency {agency!r} used its {quota} searches for {day}")
        return None

    def _store_image(self, req: ProbeRequest) -> tuple[str, str]:
        limit = self.settings.max_image_bytes
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
            key = put_content(self.store, "probes", data)
            return key, hashlib.sha256(data).hexdigest()
        key = req.image.key
        size = self.store.size(key)
        if size is None:
            raise InputError(Code.IMAGE_MISSING, f"no object {key} in the store")
        if size == 0:
            raise InputError(Code.IMAGE_EMPTY, "the image is empty")
        if size > limit:
            raise InputError(Code.IMAGE_TOO_LARGE, f"{size} bytes is over the limit of {limit}")
        return key, key.rsplit("/", 1)[-1]
