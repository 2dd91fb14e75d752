"""Hostile and odd input through the real stack: each kind gets a stable code (or, for odd but valid
images, a candidate list with the right person first), and nothing is left behind: no intake entry
pending or kept, no Celery message queued, no object stored half-way.

The kinds and their codes are also the README's table ("Bad and odd input"): a test below keeps the
two in step."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from quorum.broker import keys, signing
from quorum.broker.app import ALL_QUEUES
from quorum.broker.client import QuorumClient, new_request_id
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList, ErrorResult, parse_result
from tests.integration import slices

pytestmark = pytest.mark.integration

AGENCY = "hostile-agency"
USER = "hostile-inv"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def world(disk_stack, data_dir):
    from quorum.accountability import db, registry

    ci = data_dir / "ci" / "faces"
    subjects = [ci / r.identity for r in slices.rows(data_dir, "hostile_input")]
    report = enrol(disk_stack, open_store(disk_stack), [(d.name, sorted(d.iterdir())[0]) for d in subjects])
    assert all(n == len(subjects) for n in report.enrolled.values()), report
    secret = registry.provision(
        db.get_engine(disk_stack),
        AGENCY,
        users={USER: "investigator"},
        offences=("PC211",),
        purposes=("investigation",),
    )
    return disk_stack, QuorumClient(disk_stack.redis_url, AGENCY, USER, secret), secret, subjects


# ---- building the inputs -----------------------------------------------------------------------------


def _doc(image: dict | None = None, **kw) -> dict:
    doc = {
        "schema_version": 1,
        "request_id": new_request_id(),
        "agency_id": AGENCY,
        "user_id": USER,
        "case_number": "H-2026-1",
        "offence_code": "PC211",
        "purpose": "investigation",
        "image": image if image is not None else {"data_b64": ""},
        "candidates": 5,
    }
    doc.update(kw)
    return {k: v for k, v in doc.items() if v is not None}


def _b64(data: bytes) -> dict:
    return {"data_b64": base64.b64encode(data).decode()}


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_claiming(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 65536, 9))
        + chunk(b"IEND", b"")
    )


def _exif_rotated(face: Image.Image) -> bytes:
    """The face stored lying on its side, with EXIF orientation 6 ("rotate 90° clockwise to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(face.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif.tobytes())


def _animated_gif(face: Image.Image) -> bytes:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (face.height, face.width, 3), dtype=np.uint8))
    return _save(face.convert("P"), "GIF", save_all=True, append_images=[noise.convert("P")], duration=100, loop=0)


class Submit:
    """How one kind is sent: signed payload (default), raw fields, or a custom function of the client."""

    def __init__(self, client: QuorumClient, secret: str) -> None:
        self.client, self.secret = client, secret
        self.last_request_id: str | None = None

    def signed(self, doc: dict | str, **sign_kw) -> str:
        if isinstance(doc, dict):
            self.last_request_id = doc["request_id"]
        text = doc if isinstance(doc, str) else json.dumps(doc)
        return self.client.submit_fields(signing.sign(self.secret, text, **sign_kw))

    def fields(self, fields: dict) -> str:
        return self.client.submit_fields(fields)


def refused_kinds(face_jpeg: bytes, face: Image.Image) -> dict[str, tuple[str, Callable[[Submit], str]]]:
    """kind -> (expected code, how to send it). Every one must be answered with that code."""
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    signed_twice: dict = {}

    def replay(sub: Submit) -> str:
        fields = signing.sign(sub.secret, json.dumps(_doc(_b64(face_jpeg))))
        signed_twice["first"] = sub.fields(fields)  # answered normally
        return sub.fields(fields)  # the very same signed fields again

    def tampered(sub: Submit) -> str:
        fields = signing.sign(sub.secret, json.dumps(_doc(_b64(face_jpeg))))
        fields["payload"] = fields["payload"].replace("H-2026-1", "H-2026-9")
        return sub.fields(fields)

    def s(doc_or_text, **kw) -> Callable[[Submit], str]:
        return lambda sub: sub.signed(doc_or_text, **kw)

    return {
        "text file": ("NOT_AN_IMAGE", s(_doc(_b64(b"this is a text file, not a picture\n" * 20)))),
        "SVG": ("NOT_AN_IMAGE", s(_doc(_b64(b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="40"/></svg>' * 5)))),
        "HTML": ("NOT_AN_IMAGE", s(_doc(_b64(b"<!doctype html><html><body><img src=x></body></html>" * 5)))),
        "PDF": ("NOT_AN_IMAGE", s(_doc(_b64(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n" * 5)))),
        "empty image": ("IMAGE_EMPTY", s(_doc({"data_b64": ""}))),
        "truncated JPEG": ("IMAGE_TRUNCATED", s(_doc(_b64(face_jpeg[: len(face_jpeg) // 2])))),
        "1x1 image": ("IMAGE_TOO_SMALL", s(_doc(_b64(_save(Image.new("RGB", (1, 1)), "PNG"))))),
        "20000x20 image": ("IMAGE_TOO_SMALL", s(_doc(_b64(_save(Image.new("RGB", (20000, 20), "gray"), "PNG"))))),
        "no face": ("NO_FACE", s(_doc(_b64(_save(Image.fromarray(gradient), "PNG"))))),
        "image over the byte limit": (
            "IMAGE_TOO_LARGE",
            s(_doc(_b64(b"\xff\xd8\xff" + b"\0" * (15 * 2**20 + 10)))),
        ),
        "decompression bomb (100000x100000 PNG)": ("IMAGE_TOO_LARGE", s(_doc(_b64(_png_claiming(100_000, 100_000))))),
        "image key naming nothing": ("IMAGE_MISSING", s(_doc({"key": "probes/" + "0" * 64}))),
        "not base64 (cannot be signed either)": (
            "INVALID_MESSAGE",
            lambda sub: sub.fields({"payload": json.dumps(_doc({"data_b64": "@@@ not base64 @@@"}))}),
        ),
        "candidates 0": ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), candidates=0))),
        "candidates -1": ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), candidates=-1))),
        "candidates 100000": ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), candidates=100_000))),
        'candidates "abc"': ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), candidates="abc"))),
        "negative face index": ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), face_index=-1))),
        "face index beyond the faces found": ("FACE_INDEX_OUT_OF_RANGE", s(_doc(_b64(face_jpeg), face_index=7))),
        "no case number": ("CASE_NUMBER_MISSING", s(_doc(_b64(face_jpeg), case_number=None))),
        "case number N/A": ("CASE_NUMBER_MISSING", s(_doc(_b64(face_jpeg), case_number="N/A"))),
        "case number with control characters": (
            "CASE_NUMBER_MALFORMED",
            s(_doc(_b64(face_jpeg), case_number="2026-1\x00\x1b[31m")),
        ),
        "case number 10 KB long": ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), case_number="7" * 10_240))),
        "unknown offence": ("OFFENCE_UNKNOWN", s(_doc(_b64(face_jpeg), offence_code="XX999"))),
        "purpose not allowed (live-scanning)": (
            "PURPOSE_NOT_ALLOWED",
            s(_doc(_b64(face_jpeg), purpose="live-scanning")),
        ),
        "unknown user": ("USER_UNKNOWN", s(_doc(_b64(face_jpeg), user_id="nobody-at-all"))),
        "other agency in the payload": ("AGENCY_MISMATCH", s(_doc(_b64(face_jpeg), agency_id="someone-else"))),
        "unknown field in the payload": ("INVALID_MESSAGE", s(_doc(_b64(face_jpeg), surprise_field=1))),
        "schema version 99": ("UNSUPPORTED_SCHEMA_VERSION", s(_doc(_b64(face_jpeg), schema_version=99))),
        "not JSON": ("INVALID_MESSAGE", lambda sub: sub.fields({"payload": "{not json"})),
        "no payload field": ("INVALID_MESSAGE", lambda sub: sub.fields({"something": "else"})),
        "25 MB JSON payload": ("PAYLOAD_TOO_LARGE", s(_doc(_b64(face_jpeg), pad="x" * (25 * 2**20)))),
        "JSON nested 5000 deep": ("INVALID_MESSAGE", lambda sub: sub.fields({"payload": "[" * 5000 + "]" * 5000})),
        "duplicate JSON keys": (
            "INVALID_MESSAGE",
            s(json.dumps(_doc(_b64(face_jpeg)))[:-1] + ', "case_number": "H-2026-2"}'),
        ),
        "non-UTF-8 bytes in a field": (
            "INVALID_MESSAGE",
            lambda sub: sub.fields(
                {"payload": json.dumps(_doc(_b64(face_jpeg))).encode()[:-1] + b', "x": "\xff\xfe"}'}
            ),
        ),
        "unsigned": ("BAD_SIGNATURE", lambda sub: sub.fields({"payload": json.dumps(_doc(_b64(face_jpeg)))})),
        "payload changed after signing": ("BAD_SIGNATURE", tampered),
        "timestamp a year ahead": (
            "STALE_TIMESTAMP",
            s(_doc(_b64(face_jpeg)), timestamp=int(time.time()) + 365 * 86400),
        ),
        "timestamp an hour old": ("STALE_TIMESTAMP", s(_doc(_b64(face_jpeg)), timestamp=int(time.time()) - 3600)),
        "replayed entry (same nonce)": ("REPLAYED_NONCE", replay),
    }


def accepted_kinds(face: Image.Image, face_jpeg: bytes) -> dict[str, Callable[[Submit], str]]:
    """Odd but valid: each must come back as a candidate list with the probe's person first."""
    rgb = face.convert("RGB")
    big_icc = b"\0" * 128 + b"ICC profile padding " * 12_000  # ~240 KB spread over several APP2 segments

    def s(data: bytes, **kw) -> Callable[[Submit], str]:
        return lambda sub: sub.signed(_doc(_b64(data), **kw))

    def extra_fields(sub: Submit) -> str:
        doc = _doc(_b64(face_jpeg))
        sub.last_request_id = doc["request_id"]
        fields = signing.sign(sub.secret, json.dumps(doc))
        return sub.fields({**fields, "x-client": "agency-rms 4.2", "trace": "abc"})

    i16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    return {
        "CMYK JPEG": s(_save(rgb.convert("CMYK"), "JPEG", quality=92)),
        "16-bit PNG": s(_save(Image.fromarray(i16), "PNG")),
        "greyscale JPEG": s(_save(rgb.convert("L"), "JPEG", quality=92)),
        "RGBA PNG": s(_save(rgb.convert("RGBA"), "PNG")),
        "palette PNG": s(_save(rgb.convert("P"), "PNG")),
        "animated GIF (first frame)": s(_animated_gif(rgb)),
        "WebP": s(_save(rgb, "WEBP", quality=90)),
        "TIFF": s(_save(rgb, "TIFF")),
        "BMP": s(_save(rgb, "BMP")),
        "EXIF-rotated JPEG": s(_exif_rotated(rgb)),
        "JPEG with a 240 KB ICC profile": s(_save(rgb, "JPEG", quality=92, icc_profile=big_icc)),
        "unknown extra stream fields": extra_fields,
    }


# ---- the tests --------------------------------------------------------------------------------------------


def _answers(r: redis.Redis, entries: dict[str, str], timeout: float = 240.0) -> dict[str, CandidateList | ErrorResult]:
    """kind -> its answer: the error result naming its entry, or the published result of its request."""
    by_entry = {e: kind for kind, e in entries.items()}
    got: dict[str, CandidateList | ErrorResult] = {}
    deadline = time.monotonic() + timeout
    last = "0"
    while len(got) < len(entries) and time.monotonic() < deadline:
        for _, batch in r.xread({keys.results_stream(AGENCY): last}, block=500, count=1000) or []:
            for entry_id, fields in batch:
                last = entry_id.decode()
                res = parse_result(fields[b"payload"])
                kind = by_entry.get(res.stream_entry_id or "") if isinstance(res, ErrorResult) else None
                if kind is None and res.request_id:
                    # A candidate list carries its request id; find the entry whose payload had it.
                    kind = _kind_of_request.get(res.request_id)
                if kind is not None and kind not in got:
                    got[kind] = res
    return got


_kind_of_request: dict[str, str] = {}


def _quiet(r: redis.Redis, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(r.llen(q) for q in ALL_QUEUES) and not r.hlen("unacked"):
            return
        time.sleep(0.3)
    raise AssertionError({q: r.llen(q) for q in ALL_QUEUES})


def test_every_hostile_or_odd_input_is_answered_with_its_code_and_leaves_nothing_behind(world):
    s, client, secret, subjects = world
    r = redis.Redis.from_url(s.redis_url)
    person = subjects[2]
    face_path = sorted(person.iterdir())[1]
    face_jpeg = face_path.read_bytes()
    face = Image.open(face_path)
    face.load()
    sub = Submit(client, secret)
    store = open_store(s)
    before = set(store.list("probes"))

    refused = refused_kinds(face_jpeg, face)
    accepted = accepted_kinds(face, face_jpeg)
    r.xtrim(keys.intake_stream(AGENCY), maxlen=0)
    entries: dict[str, str] = {}
    for kind, (_, send) in refused.items():
        entries[kind] = send(sub)
    for kind, send in accepted.items():
        entries[kind] = send(sub)
        assert sub.last_request_id is not None
        _kind_of_request[sub.last_request_id] = kind
    answers = _answers(r, entries)

    wrong = {}
    for kind, (code, _) in refused.items():
        a = answers.get(kind)
        got = a.code if isinstance(a, ErrorResult) else (None if a is None else "candidate_list")
        if got != code:
            wrong[kind] = (code, got, getattr(a, "message", "")[:120])
    for kind in accepted:
        a = answers.get(kind)
        if not (isinstance(a, CandidateList) and a.candidates and a.candidates[0].subject_id == person.name):
            wrong[kind] = ("candidate_list, mate first", getattr(a, "code", None) or a, getattr(a, "message", ""))
    assert not wrong, wrong
    # Nothing left behind: every entry acknowledged and deleted, no task queued or held, and every
    # probe object complete (its key is the SHA-256 of what it holds).
    assert r.xpending(keys.intake_stream(AGENCY), keys.INTAKE_GROUP)["pending"] == 0
    _wait_for(lambda: r.xlen(keys.intake_stream(AGENCY)) == 0, 30)
    _quiet(r)
    for key in set(store.list("probes")) - before:
        assert key.rsplit("/", 1)[1] == hashlib.sha256(store.get(key)).hexdigest(), key
    print(f"\nhostile input: {len(refused)} refused kinds, {len(accepted)} odd but valid kinds, all as expected")


def _wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_same_image_sent_100_times_is_answered_100_times(world):
    _, client, _, subjects = world
    person = subjects[4]
    image = sorted(person.iterdir())[1]
    rids = [
        client.submit(image, case_number="H-2026-100", offence_code="PC211", purpose="investigation", candidates=5)
        for _ in range(100)
    ]
    answers = client.wait_all(rids, timeout=600)
    assert len(answers) == 100
    assert all(isinstance(a, CandidateList) and a.candidates[0].subject_id == person.name for a in answers.values())


def test_the_readme_table_lists_exactly_these_kinds_and_codes():
    text = README.read_text()
    section = text.split("### Bad and odd input", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (.+?) \| `([A-Z_a-z, ]+)`", section, flags=re.M))
    dummy = Image.new("RGB", (200, 200))
    expected = {kind: code for kind, (code, _) in refused_kinds(b"\xff\xd8\xff", dummy).items()}
    expected.update({kind: "candidate list" for kind in accepted_kinds(dummy, b"\xff\xd8\xff")})
    rows = {k: ("candidate list" if v == "candidate list" else v) for k, v in rows.items()}
    assert rows == expected


def test_no_probe_image_stays_in_redis_once_answered(world):
    """Probe images live in the object store under retention (``quorum probes purge``), never in Redis:
    once a probe is answered no key, stream entry or hash field holds any part of it."""
    s, client, _, subjects = world
    r = redis.Redis.from_url(s.redis_url)
    data = sorted(subjects[5].iterdir())[1].read_bytes()
    rid = client.submit(data, case_number="H-2026-7", offence_code="PC211", purpose="investigation", candidates=5)
    assert isinstance(client.wait(rid, timeout=120), CandidateList)
    _quiet(r)
    needles = [base64.b64encode(data)[1000:1064], data[1000:1064]]  # from the middle: not a shared header

    def holds(value: bytes) -> bool:
        return any(n in value for n in needles)

    found = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"string":
            values = [r.get(key) or b""]
        elif kind == b"hash":
            values = list(r.hgetall(key).values())
        elif kind == b"stream":
            values = [v for _, f in r.xrange(key) for v in f.values()]
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        elif kind == b"zset":
            values = [m for m in r.zrange(key, 0, -1)]
        elif kind == b"set":
            values = list(r.smembers(key))
        else:
            values = []
        if any(holds(v) for v in values):
            found.append(key.decode())
    assert not found, found
