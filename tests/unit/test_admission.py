"""Admission steps (workers.admission) on fakeredis, a disk store and a real SQLite registry; and the
gateway's stream handling around them (answer and acknowledge, or leave pending when Redis fails)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from typing import Any

import fakeredis
import pytest
import redis

from quorum.accountability import audit, db, registry
from quorum.broker import keys, liveness, signing
from quorum.broker.jobs import load_job
from quorum.core.config import Settings
from quorum.core.errors import Code, InputError, ServiceError
from quorum.core.objectstore import DiskStore, put_content
from quorum.schemas import CandidateList, ErrorResult, parse_result
from quorum.schemas.case import CaseContext
from quorum.schemas.job import Job
from quorum.workers import admission
from quorum.workers.admission import Admission, AdmissionContext, Refusal, admit_entry, entry_limit
from quorum.workers.gateway import Gateway

A = "agency-a"
B = "agency-b"
Q = "agency-q"  # one search a day
IMAGE = b"\xff\xd8\xff\xe0 not really a jpeg, but admission does not decode images"
LIMIT = 4096


@pytest.fixture
def world(tmp_path):
    db.dispose_all()
    s = Settings(home=str(tmp_path), max_image_bytes=LIMIT, audit_anchor_interval_s=0)
    eng = db.get_engine(s)
    common: dict[str, Any] = {"offences": ("PC211",), "purposes": ("criminal-investigation",)}
    secrets = {
        A: registry.provision(eng, A, users={"inv": "investigator"}, **common),
        B: registry.provision(eng, B, users={"binv": "investigator"}, **common),
        Q: registry.provision(eng, Q, users={"qinv": "investigator"}, daily_quota=1, **common),
    }
    ctx = AdmissionContext(fakeredis.FakeRedis(), DiskStore(tmp_path / "objects"), s, registry.SnapshotCache(eng))
    yield ctx, eng, secrets
    db.dispose_all()


def _doc(agency: str = A, user: str = "inv", image: dict | None = None, **kw: Any) -> dict:
    doc = {
        "schema_version": 1,
        "request_id": uuid.uuid4().hex,
        "agency_id": agency,
        "user_id": user,
        "case_number": "2026-000123",
        "offence_code": "PC211",
        "purpose": "criminal-investigation",
        "image": image if image is not None else {"data_b64": base64.b64encode(IMAGE).decode()},
    }
    doc.update(kw)
    return doc


_seq = iter(range(1, 1_000_000))


def _entry_id(at: float | None = None) -> str:
    """A stream entry id as Redis would stamp it now (or at ``at``), unique within the test run."""
    return f"{int((time.time() if at is None else at) * 1000)}-{next(_seq)}"


def _fields(secret: str, doc: dict, **sign_kw: Any) -> dict[bytes, bytes]:
    """Signed entry fields, as bytes, the way XREADGROUP returns them."""
    return {k.encode(): v.encode() for k, v in signing.sign(secret, json.dumps(doc), **sign_kw).items()}


def _refused(outcome: Admission | Refusal, code: Code, *, keyed: bool) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    assert outcome.error.code == code, outcome.error.message
    assert outcome.keyed is keyed
    return outcome


# ---- accepted -----------------------------------------------------------------------------------------


def test_accepted_entry_stores_the_image_audits_saves_the_job_and_dispatches(world):
    ctx, eng, secrets = world
    doc = _doc(candidates=20, face_index=1)
    entry = _entry_id()
    sent: list[Job] = []
    out = admit_entry(ctx, A, entry, _fields(secrets[A], doc), dispatch=sent.append)
    assert isinstance(out, Admission)
    job = out.job
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert (job.request_id, job.agency_id, job.user_id) == (doc["request_id"], A, "inv")
    assert (job.case_number, job.offence_code, job.purpose) == (doc["case_number"], "PC211", doc["purpose"])
    assert (job.image_key, job.probe_sha256, job.stream_entry_id) == (f"probes/{sha}", sha, entry)
    assert (job.candidates, job.face_index, job.engines) == (20, 1, tuple(ctx.settings.engines))
    assert ctx.store.get(job.image_key) == IMAGE
    assert ctx.redis.get(keys.request_key(A, doc["request_id"])) == entry.encode()
    assert load_job(ctx.redis, doc["request_id"]) == job
    assert sent == [job]
    trail = audit.query(eng, request_id=doc["request_id"])
    assert [(t["action"], t["outcome"], t["probe_sha256"]) for t in trail] == [
        (audit.SEARCH_SUBMITTED, "accepted", sha)
    ]


def test_object_key_image_is_checked_not_copied(world):
    ctx, _, secrets = world
    key = put_content(ctx.store, "probes", IMAGE)
    out = admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(image={"key": key})))
    assert isinstance(out, Admission) and out.job.image_key == key and out.job.probe_sha256 == key.split("/")[1]


def test_the_same_entry_redelivered_is_admitted_again(world):
    """A gateway died mid-way: the entry's own nonce and claim do not refuse it."""
    ctx, _, secrets = world
    doc, entry = _doc(), _entry_id()
    fields = _fields(secrets[A], doc)
    assert isinstance(admit_entry(ctx, A, entry, fields), Admission)
    assert isinstance(admit_entry(ctx, A, entry, fields), Admission)


# ---- refused before the claim: answered on the stream only --------------------------------------------


def test_no_payload_and_not_json(world):
    ctx, _, _ = world
    r = _refused(admit_entry(ctx, A, _entry_id(), {b"something": b"else"}), Code.INVALID_MESSAGE, keyed=False)
    assert r.request_id is None and "payload" in r.error.message
    r = _refused(admit_entry(ctx, A, _entry_id(), {b"payload": b"{not json"}), Code.INVALID_MESSAGE, keyed=False)
    assert r.request_id is None and "not JSON" in r.error.message


def test_unsupported_schema_version_is_refused_before_the_signature(world):
    ctx, _, _ = world
    doc = _doc(schema_version=99)
    r = _refused(
        admit_entry(ctx, A, _entry_id(), {"payload": json.dumps(doc)}), Code.UNSUPPORTED_SCHEMA_VERSION, keyed=False
    )
    assert r.request_id == doc["request_id"] and r.doc == doc


def test_unknown_agency(world):
    ctx, _, secrets = world
    doc = _doc("ghost")
    _refused(admit_entry(ctx, "ghost", _entry_id(), _fields(secrets[A], doc)), Code.UNKNOWN_AGENCY, keyed=False)


@pytest.mark.parametrize("how", ["unsigned", "other agency's secret", "tampered"])
def test_bad_signature(world, how):
    ctx, _, secrets = world
    doc = _doc()
    if how == "unsigned":
        fields = {"payload": json.dumps(doc)}
    elif how == "other agency's secret":
        fields = signing.sign(secrets[B], json.dumps(doc))
    else:
        fields = {**signing.sign(secrets[A], json.dumps(doc)), "payload": json.dumps(dict(doc, case_number="C-999"))}
    _refused(admit_entry(ctx, A, _entry_id(), fields), Code.BAD_SIGNATURE, keyed=False)


def test_stale_timestamp_and_entry_id_in_the_future(world):
    ctx, _, secrets = world
    now = time.time()
    _refused(
        admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(), timestamp=int(now) - 900)),
        Code.STALE_TIMESTAMP,
        keyed=False,
    )
    # Judged at the entry's arrival (its id), not at handling: redelivered after an outage, still fine.
    old = now - 3600
    assert isinstance(admit_entry(ctx, A, _entry_id(old), _fields(secrets[A], _doc(), timestamp=int(old))), Admission)
    # An id the client chose in the future counts as arriving now: a fresh signature is admitted (it used
    # to be refused, and so was every later entry of the stream, whose ids Redis put after it) ...
    far = 9_999_999_999.999
    assert isinstance(admit_entry(ctx, A, _entry_id(far), _fields(secrets[A], _doc())), Admission)
    assert isinstance(admit_entry(ctx, A, _entry_id(far + 1), _fields(secrets[A], _doc())), Admission)
    # ... and the id cannot make a signature of the future fresh: the gateway's clock judges it.
    ahead = _fields(secrets[A], _doc(), timestamp=int(now) + 900)
    _refused(admit_entry(ctx, A, _entry_id(now + 900), ahead), Code.STALE_TIMESTAMP, keyed=False)
    later = AdmissionContext(ctx.redis, ctx.store, ctx.settings, ctx.registry, now=lambda: now + 900)
    ahead = _fields(secrets[A], _doc(), timestamp=int(now) + 900)
    assert isinstance(admit_entry(later, A, _entry_id(now + 900), ahead), Admission)


def test_an_entry_over_the_field_or_byte_limit_is_refused_before_it_is_parsed(world, monkeypatch):
    ctx, _, secrets = world
    signed = _fields(secrets[A], _doc())
    many = {**signed, **{f"x{i}": "1" for i in range(20)}}
    r = _refused(admit_entry(ctx, A, _entry_id(), many), Code.INVALID_MESSAGE, keyed=False)
    assert "fields" in r.error.message
    limit = entry_limit(ctx.settings.max_image_bytes)
    big = {**signed, "x-extra": "y" * limit}  # a signed entry with one large extra field
    _refused(admit_entry(ctx, A, _entry_id(), big), Code.PAYLOAD_TOO_LARGE, keyed=False)
    # A payload built to be slow to parse (many small keys) is refused before json.loads sees it.
    parsed: list = []
    monkeypatch.setattr("quorum.workers.admission.json.loads", lambda *a, **k: parsed.append(1))
    slow = {"payload": "{" + ",".join(f'"k{i}":{i}' for i in range(5_000)) + "}"}  # 5,000 keys within the byte limit
    r = _refused(admit_entry(ctx, A, _entry_id(), slow), Code.INVALID_MESSAGE, keyed=False)
    assert "brackets, commas and colons" in r.error.message and parsed == []


def test_replayed_nonce(world):
    ctx, _, secrets = world
    nonce = signing.new_nonce()
    assert isinstance(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(), nonce=nonce)), Admission)
    doc = _doc()
    _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc, nonce=nonce)), Code.REPLAYED_NONCE, keyed=False)
    assert not ctx.redis.exists(keys.request_key(A, doc["request_id"]))


@pytest.mark.parametrize("case", [None, "", "N/A", "unknown"])
def test_missing_case_number_is_named_before_the_schema(world, case):
    ctx, _, secrets = world
    doc = _doc(case_number=case, candidates="many")  # the schema would refuse it too
    if case is None:
        del doc["case_number"]
    _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc)), Code.CASE_NUMBER_MISSING, keyed=False)


def test_invalid_schema_is_summarised(world):
    ctx, _, secrets = world
    doc = _doc(candidates="many", surprise_field=1)
    r = _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc)), Code.INVALID_MESSAGE, keyed=False)
    assert "candidates" in r.error.message and "surprise_field" in r.error.message
    assert r.request_id == doc["request_id"] and not ctx.redis.exists(keys.request_key(A, doc["request_id"]))
    broken = json.dumps(_doc(image={"data_b64": "@@ not base64 @@"}))  # cannot be signed: judged before the MAC
    r = _refused(admit_entry(ctx, A, _entry_id(), {"payload": broken}), Code.INVALID_MESSAGE, keyed=False)
    assert "base64" in r.error.message
    _refused(admit_entry(ctx, A, _entry_id(), {"payload": "[1, 2]"}), Code.INVALID_MESSAGE, keyed=False)


def test_agency_mismatch(world):
    ctx, _, secrets = world
    _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(B, "binv"))), Code.AGENCY_MISMATCH, keyed=False)


def test_duplicate_request_id(world):
    ctx, _, secrets = world
    doc, first = _doc(), _entry_id()
    assert isinstance(admit_entry(ctx, A, first, _fields(secrets[A], doc)), Admission)
    r = _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc)), Code.DUPLICATE_REQUEST, keyed=False)
    assert r.request_id == doc["request_id"] and first in r.error.message
    assert ctx.redis.get(keys.request_key(A, doc["request_id"])) == first.encode()


def test_inline_image_over_the_limit_is_refused_before_hashing(world):
    ctx, _, secrets = world
    big = _doc(image={"data_b64": base64.b64encode(b"\0" * (LIMIT + 10)).decode()})
    _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], big)), Code.IMAGE_TOO_LARGE, keyed=False)


# ---- refused after the claim: the request's answer ---------------------------------------------------------


@pytest.mark.parametrize(
    "kw, code",
    [
        ({"offence_code": "JAYWALK"}, Code.OFFENCE_UNKNOWN),
        ({"user_id": "binv"}, Code.USER_OTHER_AGENCY),
        ({"purpose": "general-identification"}, Code.PURPOSE_NOT_ALLOWED),
        ({"case_number": "case one!"}, Code.CASE_NUMBER_MALFORMED),
    ],
)
def test_policy_refusals(world, kw, code):
    ctx, _, secrets = world
    doc = _doc(**kw)
    r = _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc)), code, keyed=True)
    assert r.request_id == doc["request_id"] and r.doc == doc
    assert ctx.store.size(f"probes/{hashlib.sha256(IMAGE).hexdigest()}") is None  # nothing stored
    assert load_job(ctx.redis, doc["request_id"]) is None


def test_quota_counts_only_allowed_searches(world):
    ctx, _, secrets = world
    _refused(
        admit_entry(ctx, Q, _entry_id(), _fields(secrets[Q], _doc(Q, "qinv", offence_code="JAYWALK"))),
        Code.OFFENCE_UNKNOWN,
        keyed=True,
    )
    assert isinstance(admit_entry(ctx, Q, _entry_id(), _fields(secrets[Q], _doc(Q, "qinv"))), Admission)
    r = _refused(
        admit_entry(ctx, Q, _entry_id(), _fields(secrets[Q], _doc(Q, "qinv"))), Code.QUOTA_EXCEEDED, keyed=True
    )
    assert Q in r.error.message
    day = time.strftime("%Y%m%d", time.gmtime())
    assert int(ctx.redis.get(keys.quota_key(Q, day))) == 1  # the refused one is given back


@pytest.mark.parametrize(
    "image, code",
    [
        ({"data_b64": ""}, Code.IMAGE_EMPTY),
        ({"key": "probes/" + "0" * 64}, Code.IMAGE_MISSING),
    ],
)
def test_image_refusals(world, image, code):
    ctx, _, secrets = world
    _refused(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(image=image))), code, keyed=True)


def test_stored_objects_empty_or_too_large(world):
    ctx, _, secrets = world
    empty, big = "probes/" + "e" * 64, "probes/" + "b" * 64
    ctx.store.put(empty, b"")
    ctx.store.put(big, b"\0" * (LIMIT + 1))
    _refused(
        admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(image={"key": empty}))), Code.IMAGE_EMPTY, keyed=True
    )
    _refused(
        admit_entry(ctx, A, _entry_id(), _fields(secrets[A], _doc(image={"key": big}))),
        Code.IMAGE_TOO_LARGE,
        keyed=True,
    )


# ---- the steps on their own -------------------------------------------------------------------------------


def test_steps_compose(world):
    ctx, _, secrets = world
    doc, entry = _doc(), _entry_id()
    parsed = admission.parse(_fields(secrets[A], doc))
    assert parsed.doc == doc and parsed.request_id == doc["request_id"] and "signature" in parsed.fields
    assert admission.authenticate(ctx, A, entry, admission.check_version(parsed)) is parsed
    req = admission.validate(A, parsed)
    claim = admission.claim(ctx, A, entry, req)
    assert claim == keys.request_key(A, doc["request_id"])
    assert admission.authorise(ctx, A, req) is req
    image = admission.store(ctx, req)
    assert image.sha256 == hashlib.sha256(IMAGE).hexdigest() and ctx.store.size(image.key) == len(IMAGE)
    assert admission.admit(ctx, A, entry, req, image).job.image_key == image.key
    with pytest.raises(InputError) as exc:
        admission.claim(ctx, A, _entry_id(), req)
    assert exc.value.code == Code.DUPLICATE_REQUEST
    admission.release(ctx, claim)
    assert not ctx.redis.exists(claim)


def test_a_long_request_id_is_not_echoed(world):
    parsed = admission.parse({"payload": json.dumps({"request_id": "x" * 200})})
    assert parsed.request_id is None


def test_audit_context_of_broken_requests():
    assert admission.audit_context("not a dict") == CaseContext()
    ctx = admission.audit_context({"user_id": "u", "purpose": 3, "image": {"data_b64": "@@"}, "case_number": None})
    assert ctx == CaseContext(user_id="u", purpose="3")
    assert admission.audit_context({"image": {"key": "probes/abc"}}).probe_sha256 == "abc"


# ---- dependencies failing: the claim is released in one place ----------------------------------------------


class FlakyStore:
    """A disk store whose writes fail until ``up`` is set."""

    kind = "disk"

    def __init__(self, inner: DiskStore) -> None:
        self.inner, self.up = inner, False

    def put(self, key: str, data: bytes) -> None:
        if not self.up:
            raise ServiceError(Code.STORE_UNAVAILABLE, "store down")
        self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_store_failure_releases_the_claim_and_a_retry_admits(world):
    ctx, _, secrets = world
    flaky = FlakyStore(ctx.store)
    down = AdmissionContext(ctx.redis, flaky, ctx.settings, ctx.registry)
    doc, entry = _doc(), _entry_id()
    fields = _fields(secrets[A], doc)
    with pytest.raises(ServiceError) as exc:
        admit_entry(down, A, entry, fields)
    assert exc.value.code == Code.STORE_UNAVAILABLE
    assert not ctx.redis.exists(keys.request_key(A, doc["request_id"]))
    flaky.up = True
    out = admit_entry(down, A, entry, fields)
    assert isinstance(out, Admission) and ctx.store.get(out.job.image_key) == IMAGE


def test_dispatch_failure_releases_the_claim(world):
    ctx, _, secrets = world
    doc = _doc()

    def broken(job: Job) -> None:
        raise ServiceError(Code.BROKER_UNAVAILABLE, "no broker")

    with pytest.raises(ServiceError):
        admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc), dispatch=broken)
    assert not ctx.redis.exists(keys.request_key(A, doc["request_id"]))
    # Another entry (a resubmission) with the same request id is now admitted, not a duplicate.
    assert isinstance(admit_entry(ctx, A, _entry_id(), _fields(secrets[A], doc)), Admission)


def test_redis_errors_become_broker_unavailable(world):
    ctx, _, secrets = world

    class Down(fakeredis.FakeRedis):
        def set(self, *a: Any, **kw: Any) -> Any:
            raise redis.exceptions.ConnectionError("connection refused")

    down = AdmissionContext(Down(), ctx.store, ctx.settings, ctx.registry)
    with pytest.raises(ServiceError) as exc:
        admit_entry(down, A, _entry_id(), _fields(secrets[A], _doc()))
    assert exc.value.code == Code.BROKER_UNAVAILABLE and exc.value.retryable


def test_registry_errors_become_audit_unavailable(world):
    ctx, _, secrets = world

    class Broken:
        def get(self) -> Any:
            raise RuntimeError("database is locked")

        def secret(self, agency_id: str) -> str | None:
            return None

    down = AdmissionContext(ctx.redis, ctx.store, ctx.settings, Broken())
    with pytest.raises(ServiceError) as exc:
        admit_entry(down, A, _entry_id(), _fields(secrets[A], _doc()))
    assert exc.value.code == Code.AUDIT_UNAVAILABLE


# ---- the gateway around it ------------------------------------------------------------------------------


@pytest.fixture
def gateway(world):
    ctx, eng, secrets = world
    sent: list[Job] = []
    gw = Gateway(
        ctx.redis, ctx.store, ctx.settings, consumer="test", registry=ctx.registry, dispatch=sent.append, backoff_s=0.01
    )
    return gw, eng, secrets, sent


def _deliver(gw: Gateway, agency: str, fields: dict) -> tuple[str, str, dict]:
    """XADD an entry and read it through the gateway's group, as ``poll`` would: it is now pending."""
    stream = keys.intake_stream(agency)
    gw.redis.xadd(stream, fields)
    gw.discover(force=True)
    resp = gw.redis.xreadgroup(keys.INTAKE_GROUP, gw.consumer, {stream: ">"}, count=1)
    [(_, [(entry_id, got)])] = resp
    return stream, entry_id.decode(), got


def _pending(gw: Gateway, stream: str) -> int:
    return gw.redis.xpending(stream, keys.INTAKE_GROUP)["pending"]


def _answers(gw: Gateway, agency: str) -> list[CandidateList | ErrorResult]:
    return [parse_result(f[b"payload"]) for _, f in gw.redis.xrange(keys.results_stream(agency))]


def test_gateway_answers_a_refusal_on_the_results_stream_and_acks(gateway):
    gw, eng, _, _ = gateway
    stream, entry, fields = _deliver(gw, A, {"payload": "{not json"})
    assert _pending(gw, stream) == 1
    gw.handle(stream, entry, fields)
    [answer] = _answers(gw, A)
    assert isinstance(answer, ErrorResult) and answer.code == Code.INVALID_MESSAGE.value
    assert answer.stream_entry_id == entry and answer.stage == "gateway" and answer.retryable is False
    assert _pending(gw, stream) == 0
    assert gw.redis.xlen(stream) == 0  # handled entries leave Redis
    [rejected] = [f for _, f in gw.redis.xrange(keys.REJECTED_STREAM)]
    assert rejected[b"entry_id"].decode() == entry and rejected[b"code"] == b"INVALID_MESSAGE"
    trail = [t for t in audit.query(eng, action=audit.SEARCH_SUBMITTED) if t["outcome"] == "refused"]
    assert [(t["code"], json.loads(t["details"])["entry_id"]) for t in trail] == [("INVALID_MESSAGE", entry)]


def test_gateway_dispatches_an_admitted_entry_and_acks(gateway):
    gw, _, secrets, sent = gateway
    doc = _doc()
    stream, entry, fields = _deliver(gw, A, signing.sign(secrets[A], json.dumps(doc)))
    gw.handle(stream, entry, fields)
    assert [j.request_id for j in sent] == [doc["request_id"]] and sent[0].stream_entry_id == entry
    assert _pending(gw, stream) == 0 and _answers(gw, A) == []
    assert gw.redis.xlen(stream) == 0  # the inline image does not stay in the intake stream


def test_gateway_leaves_the_entry_pending_when_redis_fails(gateway, monkeypatch):
    gw, _, _, _ = gateway
    stream, entry, fields = _deliver(gw, A, {"payload": "{not json"})

    def down(*a: Any, **kw: Any) -> Any:
        raise redis.exceptions.ConnectionError("connection refused")

    with monkeypatch.context() as m:
        m.setattr(gw.redis, "xadd", down)  # publishing the refusal fails
        gw.handle(stream, entry, fields)  # does not raise
    assert _pending(gw, stream) == 1 and _answers(gw, A) == [] and gw.redis.xlen(stream) == 1
    gw.handle(stream, entry, fields)  # Redis is back: the retried entry is answered and acknowledged
    assert [a.stream_entry_id for a in _answers(gw, A)] == [entry] and _pending(gw, stream) == 0


def test_gateway_leaves_the_entry_pending_when_dispatch_fails(gateway):
    gw, _, secrets, sent = gateway
    doc = _doc()

    def broken(job: Job) -> None:
        raise ServiceError(Code.BROKER_UNAVAILABLE, "no broker")

    gw.dispatch = broken
    stream, entry, fields = _deliver(gw, A, signing.sign(secrets[A], json.dumps(doc)))
    gw.handle(stream, entry, fields)
    assert _pending(gw, stream) == 1 and not gw.redis.exists(keys.request_key(A, doc["request_id"]))
    gw.dispatch = sent.append
    gw.handle(stream, entry, fields)  # the retry (``recover`` on a real Redis) admits it
    assert [j.request_id for j in sent] == [doc["request_id"]] and _pending(gw, stream) == 0


def test_gateway_run_survives_a_redis_outage(gateway, monkeypatch):
    gw, _, _, _ = gateway
    real_heartbeat = liveness.heartbeat
    failures = {"n": 0}

    def flaky_heartbeat(*a: Any, **kw: Any) -> Any:
        if failures["n"] < 3:
            failures["n"] += 1
            raise redis.exceptions.ConnectionError("connection refused")
        return real_heartbeat(*a, **kw)

    monkeypatch.setattr(liveness, "heartbeat", flaky_heartbeat)
    stream = keys.intake_stream(A)
    gw.redis.xadd(stream, {"payload": "{not json"})
    stop = threading.Event()
    t = threading.Thread(target=gw.run, args=(stop,), kwargs={"block_ms": 20}, daemon=True)
    t.start()

    def wait_for(cond: Any) -> bool:
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(cond())

    try:
        # The heartbeat fails three times; the loop logs, backs off and carries on.
        assert wait_for(lambda: liveness.live(gw.redis, keys.GATEWAY_ALIVE) == 1)
        assert failures["n"] == 3 and t.is_alive()
        gw.redis.xadd(stream, {"payload": "{still not json"})
        assert wait_for(lambda: len(_answers(gw, A)) == 2)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive() and _pending(gw, stream) == 0


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ('{"a": 1, "a": 2}', Code.INVALID_MESSAGE),  # duplicate keys
        ("[" * 2000 + "]" * 2000, Code.INVALID_MESSAGE),  # nested beyond the recursion limit
        (b'{"case_number": "\xff\xfe"}', Code.INVALID_MESSAGE),  # not UTF-8
        ("x" * 5000, Code.PAYLOAD_TOO_LARGE),
    ],
    ids=["duplicate-keys", "deep-nesting", "not-utf8", "too-large"],
)
def test_parse_refuses_ambiguous_hostile_and_oversized_payloads(payload, code):
    with pytest.raises(InputError) as exc:
        admission.parse({"payload": payload}, max_bytes=4096)
    assert exc.value.code == code


def test_quota_use_is_a_gauge_per_agency(world):
    from quorum.core import metrics

    ctx, _, _ = world
    now = time.time()
    admission.take_quota(ctx, Q, 2, now)
    assert metrics.QUOTA_USED.labels(Q)._value.get() == 1 and metrics.QUOTA_LIMIT.labels(Q)._value.get() == 2
    admission.take_quota(ctx, Q, 2, now)
    with pytest.raises(InputError):
        admission.take_quota(ctx, Q, 2, now)
    assert metrics.QUOTA_USED.labels(Q)._value.get() == 2


def test_a_quota_set_during_the_day_counts_the_days_earlier_searches(world):
    """An agency searching without a quota (0) is still counted, so a quota set at noon is not a fresh one."""
    ctx, _, _ = world
    agency = "noon-quota"
    now = time.time()
    for _ in range(3):
        admission.take_quota(ctx, agency, 0, now)  # unlimited: never refused
    with pytest.raises(InputError) as exc:
        admission.take_quota(ctx, agency, 3, now)  # the quota set now: the morning used it
    assert exc.value.code == Code.QUOTA_EXCEEDED
    admission.take_quota(ctx, agency, 5, now)  # raised again: the 4th and 5th searches of the day pass
    admission.take_quota(ctx, agency, 5, now)
    with pytest.raises(InputError):
        admission.take_quota(ctx, agency, 5, now)
