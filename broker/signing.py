"""Signed submissions: HMAC-SHA256 over the canonical message, a timestamp and a nonce.

An intake stream entry carries four fields::

    XADD quorum:intake:<agency> * payload <ProbeRequest JSON> timestamp <unix seconds> \
                                  nonce <random> signature <hex HMAC>

How to compute ``signature`` (any language):

1. Parse ``payload`` as a JSON object. If ``image`` is an object with ``data_b64``, replace ``image``
   by ``{"sha256": <lower-case hex SHA-256 of the *decoded* image bytes>}`` (the bytes themselves are
   not hashed into the MAC twice: keeps signing cheap for large images). ``{"key": ...}`` stays as is.
2. Serialise that object in the JSON Canonicalization Scheme, RFC 8785 (JCS), which libraries in most
   languages implement: no whitespace; object keys sorted by their UTF-16 code units (an astral
   character such as an emoji sorts by its surrogate pair, before U+E000-U+FFFF); strings as UTF-8 with
   only ``"``, ``\\`` and the control characters escaped (``\\n``, ``\\u001f``..., never ``\\u``
   for other characters); numbers as ECMAScript prints a double (``0.1``, ``1e+21``, ``5e-7``, ``-0``
   as ``0``, ``1.0`` as ``1``). Integers beyond +-(2**53 - 1), NaN and infinities have no canonical
   form: such a payload is refused (``INVALID_MESSAGE``). For a payload of strings and integers only
   (every ProbeRequest today), this is the same text as sorted keys with ``","``/``":"`` separators and
   non-ASCII characters unescaped. (Python: ``rfc8785.dumps(obj)``; Node: ``canonicalize(obj)``.)
3. The string to sign is ``b"quorum-v1\\n" + timestamp + b"\\n" + nonce + b"\\n" + canonical``, where
   ``timestamp`` is the decimal Unix time in seconds (ASCII) and ``nonce`` 16-64 characters of
   ``A-Z a-z 0-9 _ -``, fresh for every submission.
4. ``signature`` = lower-case hex of HMAC-SHA256(key = the agency secret as UTF-8 bytes, string to sign).

The gateway refuses an entry with no or a wrong signature (``BAD_SIGNATURE``), a timestamp more than
``signature_window_s`` (300 s) from its clock (``STALE_TIMESTAMP``) and a nonce it has seen within the
window (``REPLAYED_NONCE``: ``SET quorum:nonce:<agency>:<nonce> NX`` with a TTL of twice the window).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

import rfc8785

from ..core.errors import Code, InputError

PREFIX = b"quorum-v1\n"
NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
FIELDS = ("payload", "timestamp", "nonce", "signature")


def new_secret() -> str:
    return secrets.token_hex(32)


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def canonical_payload(doc: dict) -> bytes:
    """Step 1-2 above. Raises ``INVALID_MESSAGE`` when ``image.data_b64`` is not valid base64 or the
    payload has no RFC 8785 form (an integer beyond 2**53 - 1, NaN or an infinity, a lone surrogate)."""
    obj = dict(doc)
    image = obj.get("image")
    if isinstance(image, dict) and isinstance(image.get("data_b64"), str):
        try:
            data = base64.b64decode(image["data_b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(Code.INVALID_MESSAGE, "image.data_b64 is not valid base64") from exc
        rest = {k: v for k, v in image.items() if k != "data_b64"}
        obj["image"] = {**rest, "sha256": hashlib.sha256(data).hexdigest()}
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise InputError(Code.INVALID_MESSAGE, f"the payload has no canonical form (RFC 8785): {exc}") from exc
    except RecursionError:  # parsed, but too deep for the (recursive) canonical serialiser
        raise InputError(Code.INVALID_MESSAGE, "payload is nested too deeply") from None


def string_to_sign(canonical: bytes, timestamp: str, nonce: str) -> bytes:
    return PREFIX + timestamp.encode("ascii") + b"\n" + nonce.encode("ascii") + b"\n" + canonical


def mac(secret: str, canonical: bytes, timestamp: str, nonce: str) -> str:
    return hmac.new(secret.encode("utf-8"), string_to_sign(canonical, timestamp, nonce), hashlib.sha256).hexdigest()


def sign(
    secret: str, payload: str | bytes, *, timestamp: int | None = None, nonce: str | None = None
) -> dict[str, str]:
    """The stream entry fields for ``payload`` (a JSON object), signed with ``secret``."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    ts = str(int(time.time()) if timestamp is None else int(timestamp))
    nonce = nonce or new_nonce()
    return {
        "payload": text,
        "timestamp": ts,
        "nonce": nonce,
        "signature": mac(secret, canonical_payload(json.loads(text)), ts, nonce),
    }


@dataclass(frozen=True)
class Signed:
    timestamp: int
    nonce: str


def verify(secret: str, doc: dict, fields: dict[str, object], *, now: float, window_s: int) -> Signed:
    """Check an entry's signature and timestamp (the caller checks the nonce for replay).

    ``fields``: the entry's fields (str or bytes values). Raises ``BAD_SIGNATURE`` or ``STALE_TIMESTAMP``.
    """

    def get(name: str) -> str:
        v = fields.get(name)
        if isinstance(v, bytes):
            try:
                v = v.decode("ascii")
            except UnicodeDecodeError:
                v = None
        return v if isinstance(v, str) else ""

    canonical = canonical_payload(doc)  # first: a broken image is INVALID_MESSAGE, signed or not
    sig, ts, nonce = get("signature"), get("timestamp"), get("nonce")
    if not sig:
        raise InputError(Code.BAD_SIGNATURE, "the entry is not signed (fields signature, timestamp, nonce)")
    if not ts.isdigit() or len(ts) > 12:
        raise InputError(Code.BAD_SIGNATURE, "timestamp must be decimal Unix seconds")
    if not NONCE.match(nonce):
        raise InputError(Code.BAD_SIGNATURE, "nonce must be 16-64 of A-Z a-z 0-9 _ -")
    expected = mac(secret, canonical, ts, nonce)
    if not hmac.compare_digest(expected, sig.lower()):
        raise InputError(Code.BAD_SIGNATURE, "the signature does not match the message and the agency's secret")
    if abs(now - int(ts)) > window_s:
        raise InputError(
            Code.STALE_TIMESTAMP,
            f"timestamp {ts} is {int(now) - int(ts)} s from the gateway's clock (window ±{window_s} s)",
        )
    return Signed(int(ts), nonce)
