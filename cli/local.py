"""``quorum up | down | status``: the local stack (its supervisor is :mod:`cli.stack`)."""

from __future__ import annotations

import click

from ..core.config import settings
from .common import redacted, stack_failures


@click.command("up")
@click.option(
    "--metrics-base",
    default=0,
    show_default=True,
    help="serve each process's /metrics on consecutive ports from here (0: none)",
)
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for every worker")
def up(metrics_base: int, timeout: float) -> None:
    """Start the local stack (Redis, gateway, one worker per queue) in the background."""
    from ..core import local_redis
    from .stack import Stack

    s = settings()
    click.echo(f"starting Quorum under {s.home} (redis {redacted(s.redis_url)}, store: {s.store_kind})")
    stack = Stack(s)
    with stack_failures():
        stack.up(metrics_base=metrics_base, timeout=timeout)
    _first_registrations(stack.s)  # logged in as the admin user when the stack started its own Redis
    if stack.owns_redis():
        click.echo(
            f"redis: default user off; one ACL user per service and agency (passwords of the services: "
            f"{local_redis.passwords_file(s.home)}; `quorum redis-url` prints the admin URL)"
        )
    click.echo("ready")


def _first_registrations(s) -> None:
    """On a registry with no agency at all (a fresh local stack), register the demo agency, so that a
    first `quorum search` as the README writes it works; a real registry is left as it is."""
    from ..accountability import db, registry

    eng = db.get_engine(s)
    if registry.snapshot(eng).agencies:
        return
    registry.provision_demo(s)
    click.echo(
        f"registered the local trial agency {registry.DEMO_AGENCY!r}, its certified user "
        f"{registry.DEMO_USER!r}, offence DEMO and purpose demo (the registry was empty): "
        "quorum search IMAGE --case DEMO-0001 --offence DEMO --purpose demo"
    )


@click.command("down")
def down() -> None:
    """Stop what `quorum up` started."""
    from .stack import Stack

    stopped = Stack(settings()).down()
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@click.command("status")
def status() -> None:
    """Processes, queues and gallery sizes."""
    import redis as redis_lib

    from ..broker import keys
    from ..broker.app import ALL_QUEUES
    from ..broker.sentinel import open_redis
    from .stack import Stack

    s = settings()
    for name, state in Stack(s).status().items():
        click.echo(f"{name:<10} {state}")
    try:
        r = open_redis(s.redis_url, socket_connect_timeout=1)
        click.echo("queues:   " + "  ".join(f"{q}={r.llen(q)}" for q in ALL_QUEUES))
        click.echo(f"subjects: {r.hlen(keys.GALLERY_SUBJECTS)}")
    except redis_lib.RedisError as exc:
        click.echo(f"redis: unreachable ({exc})")
    else:
        from .gallery import print_gallery_status

        print_gallery_status(s)
    click.echo(f"engines ({s.deployment} deployment; configured: {', '.join(s.engines)}):")
    for line in engine_provenance_lines(s):
        click.echo("  " + line)


def engine_provenance_lines(s) -> list[str]:
    """Per engine: weights and checksum, training set, licence, and whether it may run here."""
    from ..core.engines import ENGINES

    lines = []
    for spec in ENGINES.values():
        if not spec.research_only:
            may = "may run"
        elif s.deployment == "demo":
            may = "research-only licence: runs in the demo"
        elif spec.name in s.accept_research_licences or "all" in s.accept_research_licences:
            may = "research-only licence: accepted by the operator"
        else:
            may = f"research-only licence NOT accepted: set QUORUM_ACCEPT_RESEARCH_LICENCES={spec.name} to run it"
        used = "in use" if spec.name in s.engines else "not configured"
        lines.append(
            f"{spec.name:<8} {used}; {may}\n      weights {spec.weights}, sha256 {spec.sha256[:16]}...\n"
            f"      trained on {spec.training_set}\n      licence: {spec.licence}"
        )
    return lines


@click.command("stack-supervise", hidden=True)
def stack_supervise() -> None:
    """Restart crashed processes of the local stack (started by `quorum up`, stopped by `quorum down`)."""
    import signal
    import threading

    from ..core.logs import relay_foreign_output
    from .stack import Stack

    s = settings()
    if s.log_json:
        relay_foreign_output()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Stack(s).supervise(stop)


@click.command("redis-url")
@click.option(
    "--user",
    type=click.Choice(["admin", "gateway", "worker", "review"]),
    default="admin",
    show_default=True,
    help="which service user of the local stack's Redis",
)
@click.option("--password", "password_only", is_flag=True, help="print the password alone (for REDISCLI_AUTH)")
def redis_url(user: str, password_only: bool) -> None:
    """Print the URL (with its password) of a service user of the Redis `quorum up` started. For redis-cli,
    keep the password out of its arguments: REDISCLI_AUTH="$(quorum redis-url --password)" redis-cli
    -p PORT --user admin"""
    from ..core import local_redis

    s = settings()
    url = local_redis.service_url(s.home, s.redis_url, user)
    if url is None:
        raise click.ClickException(
            f"no Redis started by the local stack of {s.home} runs at {redacted(s.redis_url)}: "
            "this prints only the local stack's credentials (quorum up)"
        )
    click.echo(local_redis.read_passwords(s.home)[user] if password_only else url)


COMMANDS = (up, down, status, stack_supervise, redis_url)
