"""Settings, read once from the environment and an optional TOML file.

Precedence: environment variable ``QUORUM_<NAME>`` > the file named by ``QUORUM_SETTINGS`` (TOML,
top-level keys are the lower-case field names) > the embedded defaults below, which run everything
on this machine alone (a local redis-server started by ``quorum up``, the object store on disk).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ENGINE_NAMES: tuple[str, ...] = ("sface", "dlib", "facenet")


def _default_home() -> str:
    return str(Path(os.environ.get("QUORUM_HOME", Path.cwd() / ".quorum")).resolve())


@dataclass(frozen=True)
class Settings:
    home: str = field(default_factory=_default_home)  # local state: embedded store, pids, logs
    redis_url: str = "redis://127.0.0.1:6390/0"  # broker, result backend, streams
    # Object store: an S3 endpoint (host:port) selects the S3 store; empty selects the embedded disk store.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "quorum"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    engines: tuple[str, ...] = ENGINE_NAMES
    device: str = "auto"  # auto | cpu | gpu: execution provider for the ONNX engine
    max_image_bytes: int = 15 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    min_face_pixels: int = 20  # smaller boxes are refused as FACE_TOO_SMALL
    default_candidates: int = 250
    # Once the first engine has answered, fusion waits at most this long for the others, then fuses
    # what arrived and marks the list degraded. Measured from the first answer, not from receipt, so
    # a backlog that delays every engine alike degrades nothing.
    fusion_deadline_s: float = 30.0
    search_timeout_s: float = 900.0  # from receipt: if no engine has answered by then, answer with an error
    # auto: the method the calibration file measured best (see BENCHMARKS.md); any of
    # workers.fusion.METHODS names one. Calibrated methods fall back to zsum if the calibration
    # does not match the running engines' versions.
    fusion_method: str = "auto"
    calibration_file: str = ""  # empty: the calibration shipped with the package
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 1000  # bench/index_scale.py: recall@250 0.88 at 400, 0.99 at 1000 (100k, +3 ms)
    gallery_capacity: int = 100_000  # initial; the index grows in steps as needed
    result_ttl_s: int = 7 * 24 * 3600
    metrics_port: int = 0  # 0: no HTTP exporter in this process
    data_dir: str = ""  # labelled faces for the demo; default ../shared/data next to the repo
    log_level: str = "INFO"
    log_json: bool = False
    # Accountability (see README "Accountability"): registry + audit database, signatures, retention.
    database_url: str = ""  # empty: SQLite at <home>/quorum.db; else e.g. postgresql+psycopg://u@host/db
    signature_window_s: int = 300  # a submission's timestamp must be within this of the gateway's clock
    probe_retention_days: int = 90  # `quorum probes purge` deletes older probe images unless a case holds them
    audit_anchor_interval_s: float = 600.0  # the gateway anchors the audit chain head this often (0: never)
    audit_anchor_retention_days: int = 2555  # S3 object-lock (COMPLIANCE) retention of each anchor

    @property
    def store_kind(self) -> str:
        return "s3" if self.s3_endpoint else "disk"

    def shared_data(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir)
        return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _coerce(kind: type, raw: object) -> object:
    if kind is bool or kind == "bool":
        if isinstance(raw, bool):
            return raw
        return str(raw).strip().lower() in {"1", "true", "yes", "on"}
    if kind is int or kind == "int":
        return int(raw)  # type: ignore[arg-type]
    if kind is float or kind == "float":
        return float(raw)  # type: ignore[arg-type]
    if kind == "tuple[str, ...]":
        if isinstance(raw, (list, tuple)):
            return tuple(str(x) for x in raw)
        return tuple(x.strip() for x in str(raw).split(",") if x.strip())
    return str(raw)


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {}
    file = env.get("QUORUM_SETTINGS")
    if file:
        with open(file, "rb") as fh:
            values.update(tomllib.load(fh))
    for f in dataclasses.fields(Settings):
        key = "QUORUM_" + f.name.upper()
        if key in env:
            values[f.name] = env[key]
    values.update(overrides)
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    return Settings(**{k: _coerce(known[k].type, v) for k, v in values.items()})


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings (read once)."""
    return load_settings()
