"""``quorum gateway`` and ``quorum worker ROLE``: the long-running processes ``quorum up`` starts."""

from __future__ import annotations

import click

from core.engines import ENGINE_NAMES

# One Celery worker role per queue (broker.app.ROLE_QUEUES): intake, one per engine, fusion, gallery.
WORKER_ROLES: tuple[str, ...] = ("intake", *ENGINE_NAMES, "fusion", "gallery")


@click.command("gateway")
def gateway() -> None:
    """Run the gateway (reads agencies' intake streams)."""
    from workers.serve import run_gateway

    run_gateway()


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    i, sep, n = value.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise click.BadParameter(f"{value!r}: give I/S, shard I of S counted from 0 (e.g. 0/4 ... 3/4)")
    return int(i), int(n)


@click.command("worker")
@click.argument("role", type=click.Choice(WORKER_ROLES))
@click.option(
    "--shard",
    callback=_shard,
    metavar="I/S",
    help="serve shard I of S of an engine's gallery (the engine must be configured with S shards: QUORUM_SHARDS)",
)
def worker(role: str, shard: tuple[int, int] | None) -> None:
    """Run a Celery worker for ROLE's queue (with --shard, for one shard of engine ROLE's gallery)."""
    from broker.app import shard_role
    from core.engines import ENGINE_NAMES
    from workers.serve import run_worker

    if shard is not None:
        if role not in ENGINE_NAMES:
            raise click.UsageError(f"--shard is for an engine role ({', '.join(ENGINE_NAMES)}), not {role}")
        role = shard_role(role, *shard)
    run_worker(role)


COMMANDS = (gateway, worker)
