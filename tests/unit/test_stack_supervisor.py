"""The local stack's supervisor restarts what died and never what was stopped on purpose.

Real processes (``sleep``) stand in for the roles; only ``start_process`` is replaced, to count what the
supervisor would start.
"""

import subprocess
import threading
import time

from quorum.cli.stack import Stack, write_pidfile
from quorum.core.config import load_settings


def _stack(tmp_path, monkeypatch):
    stack = Stack(load_settings(env={}, home=str(tmp_path)))
    stack.run_dir.mkdir(parents=True)
    started: list[tuple[str, int]] = []
    monkeypatch.setattr(stack, "start_process", lambda role, i=0: started.append((role, i)) or 0)
    return stack, started


def _sleeper(stack, role):
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)  # its own group, as the stack starts them
    write_pidfile(stack._pidfile(role), proc.pid)
    return proc


def _supervising(stack):
    stop = threading.Event()
    t = threading.Thread(target=stack.supervise, args=(stop,), kwargs={"interval_s": 0.005}, daemon=True)
    t.start()
    return stop, t


def test_a_process_stopped_on_purpose_is_not_restarted(tmp_path, monkeypatch):
    stack, started = _stack(tmp_path, monkeypatch)
    procs = [_sleeper(stack, "facenet")]
    stop, t = _supervising(stack)
    try:
        for _ in range(20):  # the race it guards against is narrow; try it many times
            time.sleep(0.02)
            assert stack.stop_process("facenet")
            procs[-1].wait(5)
            time.sleep(0.05)  # several supervisor rounds with the process gone
            assert started == []
            procs.append(_sleeper(stack, "facenet"))
    finally:
        stop.set()
        t.join(5)
        for p in procs:
            p.kill()
            p.wait()


def test_a_process_that_dies_is_restarted(tmp_path, monkeypatch):
    stack, started = _stack(tmp_path, monkeypatch)
    proc = _sleeper(stack, "facenet")
    stop, t = _supervising(stack)
    try:
        proc.kill()
        proc.wait(5)
        deadline = time.monotonic() + 5
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started == [("facenet", 0)]
    finally:
        stop.set()
        t.join(5)
