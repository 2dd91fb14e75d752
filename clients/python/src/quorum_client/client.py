"""Sign, validate, submit, wait: the stream protocol of README "Submitting a search without Python".

Depends on redis, rfc8785 and jsonschema only; it re-implements the server's recipe rather than
importing it (``tests/unit/test_signing.py`` and ``clients/vectors.json`` keep the two in step).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import redis
import rfc8785

log = logging.getLogger("quorum_client")

PREFIX = b"quorum-v1\n"


class InvalidRequest(ValueError):
    """The request breaks the published schema (or has no canonical form): it was not sent."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def canonical_payload(doc: dict[str, Any]) -> bytes:
    """The payload as signed: ``image.data_b64`` replaced by ``image.sha256``, in RFC 8785 form."""
    obj = dict(doc)
    image = obj.get("image")
    if isinstance(image, dict) and isinstance(image.get("data_b64"), str):
        try:
            data = base64.b64decode(image["data_b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(["image.data_b64 is not valid base64"]) from exc
        rest = {k: v for k, v in image.items() if k != "data_b64"}
        obj["image"] = {**rest, "sha256": hashlib.sha256(data).hexdigest()}
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise InvalidRequest([f"no canonical form (RFC 8785): {exc}"]) from exc
    except RecursionError:
        raise InvalidRequest(["nested too deeply"]) from None


def sign(secret: str, payload: str, *, timestamp: int | None = None, nonce: str | None = None) -> dict[str, str]:
    """The intake entry's fields for ``payload`` (JSON text of an object)."""
    ts = str(int(time.time()) if timestamp is None else int(timestamp))
    nonce = nonce or secrets.token_urlsafe(18)
    msg = PREFIX + ts.encode() + b"\n" + nonce.encode() + b"\n" + canonical_payload(json.loads(payload))
    signature = hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).hexdigest()
    return {"payload": payload, "timestamp": ts, "nonce": nonce, "signature": signature}


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("quorum_client").joinpath("probe-request.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def validate_request(doc: Any) -> None:
    """Raise :class:`InvalidRequest` when ``doc`` breaks ``probe-request.schema.json``."""
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise InvalidRequest([f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5]])


def build_request(
    agency_id: str,
    user_id: str,
    image: bytes | str | Path,
    *,
    case_number: str,
    offence_code: str,
    purpose: str,
    candidates: int = 250,
    face_index: int | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """A probe request document; ``image``: the bytes, or a path to read, or ``"probes/<sha256>"``."""
    if isinstance(image, str) and image.startswith("probes/"):
        ref: dict[str, str] = {"key": image}
    else:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        ref = {"data_b64": base64.b64encode(data).decode("ascii")}
    doc: dict[str, Any] = {
        "schema_version": 1,
        "request_id": request_id or uuid.uuid4().hex,
        "agency_id": agency_id,
        "user_id": user_id,
        "case_number": case_number,
        "offence_code": offence_code,
        "purpose": purpose,
        "image": ref,
        "candidates": candidates,
    }
    if face_index is not None:
        doc["face_index"] = face_index
    return doc


@dataclass
class Answer:
    """The answer to one request: ``type`` is ``candidate_list`` or ``error`` (then ``code`` is set)."""

    request_id: str
    entry_id: str
    result: dict[str, Any] = field(repr=False)

    @property
    def type(self) -> str:
        return str(self.result.get("type"))

    @property
    def code(self) -> str | None:
        return self.result.get("code")

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return list(self.result.get("candidates") or [])


class QuorumClient:
    """``redis_url`` logs in as the agency's Redis ACL user (``redis://agency-<id>:<password>@host:port/0``);
    ``secret``: the agency's signing secret."""

    def __init__(self, redis_url: str, agency_id: str, user_id: str, secret: str) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.agency_id = agency_id
        self.user_id = user_id
        self.secret = secret

    def check_login(self) -> None:
        """Fail now (``redis.AuthenticationError``) rather than at the first command, on a wrong login."""
        self.redis.ping()

    def submit(self, image: bytes | str | Path, **kw: Any) -> tuple[str, str]:
        """Build, validate, sign and send a request; returns (request id, intake entry id)."""
        return self.submit_doc(build_request(self.agency_id, self.user_id, image, **kw))

    def submit_doc(self, doc: dict[str, Any]) -> tuple[str, str]:
        validate_request(doc)  # raises before anything is sent
        payload = json.dumps(doc, ensure_ascii=False)
        fields = sign(self.secret, payload)
        entry = self.redis.xadd(f"quorum:intake:{self.agency_id}", fields)  # type: ignore[arg-type]
        entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
        log.info("submitted agency=%s request_id=%s entry_id=%s", self.agency_id, doc["request_id"], entry_id)
        return doc["request_id"], entry_id

    def wait(self, request_id: str, entry_id: str, timeout: float = 300.0) -> Answer:
        """The request's published result (``GET quorum:result:<agency>:<id>``), or an error on the
        results stream naming the intake entry (``stream_entry_id``: refusals decided before the request
        id is trusted are only there). Raises ``TimeoutError``."""
        key = f"quorum:result:{self.agency_id}:{request_id}"
        stream = f"quorum:results:{self.agency_id}"
        ms = int(entry_id.split("-", 1)[0])
        if ms > time.time() * 1000 + 300_000:  # the stream was pushed into the future (XADD <id>):
            ms = int(time.time() * 1000) - 300_000  # answers keep Redis's clock; read from 5 min ago
        last = f"{max(ms - 1, 0)}-0"  # answers are written after the entry, by the same Redis clock
        deadline = time.monotonic() + timeout
        while True:
            raw = self.redis.get(key)
            if raw:
                return self._answer(request_id, entry_id, json.loads(raw))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer to {request_id} in {timeout:.0f} s")
            resp = self.redis.xread({stream: last}, block=max(int(min(remaining, 1.0) * 1000), 1), count=500)
            for _, entries in resp or []:  # type: ignore[union-attr]
                for eid, fields in entries:
                    last = eid.decode() if isinstance(eid, bytes) else eid
                    if fields.get(b"type") != b"error":
                        continue
                    result = json.loads(fields.get(b"payload", b"{}"))
                    if result.get("stream_entry_id") == entry_id:
                        return self._answer(request_id, entry_id, result)

    def _answer(self, request_id: str, entry_id: str, result: dict[str, Any]) -> Answer:
        answer = Answer(request_id, entry_id, result)
        log.info(
            "answered agency=%s request_id=%s type=%s code=%s candidates=%d",
            self.agency_id,
            request_id,
            answer.type,
            answer.code,
            len(answer.candidates),
        )
        return answer
