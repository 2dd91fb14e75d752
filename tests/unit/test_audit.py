"""The audit chain on SQLite and on PostgreSQL: appends from many writers, verification, tampering
(edit, delete, reorder, rewrite) caught, anchors, queries."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from quorum.accountability import audit, db
from quorum.accountability.audit import AuditEvent, DiskAnchors
from tests.unit.accountability_db import eng, pg_database  # noqa: F401  (fixtures)


def _fill(eng, n=6):  # noqa: F811
    for i in range(n):
        audit.append(
            eng,
            AuditEvent(
                action=audit.SEARCH_SUBMITTED,
                outcome="accepted" if i % 2 else "refused",
                code="" if i % 2 else "OFFENCE_UNKNOWN",
                actor=f"u{i % 3}",
                agency="a" if i < 4 else "b",
                request_id=f"r{i}",
                case_number=f"C-{i % 2}",
                offence_code="PC211",
                purpose="criminal-investigation",
                probe_sha256="ab" * 32,
                details={"i": i, "ünï": "code"},
            ),
        )


def test_chain_links_and_verifies(eng):  # noqa: F811
    _fill(eng)
    rows = list(audit.rows(eng))
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["prev_hash"] == audit.GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    rep = audit.verify(eng)
    assert rep.ok and rep.records == 6 and rep.head_seq == 6, rep.summary()


def test_edit_is_caught(eng):  # noqa: F811
    _fill(eng)
    with eng.begin() as conn:
        conn.execute(text("UPDATE audit_log SET case_number = 'C-999' WHERE seq = 3"))
    rep = audit.verify(eng)
    assert not rep.ok and rep.first_bad_seq == 3 and "edited" in rep.problem


def test_delete_is_caught(eng):  # noqa: F811
    _fill(eng)
    with eng.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 4"))
    rep = audit.verify(eng)
    assert not rep.ok and rep.first_bad_seq == 4 and "missing" in rep.problem


def test_reorder_is_caught(eng):  # noqa: F811
    _fill(eng)
    with eng.begin() as conn:  # swap the seq of records 2 and 5
        conn.execute(text("UPDATE audit_log SET seq = -1 WHERE seq = 2"))
        conn.execute(text("UPDATE audit_log SET seq = 2 WHERE seq = 5"))
        conn.execute(text("UPDATE audit_log SET seq = 5 WHERE seq = -1"))
    rep = audit.verify(eng)
    assert not rep.ok and rep.first_bad_seq == 2


def test_rewritten_chain_is_caught_by_its_anchors(eng, tmp_path):  # noqa: F811
    anchors = DiskAnchors(tmp_path / "objects")
    _fill(eng, 4)
    assert audit.anchor(eng, anchors)["seq"] == 4
    assert audit.anchor(eng, anchors)["seq"] == 5  # the anchoring record itself is anchored next time
    assert audit.verify(eng, anchors).anchors_checked == 2
    # Rewrite record 2 and recompute every hash after it: the chain alone looks fine ...
    rows = list(audit.rows(eng))
    rows[1]["purpose"] = "something innocent"
    prev = rows[0]["hash"]
    with eng.begin() as conn:
        for r in rows[1:]:
            r["prev_hash"] = prev
            r["hash"] = prev = audit.record_hash(r)
            conn.execute(
                db.audit_log.update()
                .where(db.audit_log.c.seq == r["seq"])
                .values(purpose=r["purpose"], prev_hash=r["prev_hash"], hash=r["hash"])
            )
    assert audit.verify(eng).ok
    rep = audit.verify(eng, anchors)  # ... but not against the anchors
    assert not rep.ok and rep.first_bad_seq == 4 and "rewritten" in rep.problem
    # Truncation past an anchor is caught too.
    with eng.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq >= 5"))
    assert not audit.verify(eng, anchors).ok


def test_disk_anchors_are_write_once(tmp_path):
    anchors = DiskAnchors(tmp_path)
    assert anchors.put(audit.anchor_key(7), b'{"seq":7}')
    assert not anchors.put(audit.anchor_key(7), b'{"seq":7,"hash":"forged"}')
    path = tmp_path / audit.anchor_key(7)
    assert (path.read_bytes() == b'{"seq":7}' and not os.access(path, os.W_OK)) or os.geteuid() == 0
    assert oct(path.stat().st_mode & 0o777) == "0o444"


def _writer(url: str, n: int, who: str) -> None:
    db.dispose_all()
    engine = db.get_engine(url)
    for i in range(n):
        audit.append(engine, AuditEvent(action="test.concurrent", outcome="ok", actor=who, details={"i": i}))


def test_concurrent_writers_in_several_processes_never_fork_the_chain(eng):  # noqa: F811
    url = eng.url.render_as_string(hide_password=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, 25, f"w{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rep = audit.verify(eng)
    assert rep.ok and rep.records == 100, rep.summary()


def test_query_filters(eng):  # noqa: F811
    _fill(eng)
    assert [r["request_id"] for r in audit.query(eng, agency="b")] == ["r4", "r5"]
    assert [r["seq"] for r in audit.query(eng, actor="u0")] == [1, 4]
    assert len(audit.query(eng, case_number="C-1")) == 3
    assert len(audit.query(eng, action="search.*")) == 6
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert len(audit.query(eng, since=tomorrow)) == 0
    assert len(audit.query(eng, until=tomorrow, limit=2)) == 2
    assert audit.is_known_probe(eng, "ab" * 32) and not audit.is_known_probe(eng, "cd" * 32)


def test_an_unreachable_database_is_audit_unavailable():
    from quorum.core.errors import Code, ServiceError

    bad = db.get_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", migrate=False)
    with pytest.raises(ServiceError) as exc:
        audit.append(bad, AuditEvent(action="x", outcome="ok"))
    assert exc.value.code == Code.AUDIT_UNAVAILABLE and exc.value.retryable
    db.dispose_all()


# ---- completeness: the head kept outside the database (accountability.audit_head) --------------------------


def _head_of(eng, seq=None):  # noqa: F811
    """The outside head as a writer would have left it at ``seq`` (default: the last record)."""
    from quorum.accountability.audit_head import Head

    recs = list(audit.rows(eng))
    r = recs[-1] if seq is None else next(x for x in recs if int(x["seq"]) == seq)
    return Head(int(r["seq"]), r["hash"], r["ts"])


def _checked(eng, before, after=None):  # noqa: F811
    rep = audit.verify_rows(audit.rows(eng))
    audit.check_head(rep, before)
    audit.confirm_later(rep, after)
    return rep


def test_the_outside_head_catches_the_newest_records_deleted(eng):  # noqa: F811
    _fill(eng)
    head = _head_of(eng)
    assert _checked(eng, head).complete
    with eng.begin() as conn:  # the last two records deleted: the chain that remains is intact
        conn.execute(text("DELETE FROM audit_log WHERE seq > 4"))
    assert audit.verify(eng).ok
    rep = _checked(eng, head)
    assert not rep.ok and "newest records were deleted" in rep.problem and rep.first_bad_seq == 5


def test_the_outside_head_catches_a_tail_rewritten_and_rehashed(eng):  # noqa: F811
    """Records after the last anchor rewritten with a recomputed chain: the chain verifies, the head does not."""
    _fill(eng)
    head = _head_of(eng)
    recs = list(audit.rows(eng))
    with eng.begin() as conn:
        prev = recs[2]["hash"]
        for r in recs[3:]:
            r = {**r, "actor": "someone-else", "prev_hash": prev}
            r["hash"] = audit.record_hash(r)
            conn.execute(
                text("UPDATE audit_log SET actor = :a, prev_hash = :p, hash = :h WHERE seq = :s"),
                {"a": r["actor"], "p": r["prev_hash"], "h": r["hash"], "s": r["seq"]},
            )
            prev = r["hash"]
    assert audit.verify(eng).ok
    rep = _checked(eng, head)
    assert not rep.ok and "re-hashed" in rep.problem


def test_records_the_head_does_not_confirm_are_reported_not_hidden(eng):  # noqa: F811
    _fill(eng)
    rep = _checked(eng, _head_of(eng, seq=4))  # records 5 and 6 written while Redis was away
    assert rep.ok and not rep.complete and rep.confirmed_seq == 4
    assert "UNCONFIRMED" in rep.summary() and "since seq 5" in rep.summary()
    # A writer that moved the head while verify read the records confirms them.
    assert _checked(eng, _head_of(eng, seq=4), _head_of(eng)).complete
    rep = _checked(eng, None)  # no head at all (lost, never written)
    assert rep.ok and not rep.complete and rep.confirmed_seq == 0
