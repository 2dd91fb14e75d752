"""Sharded engines in the pipeline's stages (workers.stages): embed once, scatter to every shard, merge.

The stages run on fakeredis with real HNSW indexes (one per shard, split by ``workers.shards.shard_of``
exactly as enrolment splits a gallery) and a stand-in engine whose vector the test chooses; the vectors
are synthetic (random unit vectors: fine for checking the decisions and the merge, not accuracy)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from quorum.broker import keys, liveness
from quorum.broker.app import TASK_FUSE, TASK_SHARD_SEARCH, shard_queue
from quorum.broker.jobs import load_job
from quorum.core.errors import Code
from quorum.schemas import CandidateList, EngineResult
from quorum.schemas.job import Job
from quorum.workers import stages
from quorum.workers.index import GalleryIndex
from quorum.workers.shards import shard_of
from quorum.workers.stages import StageContext
from tests.unit.test_stages import DIM, StandInEngine, StandInReplica, World, _unit

SHARDS = 3
ENGINES = ("sface", "e2")  # sface is sharded in 3; e2 is not


class ShardedWorld(World):
    def __init__(self, n: int = 90) -> None:
        super().__init__(shards={"sface": SHARDS})
        rng = np.random.default_rng(7)
        self.subjects = [f"p{i:03d}" for i in range(n)]
        self.vectors = np.stack([_unit(rng.normal(size=DIM)) for _ in range(n)])
        # One index over the whole gallery, and the same gallery split into shards as enrolment splits it.
        self.whole = GalleryIndex(DIM, capacity=256)
        self.whole.add(list(range(n)), self.subjects, self.vectors)
        self.shard_replicas: dict[int, StandInReplica] = {}
        for sh in range(SHARDS):
            idx = GalleryIndex(DIM, capacity=256)
            mine = [i for i, s in enumerate(self.subjects) if shard_of(s, SHARDS) == sh]
            idx.add(mine, [self.subjects[i] for i in mine], self.vectors[mine])
            rep = StandInReplica(idx)
            rep.engine_version = "sface-v1"  # type: ignore[attr-defined]
            self.shard_replicas[sh] = rep
        self.engines["sface"] = StandInEngine("sface", vector=_unit(rng.normal(size=DIM)))
        self.replicas["sface"] = StandInReplica(self.whole)

    def replica(self, name: str, shard: int = 0) -> Any:
        if name == "sface":
            return self.shard_replicas[shard]
        return self.replicas[name]

    def ctx(self) -> StageContext:
        base = super().ctx()
        return StageContext(
            redis=base.redis,
            settings=base.settings,
            load_image=base.load_image,
            detect=base.detect,
            engine=base.engine,
            replica=self.replica,
            now=base.now,
            record_result=base.record_result,
        )

    def prepared(self) -> Job:
        job = self.job(engines=ENGINES)
        stages.prepare(self.ctx(), request_id=job.request_id)
        loaded = load_job(self.redis, job.request_id)
        assert loaded is not None and loaded.face is not None
        return loaded

    def shard(self, job: Job, sh: int) -> stages.StageResult:
        return stages.shard_search(self.ctx(), request_id=job.request_id, engine="sface", shard=sh, shards=SHARDS)


@pytest.fixture
def w() -> ShardedWorld:
    return ShardedWorld()


def test_the_shards_hold_the_gallery_between_them():
    w = ShardedWorld()
    sizes = [len(w.shard_replicas[s].index) for s in range(SHARDS)]
    assert sum(sizes) == len(w.subjects) and all(sizes)


def test_a_sharded_engine_embeds_once_and_scatters_the_vector_to_every_shard(w):
    job = w.prepared()
    res = stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    assert res.status == "scattered" and res.engine_result is None
    assert [(m.task, m.kwargs, m.queue, m.task_id) for m in res.send] == [
        (
            TASK_SHARD_SEARCH,
            {"request_id": job.request_id, "engine": "sface", "shard": i, "shards": SHARDS},
            shard_queue("sface", i, SHARDS),
            f"{job.request_id}.sface.{i}of{SHARDS}",
        )
        for i in range(SHARDS)
    ]
    assert w.redis.exists(keys.job_vector_key(job.request_id, "sface"))
    assert not w.redis.hexists(keys.job_results_key(job.request_id), "sface")
    # A redelivered embed step does not embed again and sends only to shards that have not answered.
    w.shard(job, 1)
    again = stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    assert w.engines["sface"].calls == 1
    assert [m.kwargs["shard"] for m in again.send] == [0, 2]


def test_the_merged_list_equals_one_index_over_the_whole_gallery(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    assert w.shard(job, 0).status == "answered"
    assert w.shard(job, 2).status == "answered"
    last = w.shard(job, 1)
    assert last.status == "merged"
    merged = last.engine_result
    assert merged is not None and merged.status == "ok"
    assert merged.shards == SHARDS and merged.shards_answered == [0, 1, 2]
    whole = w.whole.search(w.engines["sface"].vector, stages.engine_list_length(job))
    assert [(c.subject_id, c.score) for c in merged.candidates] == [(h.subject_id, round(h.score, 6)) for h in whole]
    assert [c.rank for c in merged.candidates] == list(range(1, len(whole) + 1))
    assert merged.gallery_size == len(w.subjects)
    # The merged result is what fusion reads; the first engine in starts the fusion deadline.
    stored = EngineResult.model_validate_json(w.redis.hget(keys.job_results_key(job.request_id), "sface"))
    assert stored == merged
    assert [(m.task, m.kwargs["final"]) for m in last.send] == [(TASK_FUSE, True)]


def test_a_redelivered_shard_search_does_not_search_again_and_a_late_shard_changes_nothing(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    w.shard(job, 0)
    w.shard(job, 0)
    assert w.shard_replicas[0].synced == 1
    w.shard(job, 1)
    w.shard(job, 2)
    before = w.redis.hget(keys.job_results_key(job.request_id), "sface")
    late = w.shard(job, 2)
    assert late.status == "late" and late.send == ()
    assert w.redis.hget(keys.job_results_key(job.request_id), "sface") == before


def test_fusion_after_every_shard_and_engine_is_not_degraded(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    for sh in range(SHARDS):
        w.shard(job, sh)
    last = stages.search(w.ctx(), request_id=job.request_id, engine="e2")
    assert [(m.task, m.kwargs["final"]) for m in last.send] == [(TASK_FUSE, False)]
    res = stages.fuse(w.ctx(), request_id=job.request_id)
    cl = res.published
    assert isinstance(cl, CandidateList) and not cl.degraded and cl.engines_partial == {}
    assert cl.engines_contributed == sorted(ENGINES)


def test_a_shard_with_no_live_worker_makes_the_list_partial_and_says_which_shards_answered(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    w.shard(job, 0)
    w.shard(job, 1)
    stages.search(w.ctx(), request_id=job.request_id, engine="e2")
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True)  # the deadline; shard 2 has no worker
    cl = res.published
    assert isinstance(cl, CandidateList)
    assert cl.degraded and cl.engines_partial == {"sface": [0, 1]} and cl.engines_failed == {}
    stored = EngineResult.model_validate_json(w.redis.hget(keys.job_results_key(job.request_id), "sface"))
    absent = {s for s in w.subjects if shard_of(s, SHARDS) == 2}
    assert stored.shards_answered == [0, 1] and not absent & {c.subject_id for c in stored.candidates}
    assert all(sj not in absent for c in cl.candidates for sj in [c.subject_id] if "sface" in c.engines)


def test_a_missing_shard_with_a_live_worker_gets_another_deadline_and_a_lost_search_is_sent_again(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    w.shard(job, 0)
    w.shard(job, 1)
    stages.search(w.ctx(), request_id=job.request_id, engine="e2")
    liveness.heartbeat(w.redis, keys.shard_alive("sface", 2, SHARDS), "node-1", ttl_s=12)
    w.redis.rpush(shard_queue("sface", 2, SHARDS), b"another probe's search")  # busy
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert res.status == "extended" and res.detail == {"waiting_for": ["sface[2/3]"], "redriven": []}
    w.redis.delete(shard_queue("sface", 2, SHARDS))  # queue empty, no answer: the message was lost
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert res.status == "extended"
    redriven = [m for m in res.send if m.task == TASK_SHARD_SEARCH]
    assert [(m.kwargs["shard"], m.queue) for m in redriven] == [(2, shard_queue("sface", 2, SHARDS))]
    # Past the search timeout fusion goes without it, partial.
    w.clock += w.settings.search_timeout_s
    cl = stages.fuse(w.ctx(), request_id=job.request_id, final=True).published
    assert isinstance(cl, CandidateList) and cl.engines_partial == {"sface": [0, 1]}


def test_a_failed_embed_is_the_engines_error_and_scatters_nothing(w):
    job = w.prepared()
    w.engines["sface"].fail = RuntimeError("cuda fell over")
    res = stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    assert res.send == () or all(m.task == TASK_FUSE for m in res.send)
    assert res.engine_result is not None and res.engine_result.error_code == Code.ENGINE_FAILED.value
    assert not w.redis.exists(keys.job_vector_key(job.request_id, "sface"))


def test_an_empty_sharded_gallery_is_gallery_empty_and_an_empty_shard_is_not(w):
    job = w.prepared()
    w.shard_replicas[1] = StandInReplica(GalleryIndex(DIM))
    w.shard_replicas[1].engine_version = "sface-v1"  # type: ignore[attr-defined]
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    for sh in range(SHARDS):
        res = w.shard(job, sh)
    assert res.engine_result is not None and res.engine_result.status == "ok"
    assert res.engine_result.shards_answered == [0, 1, 2]

    job2 = w.prepared()
    for sh in range(SHARDS):
        w.shard_replicas[sh] = StandInReplica(GalleryIndex(DIM))
        w.shard_replicas[sh].engine_version = "sface-v1"  # type: ignore[attr-defined]
    stages.search(w.ctx(), request_id=job2.request_id, engine="sface")
    for sh in range(SHARDS):
        res = w.shard(job2, sh)
    assert res.engine_result is not None and res.engine_result.error_code == Code.GALLERY_EMPTY.value


def test_a_shard_holding_another_engine_version_answers_with_an_error_not_a_wrong_list(w):
    job = w.prepared()
    w.shard_replicas[0].engine_version = "sface-v0"  # type: ignore[attr-defined]
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    for sh in range(SHARDS):
        res = w.shard(job, sh)
    assert res.engine_result is not None and res.engine_result.shards_answered == [1, 2]


def test_snapshot_sends_each_shard_its_own_snapshot_and_a_shard_worker_writes_it(w):
    saved: list[tuple[str, int]] = []

    class Snap:
        def __init__(self, name: str, shard: int) -> None:
            self.name, self.shard = name, shard

        def save_snapshot(self) -> dict:
            saved.append((self.name, self.shard))
            return {"engine": self.name, "shard": self.shard}

    ctx = w.ctx()
    ctx = StageContext(**{**ctx.__dict__, "replica": lambda name, shard=0: Snap(name, shard)})
    res = stages.snapshot(ctx, engines=["sface", "dlib"])
    assert saved == [("dlib", 0)]  # the gallery worker never loads a sharded gallery
    assert [(m.kwargs, m.queue) for m in res.send] == [
        ({"engines": ["sface"], "shard": i}, shard_queue("sface", i, SHARDS)) for i in range(SHARDS)
    ]
    assert res.detail["sent"] == [m.task_id for m in res.send]
    for m in res.send:
        stages.snapshot(ctx, **m.kwargs)
    assert saved[1:] == [("sface", 0), ("sface", 1), ("sface", 2)]
