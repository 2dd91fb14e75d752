"""One log stream: in JSON mode every line a service process writes is a JSON record (structlog's own,
the standard library's, a print, a native write to fd 1 or 2, an uncaught exception), and the local
stack's process logs are rotated without their writers noticing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quorum.cli.stack import rotate_logs

PROBE = r"""
import logging, os, sys, warnings
from quorum.core.logs import configure_logging, relay_foreign_output
configure_logging("INFO", json=True)
relay_foreign_output()
import structlog
structlog.contextvars.bind_contextvars(request_id="r-1")
structlog.get_logger().info("own.event", n=1)
print("a plain print\nover two lines", flush=True)
os.write(1, b"native stdout write\n")
os.write(2, b"native stderr write\n")
logging.getLogger("celery.worker").warning("stdlib %s", "record")
warnings.warn("careful")
raise RuntimeError("uncaught")
"""


def test_every_line_of_a_service_process_is_a_json_record(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 1
    assert run.stdout == ""  # everything is on the one stream
    records = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]  # raises on a plain line
    by_event = {r["event"].strip(): r for r in records}
    assert by_event["own.event"]["n"] == 1 and by_event["own.event"]["request_id"] == "r-1"
    for text, logger in (
        ("a plain print", "stdout"),
        ("over two lines", "stdout"),
        ("native stdout write", "stdout"),
        ("native stderr write", "stderr"),
        ("stdlib record", "celery.worker"),
        ("process.uncaught_exception", "quorum"),
    ):
        assert by_event[text]["logger"] == logger, (text, by_event.get(text))
    assert any(r["logger"] == "py.warnings" and "careful" in r["event"] for r in records)
    assert "RuntimeError: uncaught" in by_event["process.uncaught_exception"]["exception"]
    assert all({"event", "level", "logger", "timestamp"} <= set(r) for r in records)


def test_a_cli_command_keeps_its_stdout_for_its_output(tmp_path: Path) -> None:
    code = "from quorum.core.logs import configure_logging; configure_logging('INFO', json=True); print('result')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.stdout == "result\n"


def test_a_log_past_its_size_is_rotated_and_its_writer_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "fusion-0.log"
    with open(log, "ab", buffering=0) as writer:  # as the stack opens every process's log
        writer.write(b"x" * 2000)
        assert rotate_logs(tmp_path, max_bytes=1000, backups=2) == [log]
        writer.write(b"after\n")
        assert log.read_bytes() == b"after\n"  # at the new end, not at offset 2000 behind a hole
        assert (tmp_path / "fusion-0.log.1").read_bytes() == b"x" * 2000
        writer.write(b"y" * 2000)
        rotate_logs(tmp_path, max_bytes=1000, backups=2)
        writer.write(b"z" * 2000)
        rotate_logs(tmp_path, max_bytes=1000, backups=2)  # the oldest copy beyond ``backups`` goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion-0.log", "fusion-0.log.1", "fusion-0.log.2"]
    assert (tmp_path / "fusion-0.log.1").read_bytes() == b"z" * 2000
    assert (tmp_path / "fusion-0.log.2").read_bytes() == b"after\n" + b"y" * 2000
    assert rotate_logs(tmp_path, max_bytes=10_000, backups=2) == []
    assert os.path.getsize(log) == 0
