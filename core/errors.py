"""One small error hierarchy with stable codes.

Every failure a caller can see carries a ``code`` from :class:`Code` (stable strings that agencies'
software may switch on) and a ``retryable`` flag that retry logic keys on, never the message text.
Errors from dependencies (OpenCV, redis, minio, hnswlib) are translated into these at the boundary.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    # The request itself is wrong: fix the input, do not retry.
    INVALID_MESSAGE = "INVALID_MESSAGE"  # not JSON, or breaks the schema
    INVALID_ID = "INVALID_ID"  # an agency, user or subject id outside the id grammar (schemas.ids)
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"  # the entry's payload is over what any valid request needs
    UNSUPPORTED_SCHEMA_VERSION = "UNSUPPORTED_SCHEMA_VERSION"
    DUPLICATE_REQUEST = "DUPLICATE_REQUEST"  # request id seen before (replay)
    AGENCY_MISMATCH = "AGENCY_MISMATCH"  # message agency differs from the stream it came on
    IMAGE_MISSING = "IMAGE_MISSING"  # object key names nothing in the store
    IMAGE_EMPTY = "IMAGE_EMPTY"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"  # bytes or pixels over the configured limit
    NOT_AN_IMAGE = "NOT_AN_IMAGE"  # cannot be decoded as an image
    IMAGE_TRUNCATED = "IMAGE_TRUNCATED"  # a JPEG/PNG cut short
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
    NO_FACE = "NO_FACE"
    FACE_INDEX_OUT_OF_RANGE = "FACE_INDEX_OUT_OF_RANGE"
    FACE_TOO_SMALL = "FACE_TOO_SMALL"
    # ANSI/NIST-ITL transactions (core.nist): a file, or one record of it, that cannot be used.
    NIST_NOT_A_TRANSACTION = "NIST_NOT_A_TRANSACTION"  # does not begin with a Type-1 record (1.001)
    NIST_TRUNCATED = "NIST_TRUNCATED"  # ends before a record its lengths or 1.003 promise
    NIST_LENGTH_MISMATCH = "NIST_LENGTH_MISMATCH"  # a record's length field does not end it where it ends
    NIST_RECORD_TOO_LARGE = "NIST_RECORD_TOO_LARGE"  # a record declares more bytes than the image limit allows
    NIST_MALFORMED = "NIST_MALFORMED"  # fields that do not parse, a 1.003 that does not list the records
    NIST_NO_IMAGE = "NIST_NO_IMAGE"  # a Type-10 record without image data (or no Type-10 face at all)
    NIST_UNSUPPORTED_COMPRESSION = "NIST_UNSUPPORTED_COMPRESSION"  # 10.011 not read, or data not as declared
    NIST_SUBJECT_MISSING = "NIST_SUBJECT_MISSING"  # the field that names the subject (2.015) is absent
    # Accountability: who may search, and why (checked by the gateway before any image is stored).
    BAD_SIGNATURE = "BAD_SIGNATURE"  # unsigned, or the HMAC does not match the agency's secret
    STALE_TIMESTAMP = "STALE_TIMESTAMP"  # signed timestamp outside the allowed window
    REPLAYED_NONCE = "REPLAYED_NONCE"  # the nonce was already used within the window
    UNKNOWN_AGENCY = "UNKNOWN_AGENCY"
    AGENCY_SUSPENDED = "AGENCY_SUSPENDED"
    USER_UNKNOWN = "USER_UNKNOWN"
    USER_OTHER_AGENCY = "USER_OTHER_AGENCY"  # the user belongs to another agency
    USER_INACTIVE = "USER_INACTIVE"
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"  # e.g. an auditor or operator submitting a search
    CERTIFICATE_MISSING = "CERTIFICATE_MISSING"  # no face-search training certificate on record
    CERTIFICATE_EXPIRED = "CERTIFICATE_EXPIRED"
    CASE_NUMBER_MISSING = "CASE_NUMBER_MISSING"  # absent, blank or a placeholder
    CASE_NUMBER_MALFORMED = "CASE_NUMBER_MALFORMED"
    OFFENCE_UNKNOWN = "OFFENCE_UNKNOWN"
    PURPOSE_NOT_ALLOWED = "PURPOSE_NOT_ALLOWED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # the agency's daily search quota is used up
    PROBE_ENROL_REFUSED = "PROBE_ENROL_REFUSED"  # a probe image may never be enrolled in the gallery
    DISPOSITION_REFUSED = "DISPOSITION_REFUSED"  # a disposition that breaks the rules (see accountability.audit)
    # The two-person rule: a lead confirmed by the user, or the operator, who recorded it.
    SECOND_PERSON_REQUIRED = "SECOND_PERSON_REQUIRED"
    # Reading a finished search back (the candidate sheet, review/).
    REQUEST_UNKNOWN = "REQUEST_UNKNOWN"  # no accepted search with this request id in the audit trail
    NO_CANDIDATE_LIST = "NO_CANDIDATE_LIST"  # refused, answered with an error, or not answered yet
    RESULT_EXPIRED = "RESULT_EXPIRED"  # answered, but the result is past result_ttl_s and gone from Redis
    # The system could not answer in time or a part is down: retrying may help.
    ENGINE_FAILED = "ENGINE_FAILED"
    ENGINE_TIMEOUT = "ENGINE_TIMEOUT"
    GALLERY_EMPTY = "GALLERY_EMPTY"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    NO_ENGINE_RESULT = "NO_ENGINE_RESULT"  # deadline passed with no engine answering
    SEARCH_TIMEOUT = "SEARCH_TIMEOUT"  # the search timeout passed before the probe's face was found
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"  # the audit database cannot be written: nothing runs unaudited
    LICENCE_NOT_ACCEPTED = "LICENCE_NOT_ACCEPTED"  # a research-only engine the operator has not accepted
    ENGINE_NOT_INSTALLED = "ENGINE_NOT_INSTALLED"  # an engine's model package or files are missing (names the fix)
    REDIS_ACL_NOT_APPLIED = "REDIS_ACL_NOT_APPLIED"  # a registry change did not reach Redis's ACL (retry the sync)
    INTERNAL = "INTERNAL"


RETRYABLE = frozenset(
    {
        Code.ENGINE_FAILED,
        Code.ENGINE_TIMEOUT,
        Code.STORE_UNAVAILABLE,
        Code.BROKER_UNAVAILABLE,
        Code.NO_ENGINE_RESULT,
        Code.SEARCH_TIMEOUT,
        Code.AUDIT_UNAVAILABLE,
        Code.REDIS_ACL_NOT_APPLIED,
        Code.INTERNAL,
    }
)


class QuorumError(Exception):
    """Base of every error Quorum raises on purpose."""

    def __init__(self, code: Code, message: str = "", **details: object) -> None:
        self.code = Code(code)
        self.message = message or self.code.value
        self.details = details
        super().__init__(f"{self.code.value}: {self.message}")

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class InputError(QuorumError):
    """The request or its image is wrong; the same input will always fail the same way."""


class ServiceError(QuorumError):
    """A dependency (store, broker, engine) failed; the same request may succeed later."""


def require_id(kind: str, value: object) -> str:
    """``value`` when it is a valid id of ``kind`` (a ``schemas.ids.IdKind``); else ``INVALID_ID``
    naming it safely (escaped: a bidi or control character is never printed as such)."""
    from ..schemas.ids import IdKind, problem

    why = problem(IdKind(kind), value)
    if why is not None:
        raise InputError(Code.INVALID_ID, why, kind=str(kind))
    return str(value)
