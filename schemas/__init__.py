"""The contract: every message that crosses a process boundary, versioned.

This package imports no worker code. JSON Schema files generated from these models live in
``schemas/json/`` so that an agency's software in any language can validate what it sends and
receives; ``python -m quorum.schemas.export`` regenerates them and a test checks they are current.
"""

from .case import CaseContext
from .job import Job, SearchedFace
from .messages import (
    INVESTIGATIVE_LEAD_NOTICE,
    SCHEMA_VERSION,
    CandidateList,
    EngineCandidate,
    EngineHit,
    EngineResult,
    ErrorResult,
    FaceInfo,
    FusedCandidate,
    ImageRef,
    InlineImage,
    ObjectImage,
    ProbeRequest,
    ResultMessage,
    parse_result,
)

__all__ = [
    "INVESTIGATIVE_LEAD_NOTICE",
    "SCHEMA_VERSION",
    "CandidateList",
    "CaseContext",
    "EngineCandidate",
    "EngineHit",
    "EngineResult",
    "ErrorResult",
    "FaceInfo",
    "FusedCandidate",
    "ImageRef",
    "InlineImage",
    "Job",
    "ObjectImage",
    "ProbeRequest",
    "ResultMessage",
    "SearchedFace",
    "parse_result",
]
