"""Settings, read once from the environment and an optional TOML file.

Precedence: environment variable ``QUORUM_<NAME>`` (or ``QUORUM_<NAME>_FILE``, naming a file that holds
the value: compose secrets) > the file named by ``QUORUM_SETTINGS`` (TOML,
top-level keys are the lower-case field names) > the embedded defaults below, which run everything
on this machine alone (a local redis-server started by ``quorum up``, the object store on disk).
Values passed to :func:`load_settings` (or to ``Settings(...)``) override all three.

``Settings`` is a frozen pydantic-settings model: values are validated when read (``engines`` against
the engine registry, ``device`` against auto/cpu/gpu), and a key that names no setting, in the file
or among the overrides, is refused rather than silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .engines import DEFAULT_ENGINES, ENGINE_NAMES

ENV_PREFIX = "QUORUM_"
SETTINGS_FILE_VAR = "QUORUM_SETTINGS"  # names the TOML file; not itself a setting

# The environment a load reads: os.environ unless load_settings(env=...) names another mapping.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("quorum_settings_environ", default=None)


def _environ() -> Mapping[str, str]:
    env = _ENVIRON.get()
    return os.environ if env is None else env


def _default_home() -> str:
    return str(Path(os.environ.get("QUORUM_HOME", Path.cwd() / ".quorum")).resolve())


FILE_SUFFIX = "_FILE"


def _read_secret_file(var: str, path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{var} names {path!r}, which cannot be read: {exc.strerror or exc}") from exc
    return text.rstrip("\r\n")


def _with_secret_files(environ: Mapping[str, str], fields: Iterable[str]) -> dict[str, str]:
    """``QUORUM_<NAME>_FILE=/run/secrets/x`` sets ``<name>`` to that file's content (one trailing newline
    dropped), for every setting ``<name>`` that is not itself a ``*_file`` setting: the docker/compose
    secrets convention, so that credentials (``QUORUM_REDIS_URL``, ``QUORUM_S3_SECRET_KEY``,
    ``QUORUM_DATABASE_URL``, ...) never sit in a container's environment. Giving both the variable and
    its ``_FILE`` form is refused (which one was meant?)."""
    names = {f.lower() for f in fields}
    env = {k.lower(): v for k, v in environ.items()}
    prefix, suffix = ENV_PREFIX.lower(), FILE_SUFFIX.lower()
    for key, path in list(env.items()):
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        name = key[len(prefix) : -len(suffix)]
        if name not in names or f"{name}{suffix}" in names:  # secrets_key_file, calibration_file: plain settings
            continue
        var = f"{ENV_PREFIX}{name.upper()}"
        if f"{prefix}{name}" in env:
            raise ValueError(f"both {var} and {var}{FILE_SUFFIX} are set: give one")
        env[f"{prefix}{name}"] = _read_secret_file(f"{var}{FILE_SUFFIX}", path)
    return env


class _MappingEnvSource(EnvSettingsSource):
    """``QUORUM_*`` variables from the mapping of the current load (os.environ by default), with
    ``QUORUM_<NAME>_FILE`` read from the file it names."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return _with_secret_files(_environ(), self.settings_cls.model_fields)


_NIST_TAG = r"^[12]\.[0-9]{3}$"  # a Type-1 or Type-2 field: 2.015
_NIST_TAG_OR_NONE = r"^([12]\.[0-9]{3})?$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", case_sensitive=False)

    home: str = Field(default_factory=_default_home)  # local state: embedded store, pids, logs
    redis_url: str = "redis://127.0.0.1:6390/0"  # broker, result backend, streams
    # The local stack's redis-server (``quorum up``): its memory limit (nothing is evicted; the alert
    # QuorumRedisMemoryHigh warns at 80 %) and the largest single value it accepts.
    redis_maxmemory: str = Field(default="2gb", pattern=r"^[0-9]+(kb|mb|gb)$")
    redis_max_bulk: str = Field(default="64mb", pattern=r"^[0-9]+(kb|mb|gb)$")
    # Object store: an S3 endpoint (host:port) selects the S3 store; empty selects the embedded disk store.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "quorum"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    # Names from core.engines; in the environment a comma-separated list ("sface,dlib").
    engines: Annotated[tuple[str, ...], NoDecode] = DEFAULT_ENGINES
    # "production" refuses engines whose weights are licensed for research only (core.engines) unless
    # named here ("all" accepts every one); "demo" (the default: quorum up, tests) runs them, logged.
    deployment: Literal["demo", "production"] = "demo"
    accept_research_licences: Annotated[tuple[str, ...], NoDecode] = ()
    # Gallery shards per engine (README "Scaling"): a subject lives in shard workers.shards.shard_of(id, S)
    # of its engine; the engine's embed workers scatter each probe's vector to every shard's queue.
    # In the environment "sface=4,dlib=2"; an engine not named has one shard (its workers hold it all).
    # Changing an engine's count moves subjects between shards: `quorum gallery reshard` (gallery.reshard) first.
    shards: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()  # (engine, count) pairs; hashable
    device: Literal["auto", "cpu", "gpu"] = "auto"  # execution provider for the onnxruntime engines
    # FaceNet runs as ONNX converted from its TF graph (workers/conversion/tf_to_onnx.py) on onnxruntime,
    # or on cv2.dnn as before (kept for comparison: same templates, BENCHMARKS.md "FaceNet on ONNX").
    facenet_runtime: Literal["onnx", "cv2"] = "onnx"
    models_dir: str = ""  # models converted at first load (FaceNet's ONNX); empty: <home>/models
    # Micro-batching (workers.batching): an engine worker runs this many search tasks at once and
    # embeds their faces in shared model calls of at most this many faces; a face waits for others
    # only while another of the worker's tasks is still preparing one, and at most embed_batch_wait_ms.
    # 1: one task at a time, one face per call (Celery's solo pool). BENCHMARKS.md "Micro-batching".
    embed_batch: int = Field(default=8, ge=1, le=256)
    embed_batch_wait_ms: float = Field(default=10.0, ge=0, le=1000)
    # FOR TESTS ONLY: appended to every engine's version ("<version>+<suffix>"), so a test can run an
    # "upgraded" engine (the same model under another version) and exercise `quorum gallery reindex`
    # with real embeddings. Never set it in a deployment: a real upgrade changes the version itself.
    engine_version_suffix: str = ""
    max_image_bytes: int = 15 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # ANSI/NIST-ITL transactions (core.nist; `quorum enroll --nist`, `quorum search FILE.eft`): the Type-1
    # or Type-2 fields that name the subject enrolled, the booking number kept with each image, and, for a
    # probe, the case number and offence used when the search does not give them ("": not read). The
    # booking date is each Type-10 record's 10.005 (photo date), else the transaction's 1.005.
    nist_subject_field: str = Field(default="2.015", pattern=_NIST_TAG)  # State Identification Number (SID)
    nist_booking_number_field: str = Field(default="1.009", pattern=_NIST_TAG_OR_NONE)  # TCN
    nist_case_field: str = Field(default="2.010", pattern=_NIST_TAG_OR_NONE)  # CIN (contributor case number)
    nist_offence_field: str = Field(default="", pattern=_NIST_TAG_OR_NONE)
    min_face_pixels: int = 20  # smaller boxes are refused as FACE_TOO_SMALL
    # The face detector (workers.detect.make_detector): YuNet (OpenCV), SCRFD-500M (InsightFace, on
    # onnxruntime), or YuNet with SCRFD asked only when YuNet finds no face. Every engine's templates are
    # computed from the detected face's landmarks: changing this changes templates of the images whose
    # face changes, so a gallery enrolled under one detector must be re-indexed (and the fusion
    # re-calibrated) after a switch: under scrfd every engine's version ends in /det-scrfd
    # (workers.engines.DETECTOR_VERSION_TAGS), so templates never mix. BENCHMARKS.md "Detectors: YuNet and SCRFD".
    detector: Literal["yunet", "scrfd", "yunet+scrfd"] = "yunet"
    default_candidates: int = 250
    # Once the first engine has answered, fusion waits at most this long for the others, then fuses
    # what arrived and marks the list degraded. Measured from the first answer, not from receipt, so
    # a backlog that delays every engine alike degrades nothing.
    fusion_deadline_s: float = 30.0
    search_timeout_s: float = 900.0  # from receipt: if no engine has answered by then, answer with an error
    # A task a killed worker had taken (acknowledged late) goes back on its queue this long after it
    # was delivered: longer than any task runs (engine search < 2 s, an enrolment chunk < 30 s on one
    # CPU core), short enough that a killed engine's searches run again well before the search timeout.
    task_visibility_timeout_s: int = 120
    # How long a probe-path or enrolment task may run in a worker (workers.watchdog): past it the worker
    # process exits (its supervisor restarts it) and the task's message returns after the visibility
    # timeout, so it must be shorter than that (a task still running would otherwise be handed to a
    # second worker). 0: three quarters of the visibility timeout. Celery's own time limits do nothing in
    # the solo and threads pools these workers run.
    task_time_limit_s: float = 0.0
    # An engine or shard search that ran past the limit this many times for one probe is not run again:
    # that engine is recorded as ENGINE_TIMEOUT and the list is fused without it.
    task_overrun_max: int = 2
    # The gateway's name in the intake consumer group (empty: host-pid). Entries a dead gateway had
    # read are taken back by the gateway of the same name when it starts, or claimed by any other
    # once idle for gateway_claim_idle_ms.
    gateway_consumer: str = ""
    gateway_claim_idle_ms: int = 60_000
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
    # How long Redis holds a published result (its key, its results-stream entry, the job's lists) for
    # delivery; after it only the request-id claim stays (idempotency), and the result is read from the
    # object store (results/<agency>/<request id>.json) until result_ttl_s.
    result_hold_s: int = Field(default=3600, ge=10)
    # Redis failover (broker/sentinel.py): an intake entry is acknowledged, and a result published, only
    # once this many replicas confirmed the writes before it (WAIT, at most redis_wait_timeout_ms; on a
    # timeout the work goes on, counted in quorum_redis_replication_wait_short_total). 0: no WAIT (one server).
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    # `quorum up` starts a Sentinel topology on loopback instead of one redis-server: the primary at the
    # configured port, a replica at port+1, three sentinels at port+2..+4 (core.local_redis).
    local_sentinel: bool = False
    redis_wait_timeout_ms: int = Field(default=1000, ge=10, le=60_000)
    metrics_port: int = 0  # 0: no HTTP exporter in this process
    data_dir: str = ""  # labelled faces for the demo; default ../shared/data next to the repo
    log_level: str = "INFO"
    log_json: bool = False
    # The local stack's process logs (<home>/logs): rotated by its supervisor past this size, this many kept.
    log_max_bytes: int = Field(default=50 * 1024 * 1024, ge=64 * 1024)
    log_backups: int = Field(default=3, ge=1, le=100)
    # Accountability (see README "Accountability"): registry + audit database, signatures, retention.
    database_url: str = ""  # empty: SQLite at <home>/quorum.db; else e.g. postgresql+psycopg://u@host/db
    # The gateway reads at most this many entries of one agency's stream before it reads the others'
    # again: one agency's backlog delays another's search by at most this many of its entries.
    gateway_reads_per_agency: int = Field(default=1, ge=1, le=100)
    signature_window_s: int = 300  # a submission's timestamp must be within this of the gateway's clock
    probe_retention_days: int = 90  # `quorum probes purge` deletes older probe images unless a case holds them
    audit_anchor_interval_s: float = 600.0  # the gateway anchors the audit chain head this often (0: never)
    audit_anchor_retention_days: int = 2555  # S3 object-lock (COMPLIANCE) retention of each anchor
    # Agency signing secrets are sealed in the database with the key(s) in this file, kept outside it
    # (one Fernet key a line, newest first). Empty: <directory of the SQLite database>/secrets.key, or
    # <home>/secrets.key, created on first use. Deployments point every service at the same file.
    secrets_key_file: str = ""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = set(data) - set(cls.model_fields)
            if unknown:
                raise ValueError(f"unknown settings: {sorted(unknown)}")
        return data

    @field_validator("accept_research_licences", mode="before")
    @classmethod
    def _split_accepted(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw

    @field_validator("shards", mode="before")
    @classmethod
    def _parse_shards(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            out: dict[str, Any] = {}
            for part in (p.strip() for p in raw.split(",")):
                if not part:
                    continue
                name, sep, count = part.partition("=")
                if not sep or not count.strip().isdigit():
                    raise ValueError(f"shards: {part!r} is not ENGINE=COUNT (e.g. sface=4,dlib=2)")
                out[name.strip()] = int(count)
            raw = out
        if isinstance(raw, dict):
            return tuple(sorted(raw.items()))
        return raw

    @field_validator("shards")
    @classmethod
    def _check_shards(cls, shards: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        names = [name for name, _ in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"shards: an engine is named twice: {', '.join(names)}")
        for name, count in shards:
            if name not in ENGINE_NAMES:
                raise ValueError(f"shards: unknown engine {name!r}; known engines: {', '.join(ENGINE_NAMES)}")
            if not 1 <= count <= 1024:
                raise ValueError(f"shards: {name}={count} is outside 1..1024")
        return shards

    @model_validator(mode="after")
    def _time_limit_below_visibility(self) -> Settings:
        if self.task_time_limit_s and self.task_time_limit_s >= self.task_visibility_timeout_s:
            raise ValueError(
                f"task_time_limit_s ({self.task_time_limit_s:g}) must be shorter than task_visibility_timeout_s "
                f"({self.task_visibility_timeout_s}): a task still running would be handed to a second worker"
            )
        return self

    @property
    def task_time_limit(self) -> float:
        """The task time limit in force (``task_time_limit_s``, or 3/4 of the visibility timeout)."""
        return self.task_time_limit_s or 0.75 * self.task_visibility_timeout_s

    def shards_of(self, engine: str) -> int:
        """How many gallery shards ``engine`` is split into (1: not sharded)."""
        return dict(self.shards).get(engine, 1)

    @field_validator("engines", mode="before")
    @classmethod
    def _split_engines(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        return raw

    @field_validator("engines")
    @classmethod
    def _known_engines(cls, engines: tuple[str, ...]) -> tuple[str, ...]:
        if not engines:
            raise ValueError(f"name at least one engine; known engines: {', '.join(ENGINE_NAMES)}")
        unknown = [e for e in engines if e not in ENGINE_NAMES]
        if unknown:
            raise ValueError(
                f"unknown engine{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"known engines: {', '.join(ENGINE_NAMES)}"
            )
        if len(set(engines)) != len(engines):
            raise ValueError(f"an engine is named twice: {', '.join(engines)}")
        return engines

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides > ``QUORUM_*`` variables > the ``QUORUM_SETTINGS`` TOML file > defaults."""
        environ = _environ()
        sources: list[PydanticBaseSettingsSource] = [init_settings, _MappingEnvSource(settings_cls)]
        file = environ.get(SETTINGS_FILE_VAR)
        if file:
            if not Path(file).is_file():
                raise FileNotFoundError(f"{SETTINGS_FILE_VAR} names {file}, which is not a file")
            toml = TomlConfigSettingsSource(settings_cls, toml_file=Path(file))
            unknown = set(toml.toml_data) - set(settings_cls.model_fields)
            if unknown:
                raise ValueError(f"{file}: unknown settings: {sorted(unknown)}")
            sources.append(toml)
        return tuple(sources)

    @property
    def store_kind(self) -> str:
        return "s3" if self.s3_endpoint else "disk"

    def shared_data(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir)
        return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@contextmanager
def _reading(env: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(env)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from ``env`` (default: os.environ; a given mapping is used instead of it, not on top of
    it), the TOML file it names in ``QUORUM_SETTINGS``, and ``overrides`` above both.

    Raises ``ValueError`` (a pydantic ``ValidationError``) for a value that does not validate or a key
    that names no setting (in the file: a plain ``ValueError`` naming it), and ``FileNotFoundError`` when
    ``QUORUM_SETTINGS`` names no file.

    A ``redis_url`` without credentials that names the Redis this home's local stack started (while it
    runs) comes back with the credentials of that stack's ``admin`` user (:mod:`core.local_redis`).
    """
    with _reading(dict(env) if env is not None else None):
        s = Settings(**overrides)  # type: ignore[arg-type]
    # The local stack's own Redis admits no one without credentials (core.local_redis): a URL without any
    # that names the server this home's stack started logs in as its admin user (cli.main logs that).
    from . import local_redis

    admin_url = local_redis.local_credentials(s.home, s.redis_url)
    return s.model_copy(update={"redis_url": admin_url}) if admin_url else s


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings (read once)."""
    return load_settings()
