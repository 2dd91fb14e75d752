"""The ``quorum`` command without a stack: its command tree, and that a user's mistake ends in a
message on stderr and a non-zero exit status, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from quorum.cli.common import redacted
from quorum.cli.main import main
from quorum.cli.processes import WORKER_ROLES
from quorum.core.config import settings

REPO = Path(__file__).resolve().parents[2]

TOP_LEVEL = {
    "gateway",
    "worker",
    "health",
    "deploy",
    "up",
    "down",
    "status",
    "enroll",
    "gallery",
    "search",
    "sheet",
    "review",
    "demo",
    "db",
    "registry",
    "audit",
    "report",
    "disposition",
    "case",
    "probes",
    "eval",
    "calibrate",
    "eval-subsets",
    "models",
    "redis-url",
    "stack-supervise",
}  # hidden: the local stack's supervisor process


@pytest.fixture(autouse=True)
def fresh_settings(tmp_path, monkeypatch):
    """Each test reads its own settings: a private home, no settings file, nothing from the caller."""
    monkeypatch.setenv("QUORUM_HOME", str(tmp_path / "home"))
    for var in ("QUORUM_SETTINGS", "QUORUM_REDIS_URL", "QUORUM_ENGINES", "QUORUM_AGENCY_SECRET", "QUORUM_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    settings.cache_clear()
    yield
    settings.cache_clear()


@pytest.fixture()
def image(tmp_path) -> Path:
    p = tmp_path / "probe.jpg"
    p.write_bytes(b"not decoded before it reaches the gateway")
    return p


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_clean_failure(res: Result) -> None:
    """Exit status non-zero, an ``error:`` line on stderr, and no exception escaped the command."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert res.stderr.startswith("error: "), res.stderr


def _groups(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _groups(cmd, (*path, name))


def test_the_root_group_has_every_command():
    assert set(main.commands) == TOP_LEVEL


@pytest.mark.parametrize("path,group", [pytest.param(p, g, id=" ".join(p) or "quorum") for p, g in _groups(main)])
def test_help_of_every_group_lists_its_commands(path, group):
    res = run(*path, "--help")
    assert res.exit_code == 0, res.output
    listed = {line.split()[0] for line in res.output.split("Commands:", 1)[1].splitlines() if line.startswith("  ")}
    assert listed == {n for n, c in group.commands.items() if not c.hidden}, res.output


def test_python_dash_m_cli_runs_the_same_command():
    out = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "search" in out.stdout and "disposition" in out.stdout


def test_worker_roles_are_the_broker_queues():
    from quorum.broker.app import ROLE_QUEUES

    assert tuple(ROLE_QUEUES) == WORKER_ROLES


def test_unknown_worker_role_is_refused_by_click():
    res = run("worker", "vggface")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value" in res.stderr and "'vggface' is not one of" in res.stderr


def test_empty_case_is_a_clean_error(image):
    res = run("search", str(image), "--case", "", "--offence", "O", "--purpose", "P", "--secret", "s")
    assert_clean_failure(res)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --case: ") and "at least 1 character" in res.stderr


def test_search_with_no_stack_says_how_to_start_it(image):
    res = run(
        "search",
        str(image),
        "--case",
        "C-1",
        "--offence",
        "O",
        "--purpose",
        "P",
        "--secret",
        "s",
        env={"QUORUM_REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert_clean_failure(res)
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in res.stderr
    assert "start the local stack with `quorum up` or set QUORUM_REDIS_URL" in res.stderr


def test_gallery_snapshot_with_no_stack_fails_fast():
    res = run("gallery", "snapshot", env={"QUORUM_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert_clean_failure(res)
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in res.stderr


def test_search_without_a_secret_looks_in_the_registry_then_says_the_stack_is_down(image):
    res = run(
        "search",
        str(image),
        "--case",
        "C-1",
        "--offence",
        "O",
        "--purpose",
        "P",
        env={"QUORUM_REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert_clean_failure(res)
    assert "cannot reach Redis" in res.stderr


def test_a_coded_error_prints_its_code():
    res = run(
        "registry", "user", "add", "u1", "--agency", "no-such-agency", "--role", "investigator", "--actor", "tester"
    )
    assert_clean_failure(res)
    assert res.exit_code == 2 and res.stderr.startswith("error: UNKNOWN_AGENCY: ")


def test_a_bad_setting_is_a_clean_error():
    res = run("status", env={"QUORUM_ENGINES": "sface,vggface"})
    assert_clean_failure(res)
    assert "QUORUM_ENGINES" in res.stderr and "unknown engine 'vggface'" in res.stderr


def test_a_missing_settings_file_is_a_clean_error(tmp_path):
    res = run("status", env={"QUORUM_SETTINGS": str(tmp_path / "absent.toml")})
    assert_clean_failure(res)
    assert "absent.toml" in res.stderr


def test_passwords_are_not_printed():
    assert redacted("redis://svc:s3cret@redis.example:6379/0") == "redis://svc:***@redis.example:6379/0"
    assert redacted("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/0"


def test_refusal_codes_name_the_next_step() -> None:
    from quorum.cli.search import NEXT_STEP, next_step

    hint = next_step("UNKNOWN_AGENCY", agency="demo-agency", user="u", offence="O", purpose="P")
    assert hint is not None and "quorum registry agency add demo-agency" in hint
    for code, text in NEXT_STEP.items():  # every hint is filled in without a missing placeholder
        assert "{" not in next_step(code, agency="a", user="u", offence="o", purpose="p"), code
        assert code.isupper() and text


def test_a_sheet_to_a_folder_that_does_not_exist_is_refused_before_any_work(tmp_path):
    missing = tmp_path / "no-such-folder" / "sheet.html"
    res = run("sheet", "any-request", "--out", str(missing))
    assert_clean_failure(res)
    assert res.exit_code == 2 and "--out: folder" in res.output and "does not exist" in res.output
    probe = tmp_path / "probe.jpg"
    probe.write_bytes(b"\xff\xd8\xff")
    res = run("search", str(probe), "--case", "C-1", "--offence", "PC211", "--purpose", "p", "--sheet", str(missing))
    assert_clean_failure(res)  # before the search is sent: no stack is running here
    assert "--sheet: folder" in res.output and "does not exist" in res.output


def test_enroll_needs_a_folder_or_a_manifest_and_names_a_bad_manifests_line(tmp_path):
    res = run("enroll")
    assert res.exit_code == 2 and "give a FOLDER or --manifest FILE" in res.stderr and "Traceback" not in res.output
    bad = tmp_path / "bookings.csv"
    bad.write_text("subject_id,image,booking_date\nbk-1,a.jpg,31/12/2024\n")
    res = run("enroll", "--manifest", str(bad))
    assert_clean_failure(res)
    assert "INVALID_MESSAGE" in res.stderr and "bookings.csv:2" in res.stderr and "YYYY-MM-DD" in res.stderr
