"""The append-only, hash-chained audit trail, and its anchors in the object store.

Every submission (accepted or refused, and why), every published result, every disposition, every
gallery change and every registry change is one row of ``audit_log``:

``seq, ts, actor, agency, action, request_id, case_number, offence_code, purpose, probe_sha256,
outcome, code, details, prev_hash, hash``

* ``seq`` counts from 1 with no gaps; ``prev_hash`` is the previous row's ``hash`` (64 zeros for the
  first row); ``hash`` is the SHA-256 (hex) of the *canonical JSON* of every other field, i.e.
  ``json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8,
  where ``fields`` holds the fourteen columns above except ``hash`` (``details`` as its stored JSON
  text, ``seq`` as an integer, every other value a string; absent values are ``""``).
* Writers serialise through :func:`accountability.db.write_tx` (an advisory lock on PostgreSQL, ``BEGIN
  IMMEDIATE`` on SQLite), read the chain head and append in the same transaction, so concurrent
  writers in several processes can never fork the chain.

:func:`verify` recomputes the chain: an edited row no longer matches its hash, a deleted row leaves
a gap in ``seq`` (and a ``prev_hash`` that names nothing), a reordered row breaks ``prev_hash`` and its
own hash (``seq`` is hashed). A chain rewritten from some point on, hashes and all, is caught by the
*anchors*: :func:`anchor` writes ``{"seq", "hash", "ts"}`` of the head to ``audit/anchors/<seq>.json``,

* on an S3 store into a separate bucket ``<bucket>-audit`` created with object lock, each anchor under
  a COMPLIANCE retention of ``audit_anchor_retention_days`` (nobody, root included, can delete or
  overwrite it before then);
* on the disk store under ``<home>/objects/audit/anchors/``, created with ``O_EXCL`` and made
  read-only. This is the weaker guarantee: it stops accidents and naive edits, not a root user of
  the machine, who could rewrite the database and the anchors together. Deployments that need the
  strong guarantee use an S3 store with object lock.

The gateway anchors every ``audit_anchor_interval_s``; ``quorum audit anchor`` does it on demand.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import Engine, select
from sqlalchemy.engine import Connection

from ..core.config import Settings
from ..core.errors import Code, ServiceError
from ..core.retry import call_with_retries
from ..schemas.case import CaseContext
from . import audit_head, db

log = structlog.get_logger()

GENESIS = "0" * 64
_FIELD_MAX = 256  # values taken from refused (possibly hostile) messages are cut to this length

# Actions (the ``action`` column).
SEARCH_SUBMITTED = "search.submitted"  # outcome accepted | refused (code: why)
SEARCH_RESULT = "search.result"  # outcome ok | degraded | error (code)
SEARCH_VIEWED = "search.viewed"  # a candidate sheet written or shown: outcome ok | refused (code); details.via
DISPOSITION_RECORDED = "disposition.recorded"
DISPOSITION_CONFIRMED = "disposition.confirmed"
GALLERY_ENROL = "gallery.enrol"
GALLERY_EXPUNGE = "gallery.expunge"
GALLERY_REINDEX = "gallery.reindex"  # outcome started | ok: an engine's gallery rebuilt for a new version
GALLERY_DROP_VERSION = "gallery.drop_version"  # an old engine version's gallery state deleted
GALLERY_RESHARD = "gallery.reshard"  # outcome started | built | finished | aborted: a new shard layout
PROBE_PURGED = "probe.purged"
CASE_HOLD = "case.hold"
CASE_RELEASE = "case.release"
AUDIT_ANCHORED = "audit.anchored"
HEAD_RESET = "audit.head_reset"  # the head outside the database set back by an operator (after a restore)
# Registry changes use "registry.<what>.<verb>", e.g. registry.agency.add, registry.user.certify.


def now_iso(now: datetime | None = None) -> str:
    """Timestamps as stored: ISO 8601 UTC with microseconds and a ``Z`` (sorts as text)."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clip(v: object) -> str:
    if v is None:
        return ""
    s = v if isinstance(v, str) else str(v)
    return s[:_FIELD_MAX]


@dataclass(frozen=True)
class AuditEvent:
    action: str
    outcome: str
    actor: str = ""
    agency: str = ""
    request_id: str = ""
    case_number: str = ""
    offence_code: str = ""
    purpose: str = ""
    probe_sha256: str = ""
    code: str = ""
    details: dict = field(default_factory=dict)

    @classmethod
    def of_case(
        cls, case: CaseContext, *, action: str, outcome: str, code: str = "", actor: str | None = None, details=None
    ) -> AuditEvent:
        """A record of one search, carrying its case context; ``actor``: who acted, when not the searcher
        (a reviewer viewing the sheet)."""
        return cls(
            action=action,
            outcome=outcome,
            actor=case.user_id if actor is None else actor,
            agency=case.agency_id,
            request_id=case.request_id,
            case_number=case.case_number,
            offence_code=case.offence_code,
            purpose=case.purpose,
            probe_sha256=case.probe_sha256,
            code=code,
            details=dict(details or {}),
        )


HASHED_FIELDS = (
    "seq",
    "ts",
    "actor",
    "agency",
    "action",
    "request_id",
    "case_number",
    "offence_code",
    "purpose",
    "probe_sha256",
    "outcome",
    "code",
    "details",
    "prev_hash",
)


def canonical_json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def record_hash(row: dict) -> str:
    """SHA-256 hex of the canonical JSON of a row's hashed fields (see the module docstring)."""
    fields = {k: (int(row[k]) if k == "seq" else ("" if row[k] is None else str(row[k]))) for k in HASHED_FIELDS}
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def _head(conn: Connection) -> tuple[int, str]:
    t = db.audit_log
    row = conn.execute(select(t.c.seq, t.c.hash).order_by(t.c.seq.desc()).limit(1)).first()
    return (int(row.seq), row.hash) if row else (0, GENESIS)


def append_in(conn: Connection, event: AuditEvent, *, now: datetime | None = None) -> dict:
    """Append one record inside a transaction opened by :func:`accountability.db.write_tx`."""
    seq, prev = _head(conn)
    row: dict[str, object] = {k: _clip(v) for k, v in asdict(event).items() if k != "details"}
    row.update(seq=seq + 1, ts=now_iso(now), details=canonical_json(event.details or {}), prev_hash=prev)
    row["hash"] = record_hash(row)
    conn.execute(db.audit_log.insert().values(**row))
    url = db.redis_url_for(conn.engine)
    if url:  # the head outside the database moves once this record is committed (audit_head)
        seq_, hash_, ts_ = seq + 1, str(row["hash"]), str(row["ts"])

        def advance() -> None:
            audit_head.advance_quietly(url, seq_, hash_, ts_)

        db.after_commit(conn, advance)
    return row


def append(eng: Engine, event: AuditEvent, *, now: datetime | None = None) -> dict:
    """Append one record in its own transaction. Raises ``AUDIT_UNAVAILABLE`` if it cannot."""
    try:
        with db.write_tx(eng) as conn:
            return append_in(conn, event, now=now)
    except ServiceError:
        raise
    except Exception as exc:  # the database's own errors, translated at the boundary
        raise ServiceError(Code.AUDIT_UNAVAILABLE, f"audit write failed: {type(exc).__name__}: {exc}") from exc


def record(s: Settings, event: AuditEvent) -> dict:
    """Append with the process's database for settings ``s`` (the hook the stages call)."""
    try:
        eng = db.get_engine(s)
    except Exception as exc:
        raise ServiceError(Code.AUDIT_UNAVAILABLE, f"audit database unavailable: {exc}") from exc
    return append(eng, event)


def head(eng: Engine) -> tuple[int, str]:
    with eng.connect() as conn:
        return _head(conn)


def rows(eng: Engine, *, batch: int = 5000) -> Iterator[dict]:
    """Every record in ``seq`` order."""
    t = db.audit_log
    last = None
    with eng.connect() as conn:
        while True:
            q = select(t).order_by(t.c.seq).limit(batch)
            if last is not None:
                q = q.where(t.c.seq > last)
            chunk = [dict(r._mapping) for r in conn.execute(q)]
            if not chunk:
                return
            yield from chunk
            last = chunk[-1]["seq"]


# ---- verification ---------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    ok: bool
    records: int
    head_seq: int = 0
    head_hash: str = GENESIS
    first_bad_seq: int | None = None
    problem: str = ""
    anchors_checked: int = 0
    # The head outside the database (audit_head): None when not checked; else the last seq it confirms.
    confirmed_seq: int | None = None
    unconfirmed_since: str = ""  # ts of the first record the outside head does not confirm
    head_note: str = ""
    dispositions_checked: int = 0
    hashes: dict[int, str] = field(default_factory=dict, repr=False)  # seq -> hash of every record read

    @property
    def complete(self) -> bool:
        """Every record is confirmed by the outside head (False when it was not checked)."""
        return self.confirmed_seq is not None and self.confirmed_seq >= self.head_seq

    def summary(self) -> str:
        if not self.ok:
            where = f" at seq {self.first_bad_seq}" if self.first_bad_seq is not None else ""
            return f"BROKEN{where}: {self.problem}"
        body = (
            f"{self.records} records, chain intact up to seq {self.head_seq} ({self.head_hash[:16]}...), "
            f"{self.anchors_checked} anchors match, {self.dispositions_checked} dispositions match their records"
        )
        if self.confirmed_seq is None:
            return f"OK: {body}; completeness not checked ({self.head_note or 'no outside head'})"
        if self.complete:
            return f"OK: {body}, the outside head confirms the last record"
        return (
            f"UNCONFIRMED: {body}; cannot confirm completeness since seq {self.confirmed_seq + 1} "
            f"({self.unconfirmed_since or 'time unknown'}): {self.head_note}"
        )


def _details(r: dict) -> dict:
    try:
        got = json.loads(r["details"] or "{}")
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


@dataclass
class _Trail:
    """What verification gathers while it walks the chain, besides the hashes."""

    submitted: dict[tuple[str, str], str] = field(default_factory=dict)  # (agency, request) -> outcome
    orphans: list[dict] = field(default_factory=list)  # search.result rows without an audited submission
    recorded: dict[int, dict] = field(default_factory=dict)  # disposition id -> what its record says
    confirmed: dict[int, dict] = field(default_factory=dict)
    ts: dict[int, str] = field(default_factory=dict)  # seq -> ts, of records the head may not confirm

    def see(self, r: dict) -> None:
        action = r["action"]
        if action == SEARCH_SUBMITTED:
            key = (r["agency"], r["request_id"])
            if self.submitted.get(key) != "accepted":
                self.submitted[key] = r["outcome"]
        elif action == SEARCH_RESULT:
            sub = self.submitted.get((r["agency"], r["request_id"]))
            if sub is None or (r["outcome"] in {"ok", "degraded"} and sub != "accepted"):
                self.orphans.append(r)
        elif action == DISPOSITION_RECORDED and r["outcome"] in {"final", "pending"}:
            d = _details(r)
            if "disposition_id" in d:
                self.recorded[int(d["disposition_id"])] = {
                    "seq": int(r["seq"]),
                    "request_id": r["request_id"],
                    "agency_id": r["agency"],
                    "case_number": r["case_number"],
                    "user_id": d.get("user", r["actor"]),  # records before "user" was kept: the actor
                    "outcome": d.get("disposition", ""),
                    "candidate": d.get("candidate", ""),
                    "note": d.get("note", ""),
                    "status": r["outcome"],
                }
        elif action == DISPOSITION_CONFIRMED and r["outcome"] == "confirmed":
            d = _details(r)
            if "disposition_id" in d:
                self.confirmed[int(d["disposition_id"])] = {"seq": int(r["seq"]), "by": d.get("user", r["actor"])}


def verify_rows(records: Iterable[dict], anchors: Iterable[dict] = (), *, trail: _Trail | None = None) -> VerifyReport:
    """Recompute the chain over ``records`` (in stored ``seq`` order) and check ``anchors`` against it,
    and that every ``search.result`` follows an audited ``search.submitted`` of its request."""
    expected_seq, prev, n = 1, GENESIS, 0
    hashes: dict[int, str] = {}
    trail = trail if trail is not None else _Trail()

    def bad(seq: int, problem: str) -> VerifyReport:
        return VerifyReport(False, n, expected_seq - 1, prev, seq, problem)

    for r in records:
        seq = int(r["seq"])
        if seq != expected_seq:
            return bad(
                expected_seq,
                f"record seq {expected_seq} is missing (next stored record is seq {seq}): deleted or reordered",
            )
        if r["prev_hash"] != prev:
            return bad(
                seq,
                "prev_hash does not match the previous record's hash: a record before it was "
                "deleted, edited or reordered",
            )
        if record_hash(r) != r["hash"]:
            return bad(seq, "the record's content does not match its hash: edited")
        prev = r["hash"]
        hashes[seq] = prev
        trail.ts[seq] = r["ts"]
        trail.see(r)
        n += 1
        expected_seq += 1
    report = VerifyReport(True, n, expected_seq - 1, prev, hashes=hashes)
    for a in sorted(anchors, key=lambda a: int(a["seq"])):
        seq = int(a["seq"])
        if seq not in hashes:
            report.ok, report.first_bad_seq = False, seq
            report.problem = f"anchor for seq {seq} names a record the chain no longer has: truncated"
            return report
        if hashes[seq] != a["hash"]:
            report.ok, report.first_bad_seq = False, seq
            report.problem = f"anchor for seq {seq} does not match the chain: the chain was rewritten"
            return report
        report.anchors_checked += 1
    if trail.orphans:
        o = trail.orphans[0]
        report.ok, report.first_bad_seq = False, int(o["seq"])
        report.problem = (
            f"search.result of request {o['request_id']!r} (agency {o['agency']!r}) has no accepted "
            f"search.submitted before it: searched without an audited submission "
            f"({len(trail.orphans)} such result{'s' if len(trail.orphans) != 1 else ''})"
        )
    return report


def check_head(report: VerifyReport, head: audit_head.Head | None) -> None:
    """Check the chain ``report`` describes against the outside head read *before* the records were:
    every record up to that head was committed before them, so the database must hold it, with that hash."""
    if not report.ok:
        return
    if head is None:
        report.confirmed_seq = 0
        report.head_note = "no audit head in Redis (lost, reset, or never written)" if report.records else ""
        return
    if head.seq > report.head_seq:
        report.ok, report.first_bad_seq = False, report.head_seq + 1
        report.problem = (
            f"the audit head outside the database is at seq {head.seq} ({head.ts}) but the database ends at "
            f"seq {report.head_seq}: the newest records were deleted"
        )
        return
    if report.hashes.get(head.seq) != head.hash:
        report.ok, report.first_bad_seq = False, head.seq
        report.problem = (
            f"record seq {head.seq} does not match the audit head outside the database ({head.ts}): "
            "the chain was rewritten and re-hashed"
        )
        return
    report.confirmed_seq = head.seq


def confirm_later(report: VerifyReport, head: audit_head.Head | None) -> None:
    """The head read again *after* the records: a writer that committed before the read may have moved
    it meanwhile. A head past the records read confirms them all (it was written on top of them)."""
    if not report.ok or head is None or report.confirmed_seq is None:
        return
    if head.seq > report.head_seq:
        report.confirmed_seq = report.head_seq
    elif head.seq > report.confirmed_seq and report.hashes.get(head.seq) == head.hash:
        report.confirmed_seq = head.seq


def check_dispositions(report: VerifyReport, table: Iterable[dict], trail: _Trail) -> None:
    """Every row of the dispositions table (which the usage report counts) must say what its audit records
    say: the decision as recorded, and ``confirmed`` only with a ``disposition.confirmed`` record."""
    if not report.ok:
        return
    seen: set[int] = set()
    for row in table:
        did = int(row["id"])
        seen.add(did)
        rec = trail.recorded.get(did)
        if rec is None:
            report.ok, report.first_bad_seq = False, None
            report.problem = f"disposition {did} has no disposition.recorded audit record: written outside Quorum"
            return
        conf = trail.confirmed.get(did)
        fields = ("request_id", "agency_id", "case_number", "user_id", "outcome", "candidate", "note")
        want = {k: rec[k] for k in fields}
        want["status"] = "confirmed" if conf else rec["status"]
        want["confirmed_by"] = conf["by"] if conf else ""
        for k, v in want.items():
            got = "" if row.get(k) is None else str(row[k])
            if got != str(v):
                report.ok, report.first_bad_seq = False, rec["seq"]
                report.problem = (
                    f"disposition {did} does not match its audit record (seq {rec['seq']}): {k} is {got!r} "
                    f"in the dispositions table, {v!r} in the audit trail: edited"
                )
                return
        report.dispositions_checked += 1
    missing = sorted(set(trail.recorded) - seen)
    if missing:
        rec = trail.recorded[missing[0]]
        report.ok, report.first_bad_seq = False, rec["seq"]
        report.problem = f"disposition {missing[0]} (recorded at seq {rec['seq']}) is missing from the table: deleted"


def verify(
    eng: Engine,
    anchors: AnchorStore | None = None,
    head: audit_head.OutsideHead | None = None,
    *,
    settle_s: float = 1.0,
) -> VerifyReport:
    """The chain, its anchors, the dispositions table against its records, and with ``head`` the outside
    head (:mod:`audit_head`): a trail cut short or re-hashed since the last anchor is caught there."""
    import time

    before = head.read() if head is not None else None
    trail = _Trail()
    report = verify_rows(rows(eng), anchors.read_all() if anchors else (), trail=trail)
    with eng.connect() as conn:
        table = [dict(r._mapping) for r in conn.execute(select(db.dispositions).order_by(db.dispositions.c.id))]
    if head is None:
        check_dispositions(report, table, trail)
        return report
    check_head(report, before)  # first: records cut off the end explain any disposition they leave unexplained
    check_dispositions(report, table, trail)
    deadline = time.monotonic() + settle_s
    while report.ok and not report.complete:
        confirm_later(report, head.read())
        if report.complete or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if report.ok and not report.complete and report.confirmed_seq is not None:
        report.unconfirmed_since = trail.ts.get(report.confirmed_seq + 1, "")
        report.head_note = report.head_note or (
            f"the audit head outside the database is at seq {report.confirmed_seq}: records after it were "
            "written while Redis could not be reached (audit.head_unavailable in the logs), or added to the "
            "database outside Quorum"
        )
    return report


# ---- queries ----------------------------------------------------------------------------------------


def query(
    eng: Engine,
    *,
    agency: str | None = None,
    actor: str | None = None,
    case_number: str | None = None,
    request_id: str | None = None,
    action: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Records matching every filter given; ``since``/``until`` are ISO timestamps (``until`` exclusive)."""
    t = db.audit_log
    q = select(t).order_by(t.c.seq)
    for col, val in (
        (t.c.agency, agency),
        (t.c.actor, actor),
        (t.c.case_number, case_number),
        (t.c.request_id, request_id),
    ):
        if val is not None:
            q = q.where(col == val)
    if action:
        q = q.where(t.c.action.like(action.replace("*", "%")) if "*" in action else t.c.action == action)
    if since:
        q = q.where(t.c.ts >= _ts_bound(since))
    if until:
        q = q.where(t.c.ts < _ts_bound(until))
    if limit:
        q = q.limit(limit)
    with eng.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def _ts_bound(value: str) -> str:
    """``2026-01-31`` or any ISO datetime -> the stored timestamp format (UTC)."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return now_iso(dt)


def is_known_probe(eng: Engine, sha256: str) -> bool:
    """Has this image ever been submitted as a probe?"""
    t = db.audit_log
    with eng.connect() as conn:
        return (
            conn.execute(
                select(t.c.seq).where(t.c.probe_sha256 == sha256, t.c.action == SEARCH_SUBMITTED).limit(1)
            ).first()
            is not None
        )


# ---- anchors ----------------------------------------------------------------------------------------

ANCHOR_PREFIX = "audit/anchors/"


def anchor_key(seq: int) -> str:
    return f"{ANCHOR_PREFIX}{seq:012d}.json"


class AnchorStore(ABC):
    """Write-once storage of chain heads."""

    kind = "none"

    @abstractmethod
    def put(self, key: str, body: bytes) -> bool:  # False: an anchor with that key exists already
        ...

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    def read_all(self) -> list[dict]:
        return [json.loads(self.get(k)) for k in self.keys()]


class DiskAnchors(AnchorStore):
    """``O_EXCL`` create, then mode 0444: write-once against accidents, not against root (see above)."""

    kind = "disk"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def put(self, key: str, body: bytes) -> bool:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        return True

    def keys(self) -> list[str]:
        base = self.root / ANCHOR_PREFIX
        return sorted(str(p.relative_to(self.root)) for p in base.glob("*.json")) if base.exists() else []

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


class S3Anchors(AnchorStore):
    """A bucket created with object lock; every anchor gets a COMPLIANCE retention."""

    kind = "s3"

    def __init__(self, client, bucket: str, retention_days: int) -> None:
        from minio.error import S3Error

        self.client, self.bucket, self.retention_days = client, bucket, retention_days
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket, object_lock=True)
        except S3Error as exc:
            if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise ServiceError(Code.STORE_UNAVAILABLE, f"anchor bucket {bucket}: {exc.code}") from exc

    def put(self, key: str, body: bytes) -> bool:
        from minio.commonconfig import COMPLIANCE
        from minio.retention import Retention

        try:
            self.client.stat_object(self.bucket, key)
            return False
        except Exception:  # absent (NoSuchKey) is the normal case
            pass
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=self.retention_days)
        self.client.put_object(
            self.bucket,
            key,
            io.BytesIO(body),
            len(body),
            retention=Retention(COMPLIANCE, until),
            content_type="application/json",
        )
        return True

    def keys(self) -> list[str]:
        return sorted(
            o.object_name for o in self.client.list_objects(self.bucket, prefix=ANCHOR_PREFIX, recursive=True)
        )

    def get(self, key: str) -> bytes:
        resp = self.client.get_object(self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()


def open_anchors(s: Settings) -> AnchorStore:
    if s.store_kind == "s3":
        from minio import Minio

        client = Minio(
            s.s3_endpoint,
            access_key=s.s3_access_key,
            secret_key=s.s3_secret_key,
            secure=s.s3_secure,
            region=s.s3_region,
        )
        return S3Anchors(client, f"{s.s3_bucket}-audit", s.audit_anchor_retention_days)
    return DiskAnchors(Path(s.home) / "objects")


def anchor(eng: Engine, anchors: AnchorStore, *, actor: str = "system") -> dict | None:
    """Anchor the chain head (nothing to do when it is anchored already or the chain is empty).

    The anchoring itself is then audited, so the next anchor covers this one.
    """
    seq, h = head(eng)
    if seq == 0:
        return None
    doc = {"seq": seq, "hash": h, "ts": now_iso()}
    if not anchors.put(anchor_key(seq), canonical_json(doc).encode()):
        return None
    append(
        eng,
        AuditEvent(
            action=AUDIT_ANCHORED,
            outcome="ok",
            actor=actor,
            details={"anchored_seq": seq, "hash": h, "store": anchors.kind, "key": anchor_key(seq)},
        ),
    )
    log.info("audit.anchored", seq=seq, store=anchors.kind)
    return doc


# ---- hooks the pipeline calls ---------------------------------------------------------------------------


def result_recorded(s: Settings, request_id: str) -> bool:
    """Whether a request's result is already in the audit trail."""
    try:
        eng = db.get_engine(s)
        t = db.audit_log
        with eng.connect() as conn:
            q = select(t.c.seq).where(t.c.request_id == request_id, t.c.action == SEARCH_RESULT).limit(1)
            return conn.execute(q).first() is not None
    except Exception as exc:
        raise ServiceError(Code.AUDIT_UNAVAILABLE, f"audit read failed: {type(exc).__name__}: {exc}") from exc


def record_result(s: Settings, job, result, *, engines: dict | None = None, attempts: int = 3) -> bool:
    """Audit a result before it is published (``job``: ``schemas.job.Job``; ``result``: CandidateList or
    ErrorResult). Once per request: returns False, writing nothing, if the request's result is already
    recorded (a publication retried after the audit write succeeded). Raises ``AUDIT_UNAVAILABLE`` if
    the database stays unavailable over ``attempts``: the caller then holds the result back, since no
    result may reach an agency without its audit record.
    """
    if result.type == "candidate_list":
        outcome, code = ("degraded" if result.degraded else "ok"), ""
        details = {
            "candidates": len(result.candidates),
            "engines_contributed": result.engines_contributed,
            "engines_failed": result.engines_failed,
            "duration_ms": result.duration_ms,
            "fusion_method": result.fusion_method,
            "engines": engines or {},
        }
    else:
        outcome, code = "error", result.code
        details = {"stage": result.stage, "message": result.message[:500], "retryable": result.retryable}
    event = AuditEvent.of_case(job.case, action=SEARCH_RESULT, outcome=outcome, code=code, details=details)

    def once() -> bool:
        if result_recorded(s, job.request_id):
            return False
        record(s, event)
        return True

    return call_with_retries(once, attempts=attempts)
