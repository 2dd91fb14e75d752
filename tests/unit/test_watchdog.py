"""The task watchdog (workers.watchdog): which tasks it bounds, when one is overdue, what it records
before it ends the process, and the stages' rule that a search which overran too often is not run again.

Real threads; fakeredis and stand-in engines (tests/unit/test_stages.py) for the pure decisions. A real
worker process killed by its watchdog is exercised in tests/integration/test_task_time_limit.py."""

from __future__ import annotations

import threading

import fakeredis
import pytest

from quorum.broker import keys
from quorum.broker.app import TASK_FUSE, TASK_SEARCH, TASK_SHARD_SEARCH, TASK_SNAPSHOT
from quorum.core.config import load_settings
from quorum.core.errors import Code
from quorum.schemas import CandidateList
from quorum.workers import stages, watchdog
from tests.unit.test_sharded_stages import ShardedWorld
from tests.unit.test_stages import World


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_only_bounded_tasks_are_watched_and_a_task_is_overdue_only_past_the_limit():
    clock = Clock()
    dog = watchdog.TaskWatchdog(10.0, clock=clock)
    dog.started("t1", TASK_SEARCH, {"request_id": "r1", "engine": "sface"})
    dog.started("t2", TASK_SNAPSHOT, {"engine": "sface"})  # a snapshot may take long: not bounded
    clock.t += 10.0
    assert dog.overdue() == []
    clock.t += 0.5
    (late,) = dog.overdue()
    assert (late.task_id, late.request_id, late.part) == ("t1", "r1", f"{TASK_SEARCH}:sface")
    dog.finished("t1")
    assert dog.overdue() == [] and dog.running() == []


def test_the_overrun_part_names_the_engine_and_shard_of_a_search_only():
    assert watchdog.describe(TASK_SHARD_SEARCH, {"request_id": "r", "engine": "sface", "shard": 2, "shards": 4}) == (
        "r",
        f"{TASK_SHARD_SEARCH}:sface:2",
    )
    assert watchdog.describe(TASK_FUSE, {"request_id": "r", "final": True}) == ("r", TASK_FUSE)
    assert watchdog.describe("quorum.gallery.enroll", {"engine": "sface", "items": []}) == (None, None)


def test_an_overdue_task_is_recorded_and_the_process_ended():
    r = fakeredis.FakeRedis()
    clock = Clock()
    dog = watchdog.TaskWatchdog(5.0, clock=clock)
    dog.started("t1", TASK_SEARCH, {"request_id": "r1", "engine": "facenet"})
    dog.started("t2", TASK_FUSE, {"request_id": "r2"})
    exits: list[int] = []
    stop = threading.Event()
    kwargs = {"ttl_s": 60, "stop": stop, "every_s": 0.01, "exit_process": exits.append}
    t = threading.Thread(target=watchdog.watch, args=(dog, r), kwargs=kwargs)
    t.start()
    threading.Event().wait(0.1)
    assert exits == []  # nothing overdue yet: the loop keeps watching
    clock.t += 6.0
    t.join(5)
    assert not t.is_alive() and exits == [watchdog.EXIT_OVERRUN]
    assert watchdog.overruns(r, "r1", f"{TASK_SEARCH}:facenet") == 1
    assert watchdog.overruns(r, "r2", TASK_FUSE) == 1
    assert 0 < r.ttl(keys.job_overruns_key("r1")) <= 60
    assert {k.decode(): int(v) for k, v in r.hgetall(keys.TASK_OVERRUNS).items()} == {TASK_SEARCH: 1, TASK_FUSE: 1}


def test_the_time_limit_defaults_below_the_visibility_timeout_and_may_not_reach_it():
    assert load_settings(env={}).task_time_limit == 90.0
    assert load_settings(env={}, task_visibility_timeout_s=20).task_time_limit == 15.0
    assert load_settings(env={}, task_time_limit_s=30).task_time_limit == 30.0
    with pytest.raises(ValueError, match="shorter than task_visibility_timeout_s"):
        load_settings(env={}, task_time_limit_s=120)


def test_a_search_that_overran_too_often_is_not_run_again_and_the_list_is_fused_without_it():
    w = World(task_overrun_max=2)
    job = w.prepared()
    part = keys.overrun_part(TASK_SEARCH, "e2")
    w.redis.hset(keys.job_overruns_key(job.request_id), part, 1)
    once = stages.search(w.ctx(), request_id=job.request_id, engine="e2")  # one overrun: runs again
    assert once.status == "done" and w.engines["e2"].calls == 1
    job = w.prepared()
    w.redis.hset(keys.job_overruns_key(job.request_id), part, 2)
    res = stages.search(w.ctx(), request_id=job.request_id, engine="e2")
    assert res.status == "gave_up" and w.engines["e2"].calls == 1  # not embedded again
    assert res.engine_result is not None and res.engine_result.error_code == Code.ENGINE_TIMEOUT.value
    assert "ran past the task time limit" in (res.engine_result.error_message or "")
    stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    fused = stages.fuse(w.ctx(), request_id=job.request_id)
    assert isinstance(fused.published, CandidateList)
    assert fused.published.degraded and fused.published.engines_failed == {"e2": Code.ENGINE_TIMEOUT.value}


def test_a_shard_search_that_overran_too_often_answers_for_its_shard_without_searching():
    w = ShardedWorld()
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="sface")
    w.redis.hset(keys.job_overruns_key(job.request_id), keys.overrun_part(TASK_SHARD_SEARCH, "sface", 1), 2)
    for sh in range(3):
        res = w.shard(job, sh)
    assert w.shard_replicas[1].synced == 0 and w.shard_replicas[0].synced == 1  # shard 1 was not searched
    assert res.engine_result is not None and res.engine_result.shards_answered == [0, 2]
