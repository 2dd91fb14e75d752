"""A light Quorum client: sign, submit and wait, with nothing of the server installed.

The signing recipe (README "Accountability", the server's ``broker/signing.py``):
``signature = hex HMAC-SHA256(secret, "quorum-v1\\n" + timestamp + "\\n" + nonce + "\\n" + canonical)``,
where ``canonical`` is the payload with ``image.data_b64`` replaced by ``image.sha256`` (hex SHA-256 of
the decoded bytes), serialised with RFC 8785 (JSON Canonicalization Scheme).
"""

from quorum_client.client import (
    Answer,
    InvalidRequest,
    QuorumClient,
    build_request,
    canonical_payload,
    sign,
    validate_request,
)

__all__ = [
    "Answer",
    "InvalidRequest",
    "QuorumClient",
    "build_request",
    "canonical_payload",
    "sign",
    "validate_request",
]
