"""The job: one search in flight, as it crosses the gateway, intake, engine and fusion processes.

Frozen and versioned like every message. The gateway creates it (``face`` is None), intake returns a
copy with the chosen face (:meth:`Job.with_face`), engines and fusion only read it. It is stored in
Redis under ``broker.keys.job_key`` by ``broker.jobs``; tasks pass only the request id.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .case import CaseContext
from .messages import MAX_CANDIDATES, SCHEMA_VERSION, FaceInfo, _Model

Point = tuple[float, float]


class SearchedFace(FaceInfo):
    """The face intake chose: what the result reports (:class:`FaceInfo`) plus the five landmarks
    (YuNet order: right eye, left eye, nose tip, right and left mouth corner) the engines align on."""

    landmarks: tuple[Point, Point, Point, Point, Point]

    def info(self) -> FaceInfo:
        """What the candidate list tells the agency about this face."""
        return FaceInfo(**self.model_dump(exclude={"landmarks"}))


class Job(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    agency_id: str
    user_id: str
    case_number: str
    offence_code: str
    purpose: str
    image_key: str = Field(description="the probe image in the object store")
    probe_sha256: str
    candidates: int = Field(ge=1, le=MAX_CANDIDATES)
    face_index: int | None = Field(default=None, ge=0)
    engines: tuple[str, ...] = Field(min_length=1, description="the engines this search waits for")
    received_at: float = Field(description="epoch seconds, at the gateway")
    stream_entry_id: str = Field(description="the intake stream entry that carried the request")
    face: SearchedFace | None = Field(default=None, description="set by intake")
    intake_ms: float | None = Field(default=None, description="intake's time to fetch, decode and detect")

    @classmethod
    def for_case(cls, case: CaseContext, **rest: object) -> Job:
        """The job of a search whose case context is ``case``; ``rest``: the job's other fields."""
        return cls.model_validate(
            {
                "request_id": case.request_id,
                "agency_id": case.agency_id,
                "user_id": case.user_id,
                "case_number": case.case_number,
                "offence_code": case.offence_code,
                "purpose": case.purpose,
                "probe_sha256": case.probe_sha256,
                **rest,
            }
        )

    @property
    def case(self) -> CaseContext:
        """Who searched, for which case and why, and which probe."""
        return CaseContext(
            agency_id=self.agency_id,
            user_id=self.user_id,
            request_id=self.request_id,
            case_number=self.case_number,
            offence_code=self.offence_code,
            purpose=self.purpose,
            probe_sha256=self.probe_sha256,
        )

    def with_face(self, face: SearchedFace) -> Job:
        return self.model_copy(update={"face": face})
