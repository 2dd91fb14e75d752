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


@click.command("worker")
@click.argument("role", type=click.Choice(WORKER_ROLES))
def worker(role: str) -> None:
    """Run a Celery worker for ROLE's queue."""
    from workers.serve import run_worker

    run_worker(role)


COMMANDS = (gateway, worker)
