"""Signing: the canonical form is stable and documented, and every tampering is caught."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from broker import signing
from core.errors import Code, InputError

SECRET = "s3cret-for-tests"
IMAGE = b"\xff\xd8\xff\xe0 not really a jpeg"
DOC = {
    "schema_version": 1,
    "request_id": "r1",
    "agency_id": "a",
    "user_id": "u",
    "case_number": "C-1",
    "offence_code": "PC211",
    "purpose": "criminal-investigation",
    "candidates": 10,
    "image": {"data_b64": base64.b64encode(IMAGE).decode()},
    "note": "Ünïcode",
}


def test_canonical_form_matches_the_documented_recipe():
    want = dict(DOC, image={"sha256": hashlib.sha256(IMAGE).hexdigest()})
    expected = json.dumps(want, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert signing.canonical_payload(DOC) == expected
    # Key order and whitespace in the sent JSON do not matter.
    shuffled = json.loads(json.dumps(dict(reversed(list(DOC.items()))), indent=2))
    assert signing.canonical_payload(shuffled) == expected
    # An independent implementation of the documented MAC gives the same signature.
    fields = signing.sign(SECRET, json.dumps(DOC), timestamp=1_700_000_000, nonce="n" * 20)
    msg = b"quorum-v1\n1700000000\n" + b"n" * 20 + b"\n" + expected
    assert fields["signature"] == hmac.new(SECRET.encode(), msg, hashlib.sha256).hexdigest()


def _verify(fields, doc=None, now=1_700_000_000, secret=SECRET):
    return signing.verify(secret, doc or json.loads(fields["payload"]), fields, now=now, window_s=300)


def test_valid_signature_passes_and_returns_the_nonce():
    fields = signing.sign(SECRET, json.dumps(DOC), timestamp=1_700_000_000)
    assert _verify(fields).nonce == fields["nonce"]
    assert _verify({k: v.encode() for k, v in fields.items()}).timestamp == 1_700_000_000  # bytes as from Redis


@pytest.mark.parametrize(
    "tamper, code",
    [
        (lambda f, d: (f.pop("signature"), d)[1], Code.BAD_SIGNATURE),
        (lambda f, d: dict(d, case_number="C-2"), Code.BAD_SIGNATURE),
        (lambda f, d: dict(d, image={"data_b64": base64.b64encode(IMAGE + b"x").decode()}), Code.BAD_SIGNATURE),
        (lambda f, d: (f.update(timestamp="1700000001"), d)[1], Code.BAD_SIGNATURE),
        (lambda f, d: (f.update(nonce="m" * 20), d)[1], Code.BAD_SIGNATURE),
        (lambda f, d: (f.update(nonce="short"), d)[1], Code.BAD_SIGNATURE),
        (lambda f, d: (f.update(timestamp="soon"), d)[1], Code.BAD_SIGNATURE),
        (lambda f, d: dict(d, image={"data_b64": "@@not base64@@"}), Code.INVALID_MESSAGE),
    ],
)
def test_tampering_is_refused(tamper, code):
    fields = signing.sign(SECRET, json.dumps(DOC), timestamp=1_700_000_000, nonce="n" * 20)
    doc = tamper(fields, json.loads(fields["payload"]))
    with pytest.raises(InputError) as exc:
        _verify(fields, doc)
    assert exc.value.code == code


def test_wrong_secret_and_stale_timestamps():
    fields = signing.sign(SECRET, json.dumps(DOC), timestamp=1_700_000_000)
    with pytest.raises(InputError) as exc:
        _verify(fields, secret="another agency's secret")
    assert exc.value.code == Code.BAD_SIGNATURE
    for now in (1_700_000_000 + 301, 1_700_000_000 - 301):
        with pytest.raises(InputError) as exc:
            _verify(fields, now=now)
        assert exc.value.code == Code.STALE_TIMESTAMP
    assert _verify(fields, now=1_700_000_000 + 300)


def test_object_key_images_are_signed_as_they_are():
    doc = dict(DOC, image={"key": "probes/" + "a" * 64})
    assert json.loads(signing.canonical_payload(doc))["image"] == {"key": "probes/" + "a" * 64}
