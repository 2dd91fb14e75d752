"""The CLI as a person runs it, against the running stack; and probes written while the gateway is
down are picked up when it comes back (nothing lost)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from quorum.cli.stack import Stack, settings_env, stack_roles
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList
from quorum.schemas.export import SCHEMA_DIR
from tests.integration import slices

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gallery(disk_stack, member_client, data_dir):
    from quorum.accountability.registry import DEMO_AGENCY, DEMO_USER

    member_client(DEMO_AGENCY, DEMO_USER)  # the CLI's default agency; it finds the secret in the registry
    rows = slices.rows(data_dir, "cli")
    enrol(disk_stack, open_store(disk_stack), [(r.identity, r.path) for r in rows])
    return disk_stack, rows


def _quorum(s, *args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_search_json_is_the_schema_and_status_shows_the_stack(gallery, data_dir):
    s, rows = gallery
    probe = sorted((data_dir / "ci" / "faces" / rows[0].identity).iterdir())[1]
    out = _quorum(
        s,
        "search",
        str(probe),
        "--case",
        "C-9",
        "--offence",
        "PC211",
        "--purpose",
        "investigation",
        "--top",
        "5",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    jsonschema.validate(doc, json.loads((SCHEMA_DIR / "result.schema.json").read_text()))
    assert doc["type"] == "candidate_list" and len(doc["candidates"]) == 5
    assert doc["candidates"][0]["subject_id"] == rows[0].identity
    human = _quorum(
        s, "search", str(probe), "--case", "C-9", "--offence", "PC211", "--purpose", "investigation", "--top", "3"
    )
    assert human.returncode == 0 and human.stdout.count("INVESTIGATIVE LEAD ONLY") == 2
    assert rows[0].identity in human.stdout
    status = _quorum(s, "status")
    assert status.returncode == 0
    for role in stack_roles(s):
        assert f"{role:<10} running" in status.stdout


def test_search_error_exit_code(gallery, tmp_path):
    s, _ = gallery
    bogus = tmp_path / "notes.jpg"
    bogus.write_bytes(b"definitely not a jpeg" * 50)
    out = _quorum(s, "search", str(bogus), "--case", "C-9", "--offence", "PC211", "--purpose", "investigation")
    assert out.returncode == 2 and "ERROR NOT_AN_IMAGE" in out.stdout


def test_probes_written_while_gateway_is_down_are_answered_when_it_returns(gallery, member_client, data_dir):
    s, rows = gallery
    stack = Stack(s)
    assert stack.stop_process("gateway")
    client = member_client("backlog-agency")
    try:
        rids = {
            client.submit(
                sorted((data_dir / "ci" / "faces" / r.identity).iterdir())[1],
                case_number="C-10",
                offence_code="PC211",
                purpose="investigation",
            ): r.identity
            for r in rows[:4]
        }
        assert client.result(next(iter(rids))) is None
    finally:
        stack.start_process("gateway")
        stack.wait_ready(stack_roles(s))
    results = client.wait_all(list(rids), timeout=180)
    for rid, identity in rids.items():
        assert isinstance(results[rid], CandidateList), results[rid]
        assert results[rid].candidates[0].subject_id == identity
