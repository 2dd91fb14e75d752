"""Signing: the canonical form (RFC 8785, JCS) is stable and documented, and every tampering is caught.

The known answers below are RFC 8785's own examples (section 3.2.3's key ordering, appendix B's numbers,
section 3.2.4's sample) and the shared cross-language vectors of ``clients/vectors.json`` that the Node
and shell clients are tested against too."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from quorum.broker import signing
from quorum.core.errors import Code, InputError

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
    # For strings and integers with ASCII keys (every ProbeRequest), RFC 8785 is Python's compact sorted
    # dump with non-ASCII characters left as UTF-8: an independent implementation of the recipe.
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


VECTORS = json.loads((Path(__file__).resolve().parents[2] / "clients" / "vectors.json").read_text())


def _jcs(obj) -> str:
    return signing.canonical_payload(obj).decode("utf-8")


def test_rfc8785_key_order_is_by_utf16_code_units():
    # RFC 8785 section 3.2.3: an astral character (the emoji, a surrogate pair D83D DE00) sorts before
    # U+FB33, whereas ordering by code point (Python's sort_keys) puts it last.
    doc = json.loads(
        r'{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One",'
        r'"\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis"}'
    )
    assert _jcs(doc) == (
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control","ö":"Latin Small Letter O With Diaeresis",'
        '"€":"Euro Sign","😀":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    )
    assert json.dumps(doc, sort_keys=True, ensure_ascii=False).index("😀") > json.dumps(
        doc, sort_keys=True, ensure_ascii=False
    ).index("\ufb33")


def test_rfc8785_sample_document():
    # RFC 8785 section 3.2.4 (input as in the RFC, escapes and all)
    text = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        r""" "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/","""
        ' "literals": [null, true, false]}'
    )
    assert _jcs(json.loads(text)) == (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )


@pytest.mark.parametrize(
    "bits, text",
    [  # RFC 8785 appendix B: IEEE 754 doubles (hex) and their canonical text
        ("0000000000000000", "0"),
        ("8000000000000000", "0"),  # -0
        ("0000000000000001", "5e-324"),
        ("8000000000000001", "-5e-324"),
        ("7fefffffffffffff", "1.7976931348623157e+308"),
        ("ffefffffffffffff", "-1.7976931348623157e+308"),
        ("4340000000000000", "9007199254740992"),
        ("c340000000000000", "-9007199254740992"),
        ("4430000000000000", "295147905179352830000"),
        ("44b52d02c7e14af5", "9.999999999999997e+22"),
        ("44b52d02c7e14af6", "1e+23"),
        ("44b52d02c7e14af7", "1.0000000000000001e+23"),
        ("444b1ae4d6e2ef4e", "999999999999999700000"),
        ("444b1ae4d6e2ef4f", "999999999999999900000"),
        ("444b1ae4d6e2ef50", "1e+21"),
        ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
        ("3eb0c6f7a0b5ed8d", "0.000001"),
        ("41b3de4355555553", "333333333.3333332"),
        ("41b3de4355555554", "333333333.33333325"),
        ("41b3de4355555555", "333333333.3333333"),
        ("41b3de4355555556", "333333333.3333334"),
        ("41b3de4355555557", "333333333.33333343"),
        ("becbf647612f3696", "-0.0000033333333333333333"),
        ("43143ff3c1cb0959", "1424953923781206.2"),
    ],
)
def test_rfc8785_numbers(bits, text):
    import struct

    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    assert _jcs({"n": value}) == '{"n":' + text + "}"


def test_floats_and_non_ascii_differ_from_the_old_python_form():
    doc = {"a": 0.1, "b": 1e21, "c": -0.0, "d": 5e-7, "e": 1.0, "f": "é 中文 😀", "g": "\x1f\x7f"}
    assert _jcs(doc) == '{"a":0.1,"b":1e+21,"c":0,"d":5e-7,"e":1,"f":"é 中文 😀","g":"\\u001f\x7f"}'
    old = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert old != _jcs(doc)  # Python prints -0.0, 5e-07 and 1.0


@pytest.mark.parametrize("text", ['{"n": 9007199254740993}', '{"n": NaN}', '{"n": Infinity}', '{"s": "\\ud800"}'])
def test_payloads_without_a_canonical_form_are_invalid(text):
    with pytest.raises(InputError) as exc:
        signing.canonical_payload(json.loads(text))
    assert exc.value.code == Code.INVALID_MESSAGE


def test_a_payload_parsed_but_too_deep_to_canonicalise_is_invalid():
    """The serialiser recurses in Python: a document the parser took but that runs out of stack while
    being canonicalised is INVALID_MESSAGE, not a crash (stack made small here to show it)."""
    import sys

    doc = json.loads('{"a":' * 300 + "1" + "}" * 300)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(250)
    try:
        with pytest.raises(InputError) as exc:
            signing.canonical_payload(doc)
    finally:
        sys.setrecursionlimit(limit)
    assert exc.value.code == Code.INVALID_MESSAGE


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_shared_cross_language_vectors(vector):
    """The vectors the Node and shell clients are tested against: canonical text and signature."""
    doc = json.loads(vector["payload"])
    assert signing.canonical_payload(doc).decode() == vector["canonical"]
    fields = signing.sign(VECTORS["secret"], vector["payload"], timestamp=VECTORS["timestamp"], nonce=VECTORS["nonce"])
    assert fields["signature"] == vector["signature"]
