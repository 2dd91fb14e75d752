"""What the command modules share: the operator's name, output helpers, and the one place where a
failure becomes a message instead of a traceback.

:class:`QuorumGroup` is the root group's class. Every command runs inside its ``invoke``, which turns

* :class:`core.errors.QuorumError` into ``error: CODE: message``,
* a pydantic ``ValidationError`` (a bad ``--case``, a bad ``QUORUM_*`` setting) into one line per
  field and problem,
* a Redis that does not answer (``redis.ConnectionError`` anywhere in the chain, or
  ``BROKER_UNAVAILABLE``) into a hint to start the stack,

each printed on stderr with exit status 2 (:data:`ERROR_EXIT`). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse, urlunparse

import click
from pydantic import ValidationError

from ..broker.redis_errors import connect
from ..core.errors import Code, QuorumError

ERROR_EXIT = 2  # a stable-coded error, a value that does not validate, the stack not reachable
FIELD_LABELS = "quorum.field_labels"  # ctx.meta key: model field -> the option a user typed it as

actor_option = click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")


def operator_name(actor: str | None = None) -> str:
    return actor or os.environ.get("QUORUM_OPERATOR") or getpass.getuser()


def os_operator() -> str:
    """Who runs this command, as the machine knows them: ``cli:<account>@<host>``, the account of the
    process's effective uid (not ``$USER`` or ``$QUORUM_OPERATOR``, which any shell sets at will). CLI
    actions taken in a user's name are recorded as this operator, the user as ``on_behalf_of``."""
    import pwd
    import socket

    try:
        account = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        account = f"uid-{os.geteuid()}"
    return f"cli:{account}@{socket.gethostname()}"


def emit(text: str, out: Path | None) -> None:
    """Write ``text`` to ``out`` when given, else to standard output."""
    if out:
        out.write_text(text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)


def db_engine() -> Any:
    """The registry and audit database of the current settings (migrated on first use)."""
    from ..accountability import db
    from ..core.config import settings

    return db.get_engine(settings())


def tqdm_bar(label: str, total: int, unit: str = "img") -> Callable[[int], None]:
    """A progress callback ``update(done)`` drawing a bar on stderr; closes itself when complete."""
    from tqdm import tqdm

    bar = tqdm(desc=label, total=total, unit=unit, file=sys.stderr)

    def update(done: int) -> None:
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def label_fields(**labels: str) -> None:
    """Name the options behind model fields (``case_number="--case"``) for validation messages."""
    ctx = click.get_current_context()
    ctx.meta.setdefault(FIELD_LABELS, {}).update(labels)


@contextmanager
def stack_failures() -> Iterator[None]:
    """The stack supervisor's RuntimeErrors (no redis-server, a process that died while starting, not
    ready in time) say what went wrong in words: print them, without a traceback (exit status 1)."""
    try:
        yield
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def require_redis(url: str) -> None:
    """Fail now, with the stack-down hint, when Redis does not answer (Celery would retry for a while and
    then end in a traceback)."""

    connect(url, socket_connect_timeout=2).ping()


# ---- errors ---------------------------------------------------------------------------------------


class CliError(click.ClickException):
    """A failure the user can act on: ``error: <message>`` on stderr, exit status 2."""

    exit_code = ERROR_EXIT

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def redacted(url: str) -> str:
    """``url`` without its password."""
    try:
        u = urlparse(url)
    except ValueError:
        return url
    if not u.password:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    return urlunparse(u._replace(netloc=netloc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _redis_unreachable(exc: BaseException) -> BaseException | None:
    """The exception that says Redis did not answer, if ``exc`` is one (or Celery's/kombu's wrapping one)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return exc
    if isinstance(exc, QuorumError):
        return exc if exc.code == Code.BROKER_UNAVAILABLE else None
    if type(exc).__module__.split(".")[0] in {"kombu", "celery"}:  # e.g. kombu's OperationalError
        return next((e for e in _chain(exc) if isinstance(e, (RedisConnectionError, RedisTimeoutError))), None)
    return None


def stack_down_message(cause: BaseException) -> str:
    try:
        from ..core.config import settings

        url = redacted(settings().redis_url)
    except (ValueError, OSError):  # the settings themselves are broken: say what we can
        url = os.environ.get("QUORUM_REDIS_URL", "the configured URL")
    detail = cause.message if isinstance(cause, QuorumError) else f"{type(cause).__name__}: {cause}"
    return (
        f"cannot reach Redis at {url}: start the local stack with `quorum up` or set QUORUM_REDIS_URL\n"
        f"       ({detail})"
    )


def validation_message(err: ValidationError, labels: Mapping[str, str] | None = None) -> str:
    """One line per field of a pydantic ``ValidationError``: where, and what is wrong."""
    labels = labels or {}
    settings_error = err.title == "Settings"
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        top = str(e["loc"][0]) if e.get("loc") else ""
        if top in labels:
            where = labels[top] + loc[len(top) :]
        elif settings_error and loc:
            where = f"setting {loc} (QUORUM_{top.upper()})"
        elif settings_error:
            where = "settings"
        else:
            where = loc or err.title
        if "input" in e and e.get("type") not in {"missing", "extra_forbidden"} and not settings_error:
            got = repr(e["input"])
            msg += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        lines.append(f"{where}: {msg}")
    return "\n       ".join(lines)


def translate(exc: Exception, labels: Mapping[str, str] | None = None) -> CliError | None:
    """The clean message for ``exc``, or None when it is not a user's mistake (a bug: keep the traceback)."""
    down = _redis_unreachable(exc)
    if down is not None:
        return CliError(stack_down_message(down))
    if isinstance(exc, QuorumError):
        return CliError(f"{exc.code.value}: {exc.message}")
    if isinstance(exc, ValidationError):
        return CliError(validation_message(exc, labels))
    return None


class QuorumGroup(click.Group):
    """The root group: every command below it runs inside :meth:`invoke` (see the module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            clean = translate(exc, ctx.meta.get(FIELD_LABELS))
            if clean is None:
                raise
            raise clean from exc


def load_settings_or_fail() -> Any:
    """The process settings; a bad value or a missing settings file ends the command cleanly."""
    from ..core.config import settings

    try:
        return settings()
    except (ValueError, OSError) as exc:  # ValidationError is a ValueError; the handler formats it
        if isinstance(exc, ValidationError):
            raise
        raise CliError(f"settings: {exc}") from exc
