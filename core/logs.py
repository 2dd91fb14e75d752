"""structlog configuration, set once per process: one log stream, one format.

Key/value console output for people, JSON lines (``QUORUM_LOG_JSON=true``) for log shippers. Every line
a process writes goes through the same renderer: structlog's own events, and the standard library's
records (Celery, kombu, uvicorn, alembic, Python's warnings, an uncaught exception), which reach the
root handler and are rendered by ``structlog.stdlib.ProcessorFormatter``. A service process (worker,
gateway, review app, supervisor) in JSON mode also calls :func:`relay_foreign_output`: its log stream
becomes a copy of its stderr, and whatever else writes to file descriptors 1 and 2 (a library's
``print``, Celery's shutdown line, a native library's warning) is relayed as a JSON record too (logger
``stdout`` or ``stderr``), so a log shipper never receives a line in another format. A CLI command keeps
its stdout for its output. Context such as
``request_id``, ``agency`` and ``engine`` is bound with ``structlog.contextvars`` by the observers
(``workers.observers``), so task bodies never pass it around by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import json as jsonlib
import logging
import os
import sys
import threading
import time
from typing import IO, Any

import structlog

_configured = False


def _shared() -> list[Any]:
    """What every line gets, whichever logger wrote it."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def formatter(json: bool) -> structlog.stdlib.ProcessorFormatter:
    """The one formatter of a process's log stream (also for handlers a caller adds, e.g. a log file)."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared(), structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    lvl = logging.getLevelName(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(json))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.captureWarnings(True)  # Python's warnings as records of the ``py.warnings`` logger
    structlog.configure(
        processors=[*_shared(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """A process that dies of an exception says so in the same format as every other line."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("quorum").critical("process.uncaught_exception", exc_info=(kind, value, tb))


_relaying = False
_relays: list[threading.Thread] = []


def relay_foreign_output() -> None:
    """For a service process in JSON mode (idempotent): every line on fds 1 and 2 that is not already a
    JSON record becomes one, written with the process's own records to a copy of stderr."""
    global _relaying
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    if _relaying or not handlers:
        return
    _relaying = True
    handler = handlers[0]
    handler.setStream(_own_stream())
    for fd, name in ((1, "stdout"), (2, "stderr")):
        _relay_fd(fd, name, handler)
    atexit.register(drain_relay)


def drain_relay(timeout: float = 2.0) -> None:
    """Relay what is still in the pipes before the process ends (at exit, and before an ``os._exit``):
    fds 1 and 2 are pointed at /dev/null, which closes the pipes' write ends, and the relay threads
    finish once they have written what was left."""
    if not _relays:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream has nothing to flush
            stream.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)
    for thread in _relays:
        thread.join(timeout)
    _relays.clear()


def _own_stream() -> IO[str]:
    """A copy of stderr that only this process's log handler writes to."""
    return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")


def _relay_fd(fd: int, name: str, handler: logging.StreamHandler) -> None:
    """Point ``fd`` at a pipe whose lines a thread writes to the handler's stream as JSON records."""
    read, write = os.pipe()
    os.dup2(write, fd)
    os.close(write)
    thread = threading.Thread(target=_relay, args=(read, name, handler), name=f"log-relay-{name}", daemon=True)
    thread.start()
    _relays.append(thread)


def _relay(read: int, name: str, handler: logging.StreamHandler) -> None:
    with os.fdopen(read, "r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                is_record = isinstance(jsonlib.loads(text), dict)
            except ValueError:
                is_record = False
            if not is_record:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1e6):06d}Z"
                level = "info" if name == "stdout" else "warning"
                text = jsonlib.dumps({"event": text, "level": level, "logger": name, "timestamp": stamp})
            with handler.lock or threading.RLock():
                handler.stream.write(text + "\n")
                handler.stream.flush()
