"""Pydantic models of Quorum's messages (schema version 1).

Three families:

* :class:`ProbeRequest` — what an agency writes onto its intake stream.
* :class:`EngineResult` — what one engine worker hands to fusion (internal, but versioned too).
* :class:`CandidateList` / :class:`ErrorResult` — what comes back on the agency's result stream,
  told apart by ``type``.

Every model forbids unknown fields: a typo in a field name is an error, not a silently ignored key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .ids import AGENCY_ID_PATTERN, REQUEST_ID_PATTERN, USER_ID_PATTERN

SCHEMA_VERSION: Final = 1
MAX_CANDIDATES = 250

INVESTIGATIVE_LEAD_NOTICE = (
    "INVESTIGATIVE LEAD ONLY. This candidate list is not an identification and is not probable "
    "cause to arrest. Any candidate must be reviewed by a trained examiner and corroborated by "
    "independent investigation."
)

_SHA256_KEY = r"^[a-z]+/[0-9a-f]{64}$"


def _now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectImage(_Model):
    """An image the client already uploaded to the object store (key as returned by the store)."""

    key: str = Field(pattern=_SHA256_KEY, description="object key, e.g. probes/<sha256 hex>")


class InlineImage(_Model):
    """Image bytes carried in the intake message itself, base64-encoded.

    The gateway stores them under their SHA-256 and passes only the key further down the pipeline.
    """

    data_b64: str = Field(min_length=0, description="standard base64 of the image file (JPEG or PNG)")


ImageRef = ObjectImage | InlineImage


class ProbeRequest(_Model):
    """A search request, as an agency writes it onto ``quorum:intake:<agency_id>``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="unique per request; also the idempotency key")
    agency_id: str = Field(pattern=AGENCY_ID_PATTERN, description="lower-case letters, digits, - and _ (schemas.ids)")
    user_id: str = Field(
        pattern=USER_ID_PATTERN, description="the investigator submitting the search: ASCII letters, digits, -_."
    )
    case_number: str = Field(min_length=1, max_length=64)
    offence_code: str = Field(min_length=1, max_length=32)
    purpose: str = Field(min_length=1, max_length=64)
    image: ImageRef
    candidates: int = Field(default=250, ge=1, le=MAX_CANDIDATES, description="length of the list")
    face_index: int | None = Field(
        default=None, ge=0, description="which face to search when there are several (0 = largest)"
    )
    submitted_at: datetime | None = None


class EngineCandidate(_Model):
    subject_id: str
    rank: int = Field(ge=1)
    score: float = Field(description="the engine's raw similarity (cosine); not comparable across engines")


class EngineResult(_Model):
    """One engine's ranked list for one probe (or why it has none)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    engine: str
    engine_version: str
    status: Literal["ok", "error"]
    error_code: str | None = None
    error_message: str | None = None
    candidates: list[EngineCandidate] = Field(default_factory=list)
    gallery_size: int = 0
    embed_ms: float = 0.0
    search_ms: float = 0.0
    shards: int = Field(default=1, ge=1, description="how many gallery shards the engine's gallery is split into")
    shards_answered: list[int] | None = Field(
        default=None, description="sharded engine: the shards whose answers were merged into this list"
    )


class EngineHit(_Model):
    rank: int = Field(ge=1)
    score: float


class FusedCandidate(_Model):
    rank: int = Field(ge=1)
    subject_id: str
    fused_score: float
    engines: dict[str, EngineHit] = Field(description="each engine that returned this subject: its rank and raw score")


class FaceInfo(_Model):
    index: int = Field(ge=0, description="which detected face was searched (0 = largest)")
    faces_found: int = Field(ge=1)
    box: tuple[float, float, float, float] = Field(description="x, y, width, height in pixels")
    detector_score: float
    chosen_by: Literal["request", "largest"]


class CandidateList(_Model):
    """The fused candidate list: an investigative lead, never an identification."""

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["candidate_list"] = "candidate_list"
    request_id: str
    agency_id: str
    case_number: str
    probe_sha256: str
    face: FaceInfo
    candidates: list[FusedCandidate]
    fusion_method: str
    engines_contributed: list[str]
    engines_failed: dict[str, str] = Field(default_factory=dict, description="engine -> error code")
    engines_partial: dict[str, list[int]] = Field(
        default_factory=dict,
        description="sharded engine whose list covers only part of its gallery -> the shards that answered",
    )
    degraded: bool = Field(description="true when an engine did not contribute, or only some of its shards did")
    notice: str = INVESTIGATIVE_LEAD_NOTICE
    duration_ms: float
    created_at: datetime = Field(default_factory=_now)


class ErrorResult(_Model):
    """A request that could not be searched, with a stable code from ``core.errors.Code``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["error"] = "error"
    request_id: str | None = Field(description="null when the message was too broken to carry one")
    agency_id: str
    stream_entry_id: str | None = Field(default=None, description="the intake stream entry answered")
    code: str
    message: str
    retryable: bool
    stage: Literal["gateway", "intake", "fusion"]
    created_at: datetime = Field(default_factory=_now)


ResultMessage = Annotated[CandidateList | ErrorResult, Field(discriminator="type")]
_RESULT_ADAPTER: TypeAdapter[CandidateList | ErrorResult] = TypeAdapter(ResultMessage)


def parse_result(data: str | bytes) -> CandidateList | ErrorResult:
    return _RESULT_ADAPTER.validate_json(data)


def result_json_schema() -> dict:
    return _RESULT_ADAPTER.json_schema()
