"""The id grammar (schemas.ids) and where it is enforced: the probe request's schema, the registry
(agency and user ids, and the Redis ACL rendered from them), enrolment's subject ids."""

from __future__ import annotations

import fnmatch
import itertools
import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.core.errors import Code, InputError, QuorumError, require_id
from quorum.gallery.enrol import EnrolReport, _refuse_bad_ids
from quorum.gallery.items import EnrolItem
from quorum.schemas import ProbeRequest
from quorum.schemas.ids import IdKind, is_valid, problem
from tests.unit.accountability_db import eng, pg_database  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
RLO = "\u202e"
HOSTILE_SUBJECTS = [
    '"><script>',
    "../../",
    f"evil{RLO}gnp.exe",  # shown as "evilexe.png"
    "\u0410aron_Peirsol",  # Cyrillic A: looks like Aaron_Peirsol
    "Aaron_Peirs\u043el",  # Cyrillic o
    "a b",
    "tab\there",
    "x\n",
    "nul\x00",
    ".hidden",
    "-flag",
    "",
    "x" * 65,
    "ｆｕｌｌwidth",
]


@pytest.mark.parametrize("good", ["lasd", "demo-agency", "load-01", "acc_q", "a", "9th-district", "a" * 32])
def test_agency_ids_that_fit(good):
    assert problem(IdKind.AGENCY, good) is None


@pytest.mark.parametrize(
    "bad",
    ["lasd:east", "a b", "LASD", "Lasd", "", "-lasd", "_lasd", "lasd*", "la?d", "la[s]d", "la\\sd", "a" * 33,
     "lasd\n", "l\u0430sd", "lasd.east", "lasd/east", "lasd\x00"],
)  # fmt: skip
def test_agency_ids_that_do_not(bad):
    why = problem(IdKind.AGENCY, bad)
    assert why is not None and why.isascii() and why.isprintable()  # shown escaped, never rendered


@pytest.mark.parametrize("good", ["inv-0042", "BK2026.00123", "SID_77a", "Jean-Claude_Van_Damme", "X" * 64])
def test_user_and_subject_ids_that_fit(good):
    assert is_valid(IdKind.USER, good) and is_valid(IdKind.SUBJECT, good)


@pytest.mark.parametrize("bad", HOSTILE_SUBJECTS)
def test_hostile_user_and_subject_ids_are_refused_with_invalid_id(bad):
    for kind in (IdKind.USER, IdKind.SUBJECT):
        with pytest.raises(InputError) as err:
            require_id(kind, bad)
        assert err.value.code == Code.INVALID_ID and not err.value.retryable
        assert err.value.message.isascii() and RLO not in err.value.message


def _subjects(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def test_every_subject_of_the_shared_data_fits_the_grammar():
    """ci and lfw-dev (LFW identities are folder names): the tests' and benchmarks' gallery enrols as before."""
    data = Path(os.environ.get("QUORUM_DATA_DIR", REPO.parent / "shared" / "data"))
    for folder in (data / "ci" / "faces", data / "lfw-dev"):
        names = _subjects(folder)
        assert len(names) > 400, folder
        assert [n for n in names if not is_valid(IdKind.SUBJECT, n)] == [], folder
    split = (data / "ci" / "split.csv").read_text().splitlines()[1:]
    assert all(is_valid(IdKind.SUBJECT, line.split(",")[0]) for line in split)


def _probe(**over) -> dict:
    doc = {
        "request_id": "r-1",
        "agency_id": "lasd",
        "user_id": "inv-0042",
        "case_number": "C-1",
        "offence_code": "PC211",
        "purpose": "criminal-investigation",
        "image": {"key": "probes/" + "a" * 64},
    }
    return {**doc, **over}


@pytest.mark.parametrize(
    "over",
    [{"agency_id": "lasd:east"}, {"agency_id": "a b"}, {"agency_id": "LASD"}, {"user_id": "a b"},
     {"user_id": "inv\u202e"}, {"user_id": "inv:1"}, {"agency_id": "lasd\n"}],
)  # fmt: skip
def test_the_probe_request_refuses_ids_outside_the_grammar(over):
    ProbeRequest.model_validate(_probe())
    with pytest.raises(ValidationError):
        ProbeRequest.model_validate(_probe(**over))


@pytest.mark.parametrize("bad", ["lasd:east", "a b", "LASD", "lasd*", "x" * 33])
def test_agency_add_refuses_a_bad_id_and_registers_nothing(eng, bad):  # noqa: F811
    before = registry.version(eng)
    with pytest.raises(InputError) as err:
        registry.add_agency(eng, bad, "X")
    assert err.value.code == Code.INVALID_ID
    assert registry.version(eng) == before and registry.snapshot(eng).agencies == {}
    with eng.connect() as conn:
        assert not list(conn.execute(select(db.audit_log.c.action).where(db.audit_log.c.action.like("registry.%"))))


@pytest.mark.parametrize("bad", ['"><script>', "a b", f"inv{RLO}1", "inv:1"])
def test_user_add_refuses_a_bad_id_and_registers_nothing(eng, bad):  # noqa: F811
    registry.add_agency(eng, "lasd", "LASD")
    before = registry.version(eng)
    with pytest.raises(InputError) as err:
        registry.add_user(eng, bad, "lasd", "investigator")
    assert err.value.code == Code.INVALID_ID
    assert registry.version(eng) == before and registry.snapshot(eng).users == {}


def _insert_legacy_agency(eng, agency_id: str) -> None:  # noqa: F811
    """A row stored before the grammar was enforced (or written around add_agency)."""
    with db.write_tx(eng) as conn:
        conn.execute(
            db.agencies.insert().values(
                id=agency_id, name="legacy", status="active", member=True, daily_quota=0, secret="x",
                redis_password_sha256="ab" * 32, created_at="2026-01-01T00:00:00Z",
            )
        )  # fmt: skip


def test_a_stored_bad_id_is_never_rendered_into_the_acl(eng):  # noqa: F811
    registry.add_agency(eng, "lasd", "LASD")
    for bad in ("lasd:east", "a b", "x\ny"):
        _insert_legacy_agency(eng, bad)
    acl = registry.render_redis_acl(eng)
    users = [line.split()[1] for line in acl.splitlines()]
    assert users == ["agency-lasd", "default"]
    assert sorted(a for a, _ in registry.refused_acl_agencies(eng)) == sorted(["lasd:east", "a b", "x\ny"])


def test_agency_key_patterns_match_no_other_agencys_keys():
    """Every pair of valid ids, prefixes of each other included: no key pattern of one matches a key of
    the other (Redis's glob: * ? [ ] as fnmatch has them; the ids have none)."""
    ids = ["lasd", "lasd-east", "lasd_east", "la", "l", "lasd1", "east"]
    for mine, other in itertools.permutations(ids, 2):
        their_keys = [keys.intake_stream(other), keys.results_stream(other), keys.result_key(other, "r1"),
                      keys.result_key(other, "x:y"), keys.request_key(other, "r1")]  # fmt: skip
        for pattern in registry.agency_key_patterns(mine):
            glob = pattern.split("~", 1)[1]
            assert not any(fnmatch.fnmatchcase(k, glob) for k in their_keys), (mine, other, pattern)
        own = [keys.result_key(mine, "r1"), keys.intake_stream(mine)]
        assert all(
            any(fnmatch.fnmatchcase(k, p.split("~", 1)[1]) for p in registry.agency_key_patterns(mine)) for k in own
        )


def test_one_user_redis_refuses_does_not_stop_the_others_and_is_reported(eng):  # noqa: F811
    for a in ("a", "b", "c"):
        registry.add_agency(eng, a, a.upper())
    applied: list[str] = []

    class Refusing:  # a Redis that refuses one SETUSER
        def execute_command(self, *args):
            if args[:2] == ("ACL", "SETUSER"):
                if args[2] == "agency-b":
                    raise RuntimeError("ERR refused")
                applied.append(args[2])
            return []

    with pytest.raises(QuorumError) as err:
        registry.apply_redis_acl(eng, Refusing())
    assert err.value.code == Code.REDIS_ACL_NOT_APPLIED and err.value.retryable
    assert "agency-b" in err.value.message and applied == ["agency-a", "agency-c"]


def test_enrolment_reports_items_with_bad_subject_ids_failed_and_keeps_the_rest():
    class S:
        engines = ("sface", "arcface")

    report = EnrolReport()
    chunk = [
        (i, EnrolItem(sid, path=Path(f"/x/{i}.jpg"))) for i, sid in enumerate(["Aaron_Peirsol", *HOSTILE_SUBJECTS])
    ]
    kept = _refuse_bad_ids(S(), chunk, report)  # type: ignore[arg-type]
    assert [it.subject_id for _, it in kept] == ["Aaron_Peirsol"]
    for engine in S.engines:
        assert len(report.failed[engine]) == len(HOSTILE_SUBJECTS)
        assert {f["code"] for f in report.failed[engine]} == {"INVALID_ID"}
        assert all(f["subject_id"].isascii() and f["subject_id"].isprintable() for f in report.failed[engine])
