"""Resharding through the real stack: SFace's gallery from 2 shards to 4 (``quorum gallery reshard``) on a
stack of its own (its redis-server, Celery worker processes, one worker per shard), real faces from the
ci split, with searches running during the build.

- the reshard begins, then an enrolment and an expunge happen (written to both layouts), then the
  build runs from the CLI while searches keep being answered, whole, by the old layout;
- after the switch (the stack restarted with QUORUM_SHARDS=sface=4, four shard workers) every probe's
  candidate list is exactly what it was on 2 shards: same subjects, ranks and scores (the same templates,
  merged exactly), with the new subject found and the expunged one absent;
- ``--finish`` deletes the old layout's logs and snapshots; refusals (0 shards, the same count, an unknown
  engine, another count while one runs, a reindex during the reshard) change nothing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack, settings_env
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery import reshard
from quorum.gallery.enrol import enrol
from quorum.gallery.expunge import expunge
from quorum.schemas import CandidateList
from quorum.workers.shards import shard_of
from tests.integration.conftest import _stack

pytestmark = pytest.mark.integration

AGENCY, USER = "reshardpd", "reshardpd-inv"


def _cli(s, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", "gallery", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _lists(client: QuorumClient, probes) -> dict[str, list[tuple]]:
    """probe file name -> [(subject, sface rank, sface score)] of its candidate list."""
    ids = {
        client.submit(p.path, case_number="R-1", offence_code="PC211", purpose="investigation", candidates=40): p
        for p in probes
    }
    out = {}
    for rid, res in client.wait_all(list(ids), timeout=600).items():
        assert isinstance(res, CandidateList) and not res.degraded, res
        out[ids[rid].path.name] = [
            (c.subject_id, c.engines["sface"].rank, round(c.engines["sface"].score, 5)) for c in res.candidates
        ]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir):
    s, stack, redis_server = _stack(
        tmp_path_factory, "stack-reshard", engines=("sface",), shards={"sface": 2}, fusion_deadline_s=6.0
    )
    rows = read_split(data_dir / "ci")
    gallery = [r for r in rows if r.role == "gallery"][:30]
    report = enrol(
        s,
        open_store(s),
        [(r.identity, r.path) for r in gallery + [r for r in rows if r.role == "distractor_gallery"][:40]],
    )
    assert report.enrolled["sface"] == 70, report
    secret = registry.provision(
        db.get_engine(s), AGENCY, users={USER: "investigator"}, offences=("PC211",), purposes=("investigation",)
    )
    client = QuorumClient(s.redis_url, AGENCY, USER, secret)
    known = {r.identity for r in gallery}
    probes = [r for r in rows if r.role == "probe" and r.identity in known][:10]
    extra = [r for r in rows if r.role == "gallery"][30:31]  # enrolled during the reshard
    running = {"stack": stack}
    yield s, running, client, probes, extra, gallery, rows
    running["stack"].down()
    redis_server.stop()


def test_a_bad_reshard_is_refused_and_changes_nothing(world):
    s, *_ = world
    r = redis_lib.Redis.from_url(s.redis_url)
    for args, why in (
        (("sface", "--shards", "0"), "at least 1 shard"),
        (("sface", "--shards", "2"), "has 2 shard(s) already"),
        (("nosuch", "--shards", "4"), "not a configured engine"),
        (("sface",), "give --shards N"),
        (("sface", "--finish"), "no reshard in progress"),
    ):
        out = _cli(s, "reshard", *args)
        assert out.returncode != 0 and why in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not r.exists(keys.gallery_reshard("sface"))
    assert not any(r.exists(keys.gallery_log("sface", v, i, 4)) for v in _versions(r) for i in range(4))


def _versions(r) -> list[str]:
    return [keys.as_str(v) for v in r.hkeys(keys.gallery_versions("sface"))]


def test_two_to_four_shards_with_searches_running_keeps_every_list(world):
    s, running, client, probes, extra, gallery, rows = world
    r = redis_lib.Redis.from_url(s.redis_url)
    store = open_store(s)
    (version,) = _versions(r)
    reshard.begin(s, "sface", 4, actor="test-op")
    # While the reshard runs: an enrolment and an expunge, each written to both layouts.
    newcomer, leaver = extra[0].identity, gallery[5].identity
    assert enrol(s, store, [(newcomer, extra[0].path)]).enrolled["sface"] == 1
    expunge(s, store, leaver, reason="court order", actor="test-op")
    new_log = {sj: keys.gallery_log("sface", version, shard_of(sj, 4), 4) for sj in (newcomer, leaver)}
    ops = {sj: [(f[b"op"], keys.as_str(f[b"subject"])) for _, f in r.xrange(new_log[sj])] for sj in new_log}
    assert (b"add", newcomer) in ops[newcomer] and (b"remove", leaver) in ops[leaver]
    newcomer_probe = next(r_ for r_ in rows if r_.role == "probe" and r_.identity == newcomer)
    mates = [*probes, newcomer_probe]
    before = _lists(client, mates)
    assert before[newcomer_probe.path.name][0][0] == newcomer
    assert all(leaver not in [c[0] for c in v] for v in before.values())
    # Refused while it runs: another count, and a reindex.
    other = _cli(s, "reshard", "sface", "--shards", "8")
    assert other.returncode != 0 and "2 -> 4 is in progress" in other.stderr, other.stderr
    reindexing = _cli(s, "reindex", "sface")
    assert reindexing.returncode != 0 and "being resharded" in reindexing.stderr, reindexing.stderr
    # The build, from the CLI (it resumes the reshard begun above), with searches running meanwhile.
    answered: list = []
    stop = threading.Event()

    def searching() -> None:
        while not stop.is_set():
            answered.append(_lists(client, probes[:2]))

    t = threading.Thread(target=searching)
    t.start()
    try:
        out = _cli(s, "reshard", "sface", "--shards", "4")
    finally:
        stop.set()
        t.join(600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 -> 4 shards built" in out.stdout and "quorum gallery reshard sface --finish" in out.stdout
    changed = [(k, before[k], v) for a in answered for k, v in a.items() if v != before[k]]
    assert answered and not changed, changed[:1]  # the old layout served, whole
    # --finish before the switch is refused: the workers still run 2 shards.
    early = _cli(s, "reshard", "sface", "--finish")
    assert early.returncode != 0 and "switch the workers to 4" in early.stderr, early.stderr
    # The switch: every worker restarted with QUORUM_SHARDS=sface=4.
    running["stack"].down()
    s4 = s.model_copy(update={"shards": (("sface", 4),)})
    running["stack"] = Stack(s4)
    running["stack"].up(timeout=300)
    after = _lists(client, mates)
    assert after == before
    # Finish: the old layout goes; writes go to the new one only.
    t0 = time.monotonic()
    done = _cli(s4, "reshard", "sface", "--finish")
    assert done.returncode == 0, done.stderr
    assert not r.exists(keys.gallery_reshard("sface"))
    assert not any(r.exists(keys.gallery_log("sface", version, i, 2)) for i in range(2))
    assert not [k for i in range(2) for k in store.list(f"gallery/sface/{keys.version_slug(version)}/shard-{i}of2/")]
    assert all(store.size(f"gallery/sface/{keys.version_slug(version)}/shard-{i}of4/latest.json") for i in range(4))
    assert time.monotonic() - t0 < 120
    assert _lists(client, probes) == {k: before[k] for k in (p.path.name for p in probes)}
