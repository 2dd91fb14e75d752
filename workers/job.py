"""The state of one search in flight, kept in a Redis hash while its stages run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from broker import keys


@dataclass
class Job:
    request_id: str
    agency_id: str
    user_id: str
    case_number: str
    offence_code: str
    purpose: str
    image_key: str
    probe_sha256: str
    candidates: int
    face_index: int | None
    engines: list[str]
    received_at: float  # epoch seconds, at the gateway
    stream_entry_id: str
    face: dict | None = None  # Face.to_dict() plus index / faces_found / chosen_by, set by intake
    extra: dict = field(default_factory=dict)

    def save(self, redis, ttl_s: int) -> None:
        redis.set(keys.job_key(self.request_id), json.dumps(asdict(self)), ex=ttl_s)

    @classmethod
    def load(cls, redis, request_id: str) -> Job | None:
        raw = redis.get(keys.job_key(request_id))
        return cls(**json.loads(raw)) if raw else None
