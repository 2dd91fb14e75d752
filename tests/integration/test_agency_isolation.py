"""One member agency cannot slow, block or swell the gateway for the others (issue: a hostile agency).

Through the real stack, with what an agency is given (its own intake stream): a flood of unsigned
18 MB JSON objects of 1.5 million keys each, an entry with three 30 MB extra fields, and an entry id
pushed far into the future. Each is answered with its code; another agency's search is answered within
4x its usual time; the gateway's memory stays bounded; the future id blocks nothing. The figures are
printed (BENCHMARKS.md, "Agency isolation")."""

from __future__ import annotations

import base64
import json
import statistics
import time
from pathlib import Path

import pytest
import redis

from quorum.broker import keys, signing
from quorum.broker.client import QuorumClient, new_request_id
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList, ErrorResult, parse_result
from tests.integration import slices

pytestmark = pytest.mark.integration

FLOOD = "flood-agency"
CALM = "calm-agency"


@pytest.fixture(scope="module")
def world(disk_stack, member_client, data_dir):
    rows = read_split(data_dir / "ci")
    gallery = slices.rows(data_dir, "agency_isolation")
    report = enrol(disk_stack, open_store(disk_stack), [(r.identity, r.path) for r in gallery])
    assert all(n == len(gallery) for n in report.enrolled.values()), report
    known = {r.identity for r in gallery}
    probes = [r for r in rows if r.role == "probe" and r.identity in known]
    return disk_stack, member_client(FLOOD), member_client(CALM), probes


def _search(client: QuorumClient, probe: Path, timeout: float = 120.0) -> tuple[float, CandidateList | ErrorResult]:
    t0 = time.monotonic()
    rid = client.submit(probe, case_number="ISO-2026-1", offence_code="PC211", purpose="investigation")
    answer = client.wait(rid, timeout=timeout)
    return time.monotonic() - t0, answer


def _gateway_memory(s) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the stack's gateway process, in bytes."""
    pid = int((Path(s.home) / "run" / "gateway-0.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines() if "kB" in line}
    return fields["VmRSS"], fields["VmHWM"]


def _stream_answers(r: redis.Redis, agency: str, entries: set[str], timeout: float) -> dict[str, ErrorResult]:
    got: dict[str, ErrorResult] = {}
    deadline = time.monotonic() + timeout
    last = "0"
    while entries - set(got) and time.monotonic() < deadline:
        for _, batch in r.xread({keys.results_stream(agency): last}, block=500, count=1000) or []:
            for entry_id, fields in batch:
                last = entry_id.decode()
                res = parse_result(fields[b"payload"])
                if isinstance(res, ErrorResult) and res.stream_entry_id in entries:
                    got[res.stream_entry_id] = res
    return got


def test_a_flooding_agency_delays_no_other_and_its_entries_are_refused_unparsed(world):
    s, flood, calm, probes = world
    r = redis.Redis.from_url(s.redis_url)
    usual = []
    for probe in probes[:3]:
        took, answer = _search(calm, probe.path)
        assert isinstance(answer, CandidateList), answer
        usual.append(took)
    usual_s = statistics.median(usual)

    # 18 MB JSON objects of 1.5 million keys each, unsigned: what took the gateway 3.5 s apiece to parse.
    bomb = ("{" + ",".join(f'"{i}":0' for i in range(1_500_000)) + "}").encode()
    assert 15 * 2**20 < len(bomb) < 20 * 2**20
    rss_before, _ = _gateway_memory(s)
    flood_entries = {flood.submit_fields({"payload": bomb}) for _ in range(10)}
    # ... and one signed entry carrying three 30 MB extra fields (the payload limit covered only the payload).
    doc = {
        "schema_version": 1,
        "request_id": new_request_id(),
        "agency_id": FLOOD,
        "user_id": f"{FLOOD}-inv",
        "case_number": "ISO-2026-2",
        "offence_code": "PC211",
        "purpose": "investigation",
        "image": {"data_b64": ""},
    }
    fat = {**signing.sign(flood.secret or "", json.dumps(doc)), **{f"pad{i}": b"p" * (30 * 2**20) for i in range(3)}}
    fat_entry = flood.submit_fields(fat)
    took, answer = _search(calm, probes[3].path)  # sent right behind the flood
    assert isinstance(answer, CandidateList), answer
    answers = _stream_answers(r, FLOOD, flood_entries | {fat_entry}, timeout=120)
    _, hwm_after = _gateway_memory(s)
    print(
        f"\nagency isolation: calm agency's search {took:.2f} s behind the flood (usual {usual_s:.2f} s, "
        f"x{took / usual_s:.1f}); gateway RSS {rss_before / 2**20:.0f} MB before, peak {hwm_after / 2**20:.0f} MB"
    )
    assert took <= 4 * usual_s, (took, usual)
    assert {e: a.code for e, a in answers.items()} == {
        **{e: "INVALID_MESSAGE" for e in flood_entries},
        fat_entry: "PAYLOAD_TOO_LARGE",
    }
    assert all("brackets, commas and colons" in answers[e].message for e in flood_entries)
    # Bounded: the 90 MB entry never entered the gateway, and at most a few 18 MB entries were held at
    # once (``gateway_reads_per_agency``); the old gateway peaked at 1.5 GB on such a flood.
    assert hwm_after - rss_before < 400 * 2**20, (rss_before, hwm_after)
    deadline = time.monotonic() + 30  # answered entries leave Redis (deleted just after the answer)
    while r.xlen(keys.intake_stream(FLOOD)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.xlen(keys.intake_stream(FLOOD)) == 0


def test_an_entry_id_in_the_future_blocks_nothing(world):
    s, flood, _, probes = world
    r = redis.Redis.from_url(s.redis_url)
    stream = keys.intake_stream(FLOOD)
    payload = json.dumps(
        {
            "schema_version": 1,
            "request_id": (rid := new_request_id()),
            "agency_id": FLOOD,
            "user_id": f"{FLOOD}-inv",
            "case_number": "ISO-2026-3",
            "offence_code": "PC211",
            "purpose": "investigation",
            "image": {"data_b64": base64.b64encode(probes[0].path.read_bytes()).decode()},
            "candidates": 5,
        }
    )
    far = f"{int(time.time() * 1000) + 10 * 365 * 86400 * 1000}-0"  # ten years ahead
    assert r.xadd(stream, signing.sign(flood.secret or "", payload), id=far).decode() == far
    answer = flood.wait(rid, timeout=120)
    assert isinstance(answer, CandidateList), answer
    # Every later entry of the stream now has an id after it; the agency's searches still go through,
    # and its refusals (answered on the results stream only) still reach the client.
    _, later = _search(flood, probes[1].path)
    assert isinstance(later, CandidateList) and later.candidates[0].subject_id == probes[1].identity, later
    # A refusal decided before the request id is trusted is answered on the results stream only, under
    # Redis's clock: the client finds it although its entry's id lies ten years ahead.
    bad_rid = new_request_id()
    bad = flood.submit_raw(json.dumps({"request_id": bad_rid, "not": "a request"}), sign=False)
    assert int(bad.split("-")[0]) > time.time() * 1000 + 86400_000  # Redis put it after the future id
    flood.entries[bad_rid] = bad
    refused = flood.wait(bad_rid, timeout=60)
    assert isinstance(refused, ErrorResult) and refused.code == "BAD_SIGNATURE", refused
