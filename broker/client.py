"""Submitting probes and waiting for results — the Python face of the stream protocol.

Nothing here is Python-only: an agency's own software does the same with two Redis commands,
``XADD quorum:intake:<agency> * payload <ProbeRequest JSON> timestamp <s> nonce <n> signature <hmac>``
and ``XREAD`` on ``quorum:results:<agency>`` (or ``GET quorum:result:<agency>:<request_id>``). The
signature (HMAC-SHA256 with the agency's secret) is specified in ``broker.signing``. See README.md.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as redis_lib

from ..core import nist
from ..core.errors import Code
from ..schemas import CandidateList, ErrorResult, InlineImage, ObjectImage, ProbeRequest, parse_result
from . import keys, signing
from .keys import as_str
from .sentinel import open_redis


def new_request_id() -> str:
    return uuid.uuid4().hex


class QuorumClient:
    """``secret``: the agency's signing secret (``quorum registry agency add`` prints it once); without
    it, submissions go unsigned and the gateway refuses them with ``BAD_SIGNATURE``."""

    def __init__(
        self,
        redis_url: str,
        agency_id: str,
        user_id: str,
        secret: str | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        submit_retry_s: float = 30.0,
    ) -> None:
        """``redis_url``: one server, or ``redis+sentinel://`` (the primary its sentinels name, followed
        through a failover). ``wait_replicas``: after each XADD, WAIT until that many replicas have the
        entry (deploy/README.md "Redis failover"); ``unconfirmed`` counts entries they did not confirm in
        time (a failover may lose those: the client submits them again, see :meth:`resubmit_lost`)."""
        self.redis = open_redis(redis_url)
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.unconfirmed = 0
        self.submit_retry_s = submit_retry_s
        self.agency_id = agency_id
        self.user_id = user_id
        self.secret = secret
        # request id -> the intake entry that carried it: a refusal decided before the request id can
        # be trusted is answered on the results stream only, keyed by that entry (``stream_entry_id``).
        self.entries: dict[str, str] = {}
        # request id -> the payload submitted, to submit again if Redis loses the entry (a restart).
        self.payloads: dict[str, str] = {}
        self.resubmitted: dict[str, int] = {}  # request id -> how many times, for the caller's report

    def submit(
        self,
        image: bytes | str | Path | ObjectImage,
        *,
        case_number: str,
        offence_code: str,
        purpose: str,
        candidates: int = 250,
        face_index: int | None = None,
        request_id: str | None = None,
    ) -> str:
        """Put a probe request on this agency's intake stream; returns its request id."""
        if isinstance(image, ObjectImage):
            ref: ObjectImage | InlineImage = image
        else:
            data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
            ref = InlineImage(data_b64=base64.b64encode(data).decode())
        req = ProbeRequest(
            request_id=request_id or new_request_id(),
            agency_id=self.agency_id,
            user_id=self.user_id,
            case_number=case_number,
            offence_code=offence_code,
            purpose=purpose,
            image=ref,
            candidates=candidates,
            face_index=face_index,
        )
        payload = req.model_dump_json(exclude_none=True)
        self.payloads[req.request_id] = payload
        self.entries[req.request_id] = self.submit_raw(payload)
        return req.request_id

    def submit_transaction(
        self,
        transaction: str | Path,
        *,
        purpose: str,
        case_number: str | None = None,
        offence_code: str | None = None,
        case_field: str = "2.010",
        offence_field: str = "",
        max_record_bytes: int = 15 * 1024 * 1024,
        **options: Any,
    ) -> str:
        """An ANSI/NIST-ITL transaction as the probe (``core.nist``): its first frontal Type-10 face is the
        image. The case number and offence are read from ``case_field`` / ``offence_field`` of its Type-1
        or Type-2 record only where they are not given (what is given is never overridden). A file that
        cannot be used raises ``InputError`` with its ``NIST_*`` code, before anything is sent."""
        tx = nist.read_transaction(Path(transaction), max_record_bytes=max_record_bytes)
        image = nist.face_bytes(tx.path, nist.first_frontal(tx))
        if case_number is None:
            case_number = (tx.value(case_field) if case_field else None) or ""
        if offence_code is None:
            offence_code = (tx.value(offence_field) if offence_field else None) or ""
        return self.submit(image, case_number=case_number, offence_code=offence_code, purpose=purpose, **options)

    def submit_raw(self, payload: str | bytes, *, sign: bool = True) -> str:
        """Write an arbitrary payload (used by tests to send broken messages), signed when it is a JSON
        object and the client has a secret. Returns the entry id.

        Redis unreachable or read-only (a failover under way: the old primary gone or demoted) is waited
        out for up to ``submit_retry_s``, signing afresh each time (a new nonce): should an earlier try
        have landed after all, the gateway answers the copy ``DUPLICATE_REQUEST``, which is ignored."""
        deadline = time.monotonic() + self.submit_retry_s
        while True:
            try:
                return self.submit_fields(self._fields(payload, sign))
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.exceptions.ReadOnlyError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _fields(self, payload: str | bytes, sign: bool) -> dict:
        fields: dict = {"payload": payload}
        if sign and self.secret:
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                try:
                    fields = signing.sign(self.secret, payload)
                except Exception:  # e.g. image.data_b64 not base64: send it unsigned, the gateway says why
                    fields = {"payload": payload}
        return fields

    def submit_fields(self, fields: dict) -> str:
        """Write an intake entry with exactly these fields. Returns the entry id."""
        if self.wait_replicas <= 0:
            entry = self.redis.xadd(keys.intake_stream(self.agency_id), fields)
        else:  # on one connection: WAIT counts the writes of its own connection
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(keys.intake_stream(self.agency_id), fields)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            entry, acked = pipe.execute()
            self.unconfirmed += int(acked) < self.wait_replicas
        return entry.decode() if isinstance(entry, bytes) else entry

    def result(self, request_id: str) -> CandidateList | ErrorResult | None:
        raw = self.redis.get(keys.result_key(self.agency_id, request_id))
        return parse_result(raw) if raw else None

    def wait(self, request_id: str, timeout: float = 120.0) -> CandidateList | ErrorResult:
        """Block until the request is answered: its result, or a refusal of the entry that carried it
        (raises TimeoutError)."""
        return self.wait_all([request_id], timeout=timeout)[request_id]

    def wait_all(
        self, request_ids: list[str], timeout: float = 600.0, progress: Callable[[int], object] | None = None
    ) -> dict[str, CandidateList | ErrorResult]:
        """Wait for many answers; ``progress(n_done)`` is called as they arrive.

        An answer is the request's published result (``GET quorum:result:<agency>:<id>``), or, for a
        request this client submitted, an error on the results stream naming the intake entry that
        carried it (refusals decided before the request id is trusted are only there). The stream is
        read from just before the first of those entries, so an answer that came before this call is
        not missed.
        """
        pending = set(request_ids)
        done: dict[str, CandidateList | ErrorResult] = {}
        deadline = time.monotonic() + timeout
        stream = keys.results_stream(self.agency_id)
        by_entry = {self.entries[r]: r for r in request_ids if r in self.entries}
        last = _just_before(min(by_entry, key=_entry_order)) if by_entry else "$"
        outage_since: float | None = None
        while True:
            try:
                if outage_since is not None:
                    self.redis.ping()
                    # Redis is back after an outage (a restart): what it lost must be sent again.
                    self.resubmit_lost(sorted(pending), by_entry)
                    outage_since = None
                last = self._poll(pending, done, deadline, stream, last, by_entry, progress)
            except (redis_lib.ConnectionError, redis_lib.TimeoutError):
                if outage_since is None:
                    outage_since = time.monotonic()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(pending)} of {len(request_ids)} results not published in {timeout}s (Redis unreachable)"
                    ) from None
                time.sleep(0.5)
                continue
            if not pending:
                return done

    def resubmit_lost(self, request_ids: list[str], by_entry: dict[str, str]) -> list[str]:
        """Submit again, under the same request id, each request of ours that Redis no longer knows:
        no result, no claim by the gateway (``quorum:request:<agency>:<id>``) and no entry left in the
        intake stream (all three readable by the agency's Redis user).

        Called after Redis was unreachable: a restart keeps what its append-only file had written
        (up to about one second may be lost after a hard kill), and an entry the gateway had not yet
        claimed may be gone. Should a copy be submitted twice after all (the gateway claimed the first
        meanwhile), the gateway answers the second ``DUPLICATE_REQUEST``, which this client ignores.
        """
        again = []
        for rid in request_ids:
            if rid not in self.payloads:
                continue
            # MGET, not EXISTS: an agency's Redis user may GET its own result and request keys, nothing more.
            if any(self.redis.mget([keys.result_key(self.agency_id, rid), keys.request_key(self.agency_id, rid)])):
                continue
            entry_id = self.entries.get(rid)
            if entry_id and self.redis.xrange(keys.intake_stream(self.agency_id), entry_id, entry_id):
                continue  # still waiting in the stream for the gateway
            entry = self.submit_raw(self.payloads[rid])
            old = self.entries.get(rid)
            if old is not None:
                by_entry.pop(old, None)
            self.entries[rid] = entry
            by_entry[entry] = rid
            self.resubmitted[rid] = self.resubmitted.get(rid, 0) + 1
            again.append(rid)
        return again

    def _poll(
        self,
        pending: set[str],
        done: dict[str, CandidateList | ErrorResult],
        deadline: float,
        stream: str,
        last: str,
        by_entry: dict[str, str],
        progress: Callable[[int], object] | None,
    ) -> str:
        """One round: published results by key, then refusals on the stream; returns the stream position."""
        # Check the keys first: results published before we started reading the stream count.
        ids = sorted(pending)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            raws = self.redis.mget([keys.result_key(self.agency_id, r) for r in chunk])
            for rid, raw in zip(chunk, raws, strict=True):
                if raw:
                    done[rid] = parse_result(raw)
                    pending.discard(rid)
        if progress:
            progress(len(done))
        if not pending:
            return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(pending)} of {len(pending) + len(done)} results not published in time")
        resp: list = self.redis.xread({stream: last}, block=int(min(remaining, 1.0) * 1000) or 1, count=1000)
        for _, entries in resp or []:
            for entry_id, fields in entries:
                last = as_str(entry_id)
                self._match_refusal(fields, by_entry, pending, done)
        return last

    @staticmethod
    def _match_refusal(
        fields: dict, by_entry: dict[str, str], pending: set[str], done: dict[str, CandidateList | ErrorResult]
    ) -> None:
        if not by_entry or as_str(fields.get(b"type", fields.get("type", b""))) != "error":
            return
        result = parse_result(fields.get(b"payload", fields.get("payload", b"")))
        if not isinstance(result, ErrorResult) or result.code == Code.DUPLICATE_REQUEST.value:
            return  # a resubmission refused as a duplicate: the request's answer is the first submission's
        rid = by_entry.get(result.stream_entry_id or "")
        if rid is not None and rid in pending:
            done[rid] = result
            pending.discard(rid)


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _just_before(entry_id: str) -> str:
    """A stream id just before the millisecond of ``entry_id``: an answer to that entry, written later
    by the same Redis clock, has a larger id on any stream (XREAD is exclusive of the id it is given).
    An intake stream someone pushed into the future (``XADD <id>`` far ahead) gives every later entry a
    future id while answers keep the clock's: then the answers are read from 5 minutes ago."""
    ms, _ = _entry_order(entry_id)
    now_ms = int(time.time() * 1000)
    if ms > now_ms + FUTURE_MS:
        ms = now_ms - FUTURE_MS
    return f"{max(ms - 1, 0)}-0"


FUTURE_MS = 300_000  # an entry id this far past the client's clock was not stamped by Redis's clock
