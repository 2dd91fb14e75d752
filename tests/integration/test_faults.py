"""Fault injection on real processes: SIGKILL an engine worker, the fusion worker, the intake worker
and the gateway while probes are in flight, and count what comes back.

Each scenario submits a burst of real ci probes (real faces, real engines, real Redis, supervised
worker processes), kills one process with SIGKILL shortly after, and waits. It reports sent /
answered / candidate lists / degraded / errors by code / lost, and asserts lost = 0: every probe is
answered although a process died holding its work. The local stack's supervisor restarts the
killed process; a task the dead worker had taken comes back on its queue after the visibility
timeout (20 s here, 120 s by default); the fusion deadline and the search backstop are Redis timers
(``broker.deadlines``), not messages held in a worker's memory; a restarted gateway takes back the
entries it had read. The figures are printed (``-s``) and recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from quorum.schemas import CandidateList
from tests.integration.conftest import own_stack
from tests.unit.accountability_db import pg_database  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

VISIBILITY_S = 20
BURST = 12


@pytest.fixture(scope="module")
def pg(pg_database):  # noqa: F811
    """The stack's registry and audit database on the local PostgreSQL (as a deployment runs it), and an
    admin connection that can take it away."""
    import psycopg

    from tests.unit.accountability_db import PG_BASE

    name = pg_database.rsplit("/", 1)[1]
    admin = psycopg.connect(
        PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres", autocommit=True, connect_timeout=5
    )
    yield pg_database, name, admin
    admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    admin.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, data_dir, pg):
    """A stack of its own (its processes get killed): short visibility timeout and fusion deadline."""
    with own_stack(
        tmp_path_factory.mktemp("faults"),
        data_dir,
        agency="fault-agency",
        gallery=40,
        database_url=pg[0],
        task_visibility_timeout_s=VISIBILITY_S,
        fusion_deadline_s=10.0,
        search_timeout_s=300.0,
    ) as own:
        assert len(own.probes) >= BURST
        yield own.stack, own.client, own.probes, own.redis_server, own.s


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _work_waiting(st, client, role: str, rids: list[str]) -> bool:
    """Whether work for ``role`` is queued up behind the frozen process (so killing it loses some)."""
    import redis as redis_lib

    from quorum.broker import keys

    r = redis_lib.Redis.from_url(st.s.redis_url)
    if role == "gateway":
        # The gateway reads its streams with a non-blocking script (broker.intake.IntakeReader), so a
        # stopped gateway has no read in flight: the burst waits unread in the stream (the group's lag),
        # or, if the stop caught it mid-batch, read and not acknowledged (pending). Either way the
        # killed gateway's successor must answer every entry.
        stream = keys.intake_stream(client.agency_id)
        group = next(g for g in r.xinfo_groups(stream) if g["name"] in (keys.INTAKE_GROUP, keys.INTAKE_GROUP.encode()))
        return (group["pending"] + (group.get("lag") or 0)) >= BURST - 2
    if role == "fusion":
        return all(r.hlen(keys.job_results_key(rid)) == 3 for rid in rids)
    queue = "intake" if role == "intake" else f"engine.{role}"
    return r.llen(queue) >= BURST - 2


def _taken_by(st, role: str) -> bool:
    """Whether the engine worker ``role`` holds a search it took and has not acknowledged (kombu's Redis
    transport keeps such messages in its ``unacked`` hash with their routing key)."""
    import json

    import redis as redis_lib

    from quorum.workers.gateway import UNACKED_HASH

    r = redis_lib.Redis.from_url(st.s.redis_url)
    return any(json.loads(v)[2] == f"engine.{role}" for v in r.hvals(UNACKED_HASH))


def _burst_and_kill(stack, role: str, *, freeze: bool, timeout: float = 240.0) -> dict:
    """Submit a burst and SIGKILL ``role``: mid-work (an engine holding searches it has taken), or ``freeze``: stopped
    (SIGSTOP) before the burst so that messages pile up for it (for a Celery worker one of them handed
    to its socket by Redis and never read), then killed."""
    st, client, probes, *_ = stack
    pidfile = st._pidfile(role)
    victim = int(pidfile.read_text())
    if freeze:
        os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    rids = [
        client.submit(p, case_number="F-1", offence_code="PC211", purpose="investigation", candidates=10)
        for p in probes[:BURST]
    ]
    try:
        if freeze:
            _wait(lambda: _work_waiting(st, client, role, rids), 60, f"work queued for the frozen {role}")
        else:
            _wait(lambda: _taken_by(st, role), 60, f"{role} to take a search")
    finally:
        os.kill(victim, signal.SIGKILL)  # never left stopped: the supervisor brings a new one for the next test
    answers: dict = {}
    try:
        answers = client.wait_all(rids, timeout=timeout)
    except TimeoutError:
        answers = {r: a for r in rids if (a := client.result(r)) is not None}
    elapsed = time.monotonic() - t0
    lists = [a for a in answers.values() if isinstance(a, CandidateList)]
    report = {
        "killed": role,
        "how": "frozen, then killed" if freeze else "killed holding searches it had taken",
        "sent": len(rids),
        "answered": len(answers),
        "candidate_lists": len(lists),
        "degraded": sum(a.degraded for a in lists),
        "errors": dict(Counter(a.code for a in answers.values() if not isinstance(a, CandidateList))),
        "lost": len(rids) - len(answers),
        "last_answer_s": round(elapsed, 1),
    }
    print(f"\nfault: {report}")
    # The supervisor brought the role back (a new process).
    _wait(lambda: (pid := st._alive(pidfile)) and pid != victim, 60, f"{role} to be restarted")
    return report


@pytest.mark.parametrize(
    ("role", "freeze"),
    [
        # the slowest default engine, mid-work: its taken searches return after the visibility timeout
        ("facenet", False),
        ("facenet", True),
        ("fusion", True),
        ("intake", True),
        ("gateway", True),
    ],
    ids=["engine-busy", "engine-frozen", "fusion-frozen", "intake-frozen", "gateway-frozen"],
)
def test_a_killed_process_loses_no_probe(stack, role, freeze):
    report = _burst_and_kill(stack, role, freeze=freeze)
    assert report["lost"] == 0, report
    # A killed process is restarted and its work redelivered: every probe gets a full candidate list.
    assert report["candidate_lists"] == report["sent"], report
    assert report["degraded"] == 0, report


@pytest.mark.parametrize("how", ["shutdown-nosave", "kill-9"])
def test_a_redis_restart_with_probes_in_flight_loses_no_probe(stack, how):
    """Redis goes away 1 s into a burst and comes back 3 s later (its AOF, fsynced every second, is
    what survives). The services reconnect by themselves; the client, waiting through the outage,
    submits again what Redis no longer knows (``QuorumClient.resubmit_lost``)."""
    import threading

    _, client, probes, redis_server, _ = stack
    t0 = time.monotonic()
    rids = [
        client.submit(p, case_number="F-2", offence_code="PC211", purpose="investigation", candidates=10)
        for p in probes[:BURST]
    ]
    box: dict = {}

    def wait() -> None:
        try:
            box["answers"] = client.wait_all(rids, timeout=240)
        except TimeoutError as exc:
            box["timeout"] = str(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(1.0)
    if how == "kill-9":
        redis_server.kill()
    else:
        redis_server.stop()
    redis_server.wait_down()
    time.sleep(3.0)
    redis_server.start()
    waiter.join(300)
    answers = box.get("answers") or {r: a for r in rids if (a := client.result(r)) is not None}
    lists = [a for a in answers.values() if isinstance(a, CandidateList)]
    report = {
        "redis": how,
        "sent": len(rids),
        "answered": len(answers),
        "candidate_lists": len(lists),
        "degraded": sum(a.degraded for a in lists),
        "errors": dict(Counter(a.code for a in answers.values() if not isinstance(a, CandidateList))),
        "resubmitted_by_client": sum(client.resubmitted.get(r, 0) for r in rids),
        "lost": len(rids) - len(answers),
        "last_answer_s": round(time.monotonic() - t0, 1),
    }
    print(f"\nfault: {report}")
    assert "timeout" not in box, (box, report)
    assert report["lost"] == 0, report
    assert report["candidate_lists"] == report["sent"], report


def test_the_audit_database_away_holds_answers_back_and_loses_none(stack, pg):
    """PostgreSQL refuses the stack's database for 20 s while a burst is in flight (connections cut,
    new ones refused). No answer may reach the agency without its audit record: while the database is
    away nothing is published; afterwards every probe is answered, each with exactly one audit record."""
    import redis as redis_lib
    from sqlalchemy import func, select

    from quorum.accountability import audit, db
    from quorum.broker import keys

    _, client, probes, _, s = stack
    _, name, admin = pg
    r = redis_lib.Redis.from_url(s.redis_url)
    t0 = time.monotonic()
    rids = [
        client.submit(p, case_number="F-3", offence_code="PC211", purpose="investigation", candidates=10)
        for p in probes[:8]
    ]
    # Once every probe is admitted (audited and claimed), take the database away.
    _wait(lambda: all(r.exists(keys.request_key(client.agency_id, rid)) for rid in rids), 60, "admission")
    admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    answered_before = sum(bool(r.exists(keys.result_key(client.agency_id, rid))) for rid in rids)
    time.sleep(20)
    answered_during = sum(bool(r.exists(keys.result_key(client.agency_id, rid))) for rid in rids) - answered_before
    admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    answers = client.wait_all(rids, timeout=180)
    db.dispose_all()
    eng = db.get_engine(s)
    log_t = db.audit_log
    with eng.connect() as conn:
        counts = dict(
            conn.execute(
                select(log_t.c.request_id, func.count())
                .where(log_t.c.request_id.in_(rids), log_t.c.action == audit.SEARCH_RESULT)
                .group_by(log_t.c.request_id)
            ).all()
        )
    report = {
        "audit_db": "away 20 s",
        "sent": len(rids),
        "answered_before_outage": answered_before,
        "published_during_outage": answered_during,
        "answered": len(answers),
        "candidate_lists": sum(isinstance(a, CandidateList) for a in answers.values()),
        "audit_records_per_request": sorted(set(counts.values())),
        "lost": len(rids) - len(answers),
        "last_answer_s": round(time.monotonic() - t0, 1),
    }
    print(f"\nfault: {report}")
    assert answered_before < len(rids), report  # the outage caught answers in flight
    assert answered_during == 0, report  # held back: nothing out without its audit record
    assert report["lost"] == 0 and report["candidate_lists"] == len(rids), report
    assert counts == {rid: 1 for rid in rids}, report
    assert audit.verify(eng).ok


def _pid_gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    except OSError:
        return True


def test_a_fusion_stuck_on_a_held_audit_lock_is_ended_by_its_watchdog_and_loses_no_probe(stack, pg):
    """A transaction somewhere holds the audit database's write lock and never ends: the fusion
    worker's answers block on it (a real hang, not a crash). Its watchdog (``workers.watchdog``) ends
    the worker once a task has run past the time limit (15 s here: 3/4 of the 20 s visibility timeout);
    the supervisor restarts it, the messages come back after the visibility timeout, and once the lock
    is released every probe is answered, none published before its audit record."""
    import psycopg
    import redis as redis_lib

    from quorum.accountability.db import WRITE_LOCK_KEY
    from quorum.broker import keys
    from quorum.broker.app import TASK_FUSE

    st, client, probes, _, s = stack
    r = redis_lib.Redis.from_url(s.redis_url)
    limit = s.task_time_limit
    assert limit == 15.0
    before = int(r.hget(keys.TASK_OVERRUNS, TASK_FUSE) or 0)
    pidfile = st._pidfile("fusion")
    victim = int(pidfile.read_text())
    os.kill(victim, signal.SIGSTOP)  # so that fuse tasks are queued for it when the lock is taken
    t0 = time.monotonic()
    rids = [
        client.submit(p, case_number="F-4", offence_code="PC211", purpose="investigation", candidates=10)
        for p in probes[:6]
    ]
    _wait(lambda: _work_waiting(st, client, "fusion", rids), 60, "every engine to answer")
    holder = psycopg.connect(pg[0].replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK_KEY,))
        os.kill(victim, signal.SIGCONT)
        _wait(lambda: _pid_gone(victim), limit + 30, "the watchdog to end the stuck fusion worker")
        ended_after_s = round(time.monotonic() - t0, 1)
        _wait(lambda: (pid := st._alive(pidfile)) and pid != victim, 60, "fusion to be restarted")
        published_while_locked = sum(bool(r.exists(keys.result_key(client.agency_id, rid))) for rid in rids)
    finally:
        holder.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK_KEY,))
        holder.close()
    answers = client.wait_all(rids, timeout=180)
    log_text = (st.log_dir / "fusion-0.log").read_text(errors="replace")
    report = {
        "fault": "audit write lock held, fusion stuck",
        "sent": len(rids),
        "worker_ended_after_s": ended_after_s,
        "published_while_locked": published_while_locked,
        "answered": len(answers),
        "candidate_lists": sum(isinstance(a, CandidateList) for a in answers.values()),
        "overruns_recorded": int(r.hget(keys.TASK_OVERRUNS, TASK_FUSE) or 0) - before,
        "lost": len(rids) - len(answers),
        "last_answer_s": round(time.monotonic() - t0, 1),
    }
    print(f"\nfault: {report}")
    assert "task.time_limit_exceeded" in log_text, report
    assert report["overruns_recorded"] >= 1, report
    assert published_while_locked == 0, report  # no answer without its audit record
    assert report["lost"] == 0 and report["candidate_lists"] == len(rids), report
