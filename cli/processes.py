"""``quorum gateway`` and ``quorum worker ROLE``: the long-running processes ``quorum up`` starts;
``quorum health``: whether such a process is ready (the container health check)."""

from __future__ import annotations

import click

from ..core.engines import ENGINE_NAMES

# One Celery worker role per queue (broker.app.ROLE_QUEUES): intake, one per engine, fusion, gallery.
WORKER_ROLES: tuple[str, ...] = ("intake", *ENGINE_NAMES, "fusion", "gallery")


@click.command("gateway")
def gateway() -> None:
    """Run the gateway (reads agencies' intake streams)."""
    from ..workers.serve import run_gateway

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
@click.option(
    "--reindex",
    is_flag=True,
    help="a reindex worker of engine ROLE: embeds the stored gallery images with the engine version this "
    "process runs, for `quorum gallery reindex` (serves no search)",
)
def worker(role: str, shard: tuple[int, int] | None, reindex: bool) -> None:
    """Run a Celery worker for ROLE's queue (with --shard, for one shard of engine ROLE's gallery; with
    --reindex, engine ROLE's reindex queue)."""
    from ..broker.app import reindex_role, shard_role
    from ..core.engines import ENGINE_NAMES
    from ..workers.serve import run_worker

    if (shard is not None or reindex) and role not in ENGINE_NAMES:
        raise click.UsageError(f"--shard and --reindex are for an engine role ({', '.join(ENGINE_NAMES)}), not {role}")
    if shard is not None and reindex:
        raise click.UsageError("--shard or --reindex, not both (a reindex worker writes every shard's log)")
    if shard is not None:
        role = shard_role(role, *shard)
    elif reindex:
        role = reindex_role(role)
    run_worker(role)


@click.command("health")
@click.option("--port", type=int, default=None, help="default: QUORUM_METRICS_PORT")
@click.option("--timeout", type=float, default=4.0, show_default=True)
def health(port: int | None, timeout: float) -> None:
    """Exit 0 if the process serving on this host's metrics port is ready to take work (its model and
    gallery loaded, consuming its queue), else 1: the container health check."""
    import urllib.error
    import urllib.request

    from ..core.config import settings

    port = port or settings().metrics_port
    if not port:
        raise click.UsageError("no port: set QUORUM_METRICS_PORT or give --port")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=timeout) as r:
            click.echo(r.read().decode().strip())
    except urllib.error.HTTPError as err:
        click.echo(f"not ready (HTTP {err.code})", err=True)
        raise SystemExit(1) from None
    except OSError as err:
        click.echo(f"not serving on port {port}: {err}", err=True)
        raise SystemExit(1) from None


COMMANDS = (gateway, worker, health)
