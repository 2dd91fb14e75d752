"""``quorum enroll FOLDER`` and ``quorum gallery snapshot | expunge``: what the gallery holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import operator_name, require_redis, tqdm_bar
from core.config import settings


@click.command("enroll")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", default=16, show_default=True)
def enroll(folder: Path, batch: int) -> None:
    """Enrol FOLDER/<subject>/<image> into every engine's gallery."""
    from core.objectstore import open_store
    from workers.enrolment import enrol, folder_items

    s = settings()
    items = folder_items(folder)
    bar = tqdm_bar("enrolling (image x engine)", len(items) * len(s.engines))
    report = enrol(s, open_store(s), items, batch=batch, progress=lambda done, total: bar(done))
    click.echo(
        f"{report.images} images; templates added: {report.enrolled}; "
        f"failed to enrol: { {e: len(f) for e, f in report.failed.items()} } in {report.seconds:.1f}s"
    )


@click.group("gallery")
def gallery() -> None:
    """Gallery maintenance."""


@gallery.command("snapshot")
def gallery_snapshot() -> None:
    """Write every engine's index to the object store (workers load it at start)."""
    from broker.app import GALLERY_QUEUE, TASK_SNAPSHOT, make_app

    require_redis(settings().redis_url)
    res = make_app(settings().redis_url).send_task(TASK_SNAPSHOT, queue=GALLERY_QUEUE)
    for p in res.get(timeout=600):
        click.echo(f"{p['engine']}: {p['templates']} templates, {p['subjects']} subjects -> {p['index_key']}")


@gallery.command("expunge")
@click.argument("subject")
@click.option("--reason", required=True, help="why (court order, no charge filed, ...)")
@click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")
def gallery_expunge(subject: str, reason: str, actor: str | None) -> None:
    """Remove SUBJECT from every engine, the object store and the metadata (audited)."""
    from core.objectstore import open_store
    from workers.enrolment import expunge

    s = settings()
    out = expunge(s, open_store(s), subject, reason=reason, actor=operator_name(actor))
    click.echo(json.dumps(out))


COMMANDS = (enroll, gallery)
