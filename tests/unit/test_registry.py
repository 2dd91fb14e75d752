"""Registry, dispositions, case holds, probe retention and the usage report, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest

from quorum.accountability import audit, db, dispositions, registry, report, retention
from quorum.accountability.audit import AuditEvent
from quorum.core.errors import Code, InputError
from quorum.core.objectstore import DiskStore, put_content
from tests.unit.accountability_db import eng, pg_database  # noqa: F401  (fixtures)

FAR = date(2099, 1, 1)


def test_migrations_are_idempotent_and_seed_purposes(eng):  # noqa: F811
    db.upgrade(eng)
    assert db.current_revision(eng) == "0002"
    import sqlalchemy as sa

    indexes = {i["name"] for i in sa.inspect(eng).get_indexes("audit_log")}
    assert "ix_audit_log_request_action" in indexes  # 0002: results are audited once per request
    snap = registry.snapshot(eng)
    assert snap.purposes["criminal-investigation"] is True
    for refused in ("general-identification", "non-member-request", "live-scanning", "crowd-scanning"):
        assert snap.purposes[refused] is False


def test_every_registry_change_is_audited_and_bumps_the_version(eng):  # noqa: F811
    v0 = registry.version(eng)
    creds = registry.add_agency(eng, "lasd", "LA Sheriff", daily_quota=5, actor="op1")
    assert len(creds.secret) == 64 and registry.agency_secret(eng, "lasd") == creds.secret
    registry.add_user(eng, "inv1", "lasd", "investigator", cert_id="T-1", cert_expires=FAR, actor="op1")
    registry.certify_user(eng, "inv1", "T-2", FAR, actor="op1")
    registry.add_offence(eng, "PC211", "robbery", actor="op1")
    registry.set_purpose(eng, "missing-person", False, actor="op1")
    registry.set_agency_status(eng, "lasd", "suspended", actor="op1", reason="audit finding")
    registry.set_user_active(eng, "inv1", False, actor="op1")
    assert registry.version(eng) == v0 + 7
    actions = [r["action"] for r in audit.query(eng, action="registry.*")]
    assert actions == [
        "registry.agency.add",
        "registry.user.add",
        "registry.user.certify",
        "registry.offence.add",
        "registry.purpose.set",
        "registry.agency.suspend",
        "registry.user.deactivate",
    ]
    assert all(r["actor"] == "op1" for r in audit.query(eng, action="registry.*"))
    assert creds.secret not in str(audit.query(eng))  # secrets never reach the trail
    snap = registry.snapshot(eng)
    assert snap.agencies["lasd"].status == "suspended" and snap.agencies["lasd"].daily_quota == 5
    assert snap.users["inv1"].cert_id == "T-2" and not snap.users["inv1"].active
    assert audit.verify(eng).ok


def test_registry_refuses_nonsense(eng):  # noqa: F811
    registry.add_agency(eng, "a", "A")
    with pytest.raises(InputError):
        registry.add_agency(eng, "a", "again")
    with pytest.raises(InputError) as exc:
        registry.add_user(eng, "u", "nowhere", "investigator")
    assert exc.value.code == Code.UNKNOWN_AGENCY
    with pytest.raises(InputError) as exc:
        registry.add_user(eng, "u", "a", "wizard")
    assert exc.value.code == Code.ROLE_NOT_ALLOWED


def test_snapshot_cache_reloads_only_on_change(eng):  # noqa: F811
    cache = registry.SnapshotCache(eng)
    first = cache.get()
    assert cache.get() is first
    registry.add_agency(eng, "b", "B")
    assert "b" in cache.get().agencies and cache.secret("b")


def test_redis_acl_confines_each_agency(eng):  # noqa: F811
    registry.add_agency(eng, "a", "A")
    registry.add_agency(eng, "b", "B")
    registry.set_agency_status(eng, "b", "suspended")
    acl = registry.render_redis_acl(eng)
    line_a = next(x for x in acl.splitlines() if x.startswith("user agency-a "))
    assert " on #" in line_a and "%W~quorum:intake:a " in line_a and "%R~quorum:results:a " in line_a
    assert "%R~quorum:result:a:*" in line_a and "-@all +xadd +xread +get" in line_a
    assert next(x for x in acl.splitlines() if x.startswith("user agency-b ")).split()[2] == "off"


def test_redis_acl_applied_live_as_setuser_commands(eng):  # noqa: F811
    """`quorum registry redis-acl --apply`: each agency line becomes ACL SETUSER <user> reset <rules>, the
    selector kept as one argument; the default user is never touched."""
    registry.add_agency(eng, "a", "A")
    sent: list[tuple] = []

    class Recorder:  # records the commands a Redis client would send
        def execute_command(self, *args):
            sent.append(args)

    assert registry.apply_redis_acl(eng, Recorder()) == ["agency-a"]
    (cmd,) = [c for c in sent if c[:2] == ("ACL", "SETUSER")]
    assert [c for c in sent if c[:2] != ("ACL", "SETUSER")] == [("ACL", "USERS")]  # agency users Redis has
    assert cmd[:4] == ("ACL", "SETUSER", "agency-a", "reset")
    assert cmd[-1] == "(%R~quorum:intake:a +xrange)" and "-@all" in cmd and "+xadd" in cmd
    assert registry.acl_rules("user x on ( %R~k +get ) +ping") == ["user", "x", "on", "( %R~k +get )", "+ping"]


def _search(eng, rid, agency="a", case="C-1", outcome="ok", sha="ab" * 32, ts=None):  # noqa: F811
    audit.append(
        eng,
        AuditEvent(
            action=audit.SEARCH_SUBMITTED,
            outcome="accepted",
            agency=agency,
            actor="inv",
            request_id=rid,
            case_number=case,
            offence_code="PC211",
            purpose="criminal-investigation",
            probe_sha256=sha,
        ),
        now=ts,
    )
    audit.append(
        eng,
        AuditEvent(
            action=audit.SEARCH_RESULT,
            outcome=outcome,
            agency=agency,
            actor="inv",
            request_id=rid,
            case_number=case,
            offence_code="PC211",
            purpose="criminal-investigation",
            probe_sha256=sha,
        ),
        now=ts,
    )


def _agency_with_users(eng):  # noqa: F811
    registry.add_agency(eng, "a", "A")
    registry.add_agency(eng, "b", "B")
    for uid, agency, role, exp in (
        ("inv", "a", "investigator", FAR),
        ("sup", "a", "supervisor", FAR),
        ("aud", "a", "auditor", FAR),
        ("old", "a", "investigator", date(2020, 1, 1)),
        ("binv", "b", "investigator", FAR),
    ):
        registry.add_user(eng, uid, agency, role, cert_id=f"T-{uid}", cert_expires=exp)


def test_dispositions_and_the_second_look(eng):  # noqa: F811
    _agency_with_users(eng)
    _search(eng, "r1")
    _search(eng, "r2")
    d = dispositions.record(eng, "r2", "no_lead", "inv")
    assert d.status == "final"
    lead = dispositions.record(eng, "r1", "lead_pursued", "inv", candidate="subject-7")
    assert lead.status == "pending"
    refusals = [
        (lambda: dispositions.record(eng, "r1", "lead_pursued", "inv"), Code.DISPOSITION_REFUSED),  # no candidate
        (lambda: dispositions.record(eng, "nope", "no_lead", "inv"), Code.DISPOSITION_REFUSED),
        (lambda: dispositions.record(eng, "r1", "guess", "inv"), Code.DISPOSITION_REFUSED),
        (lambda: dispositions.record(eng, "r1", "no_lead", "binv"), Code.USER_OTHER_AGENCY),
        (lambda: dispositions.confirm(eng, lead.id, "inv"), Code.SECOND_PERSON_REQUIRED),  # same user
        (lambda: dispositions.confirm(eng, lead.id, "aud"), Code.ROLE_NOT_ALLOWED),
        (lambda: dispositions.confirm(eng, lead.id, "old"), Code.CERTIFICATE_EXPIRED),
        # Another agency's lead is answered as one that does not exist (its ids tell that agency nothing).
        (lambda: dispositions.confirm(eng, lead.id, "binv"), Code.DISPOSITION_REFUSED),
        (lambda: dispositions.confirm(eng, lead.id + 1000, "binv"), Code.DISPOSITION_REFUSED),
    ]
    for fn, code in refusals:
        with pytest.raises(InputError) as exc:
            fn()
        assert exc.value.code == code
    done = dispositions.confirm(eng, lead.id, "sup")
    assert done.status == "confirmed" and done.confirmed_by == "sup"
    with pytest.raises(InputError):
        dispositions.confirm(eng, lead.id, "sup")  # once only
    trail = audit.query(eng, action="disposition.*")
    assert sum(r["outcome"] == "refused" for r in trail) == len(refusals) + 1
    assert [r["outcome"] for r in trail if r["outcome"] != "refused"] == ["final", "pending", "confirmed"]
    assert audit.verify(eng).ok


def test_one_operator_cannot_record_and_confirm_a_lead_under_two_names(eng):  # noqa: F811
    """The CLI acts as its operator for the users it names: the two-person rule counts people at the
    keyboard, not user ids typed."""
    _agency_with_users(eng)
    _search(eng, "r1")
    lead = dispositions.record(eng, "r1", "lead_pursued", "inv", candidate="s-1", actor="cli:op1@h", via="cli")
    with pytest.raises(InputError) as exc:
        dispositions.confirm(eng, lead.id, "sup", actor="cli:op1@h", via="cli")
    assert exc.value.code == Code.SECOND_PERSON_REQUIRED
    done = dispositions.confirm(eng, lead.id, "sup", actor="cli:op2@h", via="cli")
    assert done.status == "confirmed" and done.confirmed_by == "sup"
    recorded, refused, confirmed = (r for r in audit.query(eng, action="disposition.*") if r["request_id"] == "r1")
    assert (recorded["actor"], json.loads(recorded["details"])["on_behalf_of"]) == ("cli:op1@h", "inv")
    assert (refused["outcome"], refused["code"]) == ("refused", "SECOND_PERSON_REQUIRED")
    assert (confirmed["actor"], json.loads(confirmed["details"])["on_behalf_of"]) == ("cli:op2@h", "sup")
    assert audit.verify(eng).ok


def test_a_candidate_not_on_the_sheet_is_refused_and_audited(eng):  # noqa: F811
    _agency_with_users(eng)
    _search(eng, "r1")
    with pytest.raises(InputError) as exc:
        dispositions.record(eng, "r1", "lead_pursued", "inv", candidate="s-9", shown={"s-1": 1})
    assert exc.value.code == Code.DISPOSITION_REFUSED
    assert dispositions.record(eng, "r1", "lead_pursued", "inv", candidate="s-1", shown={"s-1": 1}).status == "pending"
    assert [r["outcome"] for r in audit.query(eng, action=audit.DISPOSITION_RECORDED)] == ["refused", "pending"]


def test_verify_checks_the_dispositions_table_against_its_audit_records(eng):  # noqa: F811
    """The usage report counts the dispositions table: a row edited, added or deleted there is caught."""
    from sqlalchemy import delete, insert, update

    _agency_with_users(eng)
    _search(eng, "r1")
    lead = dispositions.record(eng, "r1", "lead_pursued", "inv", candidate="s-1")
    dispositions.confirm(eng, lead.id, "sup")
    dispositions.record(eng, "r1", "no_lead", "inv")
    rep = audit.verify(eng)
    assert rep.ok and rep.dispositions_checked == 2, rep.summary()
    t = db.dispositions
    with eng.begin() as conn:
        conn.execute(update(t).where(t.c.id == lead.id).values(candidate="s-2"))
    rep = audit.verify(eng)
    assert not rep.ok and "candidate" in rep.problem and "edited" in rep.problem
    with eng.begin() as conn:
        conn.execute(update(t).where(t.c.id == lead.id).values(candidate="s-1"))
        row = dict(conn.execute(t.select().where(t.c.id == lead.id)).first()._mapping)
        conn.execute(insert(t).values(**{**row, "id": lead.id + 100}))
    rep = audit.verify(eng)
    assert not rep.ok and "written outside Quorum" in rep.problem
    with eng.begin() as conn:
        conn.execute(delete(t).where(t.c.id.in_([lead.id, lead.id + 100])))
    rep = audit.verify(eng)
    assert not rep.ok and "missing from the table" in rep.problem


def test_verify_flags_a_result_without_an_audited_submission(eng):  # noqa: F811
    """A search.result whose request never had an accepted search.submitted: searched off the books."""
    _search(eng, "r1")
    assert audit.verify(eng).ok
    audit.append(eng, AuditEvent(action=audit.SEARCH_RESULT, outcome="ok", agency="a", actor="inv", request_id="r9"))
    rep = audit.verify(eng)
    assert not rep.ok and "r9" in rep.problem and "no accepted search.submitted" in rep.problem


def test_usage_report_counts_what_happened(eng):  # noqa: F811
    _agency_with_users(eng)
    then = datetime(2025, 6, 1, tzinfo=UTC)
    _search(eng, "old", ts=then)  # outside the period
    _search(eng, "r1")
    _search(eng, "r2", outcome="degraded")
    _search(eng, "r3", agency="b")
    _search(eng, "r3", agency="b")  # submitted again under its id after a Redis loss: one search
    audit.append(
        eng,
        AuditEvent(
            action=audit.SEARCH_SUBMITTED,
            outcome="refused",
            code="PURPOSE_NOT_ALLOWED",
            agency="a",
            purpose="crowd-scanning",
            offence_code="PC211",
        ),
    )
    dispositions.record(eng, "r1", "no_lead", "inv")
    today = datetime.now(UTC).date()
    rep = report.usage(eng, today.isoformat(), (today + timedelta(days=1)).isoformat())
    assert rep.by(0) == {"a": 3, "b": 1}
    assert rep.by(1, accepted_only=True) == {"criminal-investigation": 3}
    assert rep.searches[("a", "crowd-scanning", "PC211", "refused:PURPOSE_NOT_ALLOWED")] == 1
    assert rep.results == {("a", "ok"): 1, ("a", "degraded"): 1, ("b", "ok"): 1}
    assert rep.dispositions == {("a", "no_lead", "final"): 1}
    md, csv_text = report.to_markdown(rep), report.to_csv(rep)
    assert "| a | 3 | 2 | 1 | 1 | 1 | 0 |" in md and "INVESTIGATIVE LEAD ONLY" in md
    assert "search,a,crowd-scanning,PC211,refused:PURPOSE_NOT_ALLOWED,1" in csv_text.splitlines()
    assert "disposition,a,,,no_lead/final,1" in csv_text.splitlines()


def test_probe_retention_respects_case_holds(eng, tmp_path):  # noqa: F811
    store = DiskStore(tmp_path / "objects")
    keys = {name: put_content(store, "probes", name.encode()) for name in ("old", "held", "fresh", "orphan")}
    sha = {n: k.rsplit("/", 1)[1] for n, k in keys.items()}
    long_ago = datetime.now(UTC) - timedelta(days=100)
    _search(eng, "r-old", case="C-1", sha=sha["old"], ts=long_ago)
    _search(eng, "r-held", case="C-2", sha=sha["held"], ts=long_ago)
    _search(eng, "r-fresh", case="C-3", sha=sha["fresh"])
    retention.hold(eng, "a", "C-2", reason="trial pending", actor="op")
    dry = retention.purge(eng, store, 90, dry_run=True)
    assert dry.deleted == [keys["old"]] and store.size(keys["old"]) is not None
    rep = retention.purge(eng, store, 90, actor="op")
    assert rep.deleted == [keys["old"]] and rep.held == [keys["held"]] and rep.kept == 1
    assert rep.unreferenced == [keys["orphan"]]
    assert store.size(keys["old"]) is None and store.size(keys["held"]) is not None
    purged = audit.query(eng, action=audit.PROBE_PURGED)
    assert [r["probe_sha256"] for r in purged] == [sha["old"]]
    retention.release(eng, "a", "C-2", reason="closed", actor="op")
    assert retention.purge(eng, store, 90).deleted == [keys["held"]]
    assert [r["action"] for r in audit.query(eng, action="case.*")] == ["case.hold", "case.release"]


def test_kept_answers_are_purged_past_the_result_ttl(eng, tmp_path):  # noqa: F811
    store = DiskStore(tmp_path / "objects")
    long_ago = datetime.now(UTC) - timedelta(days=10)
    _search(eng, "r-old", ts=long_ago)
    _search(eng, "r-new")
    for rid in ("r-old", "r-new", "r-unaudited"):
        store.put(f"results/a/{rid}.json", b"{}")
    ttl = 7 * 86400
    dry = retention.purge_results(eng, store, ttl, dry_run=True)
    assert dry.deleted == ["results/a/r-old.json"] and store.size("results/a/r-old.json") is not None
    rep = retention.purge_results(eng, store, ttl)
    assert rep.deleted == ["results/a/r-old.json"] and rep.kept == 1
    assert rep.unanswered == ["results/a/r-unaudited.json"]
    assert store.size("results/a/r-old.json") is None and store.size("results/a/r-new.json") is not None
    # Another agency's answer of the same request id is its own.
    store.put("results/b/r-new.json", b"{}")
    assert retention.purge_results(eng, store, ttl).unanswered == ["results/a/r-unaudited.json", "results/b/r-new.json"]


# ---- signing secrets sealed at rest ------------------------------------------------------------------------


def _stored_secret(eng, agency: str) -> str:  # noqa: F811
    from sqlalchemy import select

    with eng.connect() as conn:
        return conn.execute(select(db.agencies.c.secret).where(db.agencies.c.id == agency)).scalar_one()


def test_secrets_are_sealed_in_the_database_and_rotate(eng, tmp_path, monkeypatch):  # noqa: F811
    from quorum.accountability import sealing
    from quorum.core.config import load_settings

    keyfile = tmp_path / "keys" / "secrets.key"
    monkeypatch.setattr(sealing, "settings", lambda: load_settings(env={}, secrets_key_file=str(keyfile)))
    creds = registry.add_agency(eng, "lasd", "LA Sheriff", actor="op1")
    stored = _stored_secret(eng, "lasd")
    assert stored.startswith("sealed:") and creds.secret not in stored
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert registry.agency_secret(eng, "lasd") == creds.secret
    assert registry.secrets_by_agency(eng) == {"lasd": creds.secret}

    v0 = registry.version(eng)
    sealing.add_new_key(keyfile)
    assert registry.reseal_secrets(eng, actor="op1") == 1
    assert registry.version(eng) > v0  # gateways reload
    assert _stored_secret(eng, "lasd") != stored
    assert sealing.drop_old_keys(keyfile) == 1
    assert registry.agency_secret(eng, "lasd") == creds.secret  # opened with the new key alone
    assert audit.query(eng, action="registry.secrets.reseal")

    # Without the right key (a database copied elsewhere) no secret can be opened.
    keyfile.write_bytes(sealing.Fernet.generate_key() + b"\n")
    with pytest.raises(Exception) as ei:
        registry.agency_secret(eng, "lasd")
    assert getattr(ei.value, "code", None) == Code.AUDIT_UNAVAILABLE


def test_a_secret_from_before_sealing_is_read_and_sealed_by_reseal(eng, tmp_path, monkeypatch):  # noqa: F811
    from sqlalchemy import update

    from quorum.accountability import sealing
    from quorum.core.config import load_settings

    monkeypatch.setattr(
        sealing, "settings", lambda: load_settings(env={}, secrets_key_file=str(tmp_path / "secrets.key"))
    )
    registry.add_agency(eng, "lasd", "LA Sheriff")
    with eng.begin() as conn:
        conn.execute(update(db.agencies).where(db.agencies.c.id == "lasd").values(secret="ab" * 32))
    assert registry.agency_secret(eng, "lasd") == "ab" * 32
    registry.reseal_secrets(eng)
    assert _stored_secret(eng, "lasd").startswith("sealed:")
    assert registry.agency_secret(eng, "lasd") == "ab" * 32


def test_a_gateway_that_cannot_open_secrets_fails_instead_of_calling_agencies_unknown(eng, tmp_path, monkeypatch):  # noqa: F811
    from quorum.accountability import sealing
    from quorum.core.config import load_settings
    from quorum.core.errors import ServiceError

    keyfile = tmp_path / "secrets.key"
    monkeypatch.setattr(sealing, "settings", lambda: load_settings(env={}, secrets_key_file=str(keyfile)))
    registry.add_agency(eng, "lasd", "LA Sheriff", actor="op1")
    keyfile.write_bytes(sealing.Fernet.generate_key() + b"\n")  # the wrong key: another service's file
    cache = registry.SnapshotCache(eng)
    for _ in range(2):  # the first failure must not leave a snapshot without secrets behind
        with pytest.raises(ServiceError) as ei:
            cache.get()
        assert ei.value.code == Code.AUDIT_UNAVAILABLE
