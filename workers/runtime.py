"""What one worker process holds: settings, connections, the detector, its engine and its replica.

Created lazily and once per process, so tasks stay thin (fetch inputs, call pure functions, publish)
and a worker pays for model loading and gallery catch-up at start, not per probe.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from functools import cached_property

import redis as redis_lib
import structlog

from ..broker.redis_errors import connect
from ..core.config import Settings, settings

log = structlog.get_logger()


class Runtime:
    def __init__(self, s: Settings | None = None) -> None:
        self.settings = s or settings()
        self.role: str | None = None
        self._engines: dict = {}
        self._replicas: dict = {}
        self._batchers: dict = {}
        self._batchers_lock = threading.Lock()
        self.batching = False  # set by an engine worker that runs tasks in threads (workers.serve)

    @cached_property
    def redis(self) -> redis_lib.Redis:
        return connect(self.settings.redis_url, health_check_interval=30)

    @cached_property
    def store(self):
        from ..core.objectstore import open_store

        return open_store(self.settings)

    @cached_property
    def detector(self):
        from .detect import make_detector

        return make_detector(self.settings.detector, self.settings.device)

    @cached_property
    def calibration(self):
        """Score normalisation and fusion models fitted by ``quorum calibrate`` (None if unavailable)."""
        from .fusion import load_calibration

        return load_calibration(self.settings.calibration_file)

    def load_image(self, key: str):
        """Fetch an image from the store and decode it, under the configured size limits (BGR array)."""
        from .images import decode_image

        s = self.settings
        data = self.store.get(key, max_bytes=s.max_image_bytes)
        return decode_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def context(self):
        """The stage context (``workers.stages.StageContext``) over this process's lazily loaded parts."""
        from ..accountability import audit
        from ..broker.results import archive
        from .stages import StageContext

        return StageContext(
            redis=self.redis,
            settings=self.settings,
            load_image=self.load_image,
            detect=lambda image: self.detector.detect(image),
            engine=self.engine,
            replica=self.replica,
            calibration=lambda: self.calibration,
            record_result=lambda job, result, engines: audit.record_result(self.settings, job, result, engines=engines),
            embed=self.embed if self.batching else None,
            archive=lambda result: archive(self.store, result),
        )

    def batcher(self, name: str):
        """The engine's micro-batcher (workers.batching): the one thread that calls its model."""
        with self._batchers_lock:
            if name not in self._batchers:
                from ..core import metrics
                from .batching import MicroBatcher

                engine = self.engine(name)

                def observe(b) -> None:
                    metrics.EMBED_BATCH_FACES.labels(name).observe(b.faces)
                    metrics.EMBED_BATCH_WAIT.labels(name).observe(b.waited_s)

                self._batchers[name] = MicroBatcher(
                    engine.embed_batch,
                    max_batch=self.settings.embed_batch,
                    max_wait_s=self.settings.embed_batch_wait_ms / 1000,
                    name=name,
                    on_batch=observe,
                )
            return self._batchers[name]

    def embed(self, name: str, items):
        return self.batcher(name).submit(items)

    def embedding_slot(self, name: str):
        """Held by a search task while it runs, so a batch waits for its face (workers.batching)."""
        return self.batcher(name).slot() if self.batching else nullcontext()

    def engine(self, name: str):
        if name not in self._engines:
            from .engines import get_engine

            self._engines[name] = get_engine(name, device=self.settings.device, s=self.settings)
        return self._engines[name]

    def identity(self, name: str) -> tuple[str, int]:
        """(version, dimension) of an engine: from its model when this process loaded it, else without
        loading it (a shard worker never loads the model: ``workers.engines.engine_identity``)."""
        if name in self._engines:
            eng = self._engines[name]
            return eng.version, eng.dim
        from .engines import engine_identity

        return engine_identity(name, self.settings)

    def replica(self, name: str, shard: int = 0):
        """This process's replica of an engine's gallery (or of one shard of it, when the engine is
        sharded: ``settings.shards``): snapshot loaded, log applied."""
        if (name, shard) not in self._replicas:
            from .replica import GalleryReplica

            s = self.settings
            shards = s.shards_of(name)
            if not 0 <= shard < shards:
                raise ValueError(f"{name} has {shards} shard(s); there is no shard {shard}")
            version, dim = self.identity(name)
            rep = GalleryReplica.for_settings(s, name, version, dim, self.redis, self.store, shard=shard, shards=shards)
            rep.load_snapshot()
            applied = rep.sync()
            log.info("gallery.replica_ready", engine=rep.name, templates=len(rep.index), log_entries_applied=applied)
            self._replicas[(name, shard)] = rep
        return self._replicas[(name, shard)]


runtime = Runtime()
