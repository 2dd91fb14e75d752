"""``quorum enroll FOLDER`` and ``quorum gallery snapshot | expunge``: what the gallery holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import operator_name, require_redis, tqdm_bar
from core.config import settings


@click.command("enroll")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with a header subject_id,image[,booking_date]; image is a file path or key:<object key>",
)
@click.option("--batch", default=16, show_default=True, help="images per task")
@click.option(
    "--snapshot-every",
    default=100_000,
    show_default=True,
    help="snapshot the galleries (trimming their logs) after this many images, and at the end; 0: never",
)
def enroll(folder: Path | None, manifest: Path | None, batch: int, snapshot_every: int) -> None:
    """Enrol FOLDER/<subject>/<image>, or a booking system's --manifest, into every engine's gallery.

    Run it again with the same input to resume: what was enrolled is skipped."""
    from core.objectstore import open_store
    from workers.enrolment import enrol, folder_items, manifest_items

    if (folder is None) == (manifest is None):
        raise click.UsageError("give a FOLDER or --manifest FILE (one of them)")
    # A bad manifest (or, below, a probe image among the gallery's) is a QuorumError: QuorumGroup prints it.
    items = manifest_items(manifest) if manifest is not None else folder_items(folder)  # type: ignore[arg-type]
    s = settings()
    require_redis(s.redis_url)
    bar = tqdm_bar("enrolling (images)", len(items))
    report = enrol(
        s, open_store(s), items, batch=batch, progress=lambda done, total: bar(done), snapshot_every=snapshot_every
    )
    rate = (report.images - report.skipped) / max(report.seconds, 1e-9)
    click.echo(
        f"{report.images} images ({report.skipped} already enrolled by an earlier run, skipped); "
        f"templates added: {report.enrolled}; "
        f"failed to enrol: { {e: len(f) for e, f in report.failed.items()} } in {report.seconds:.1f}s "
        f"({rate:.1f} images/s)"
    )


@click.group("gallery")
def gallery() -> None:
    """Gallery maintenance."""


@gallery.command("snapshot")
@click.option("--timeout", default=1800.0, show_default=True, help="seconds to wait for every snapshot")
def gallery_snapshot(timeout: float) -> None:
    """Write every engine's index (every shard of a sharded engine) to the object store, trimming the
    gallery logs; workers load the newest at start."""
    from celery.result import AsyncResult

    from broker.app import GALLERY_QUEUE, TASK_SNAPSHOT, make_app

    s = settings()
    require_redis(s.redis_url)
    app = make_app(s.redis_url)
    out = app.send_task(TASK_SNAPSHOT, queue=GALLERY_QUEUE).get(timeout=timeout)
    pointers = list(out["snapshots"])
    for task_id in out["sent"]:  # one per shard, written by a worker of that shard
        pointers += AsyncResult(task_id, app=app).get(timeout=timeout)["snapshots"]
    for p in pointers:
        name = p["engine"] if p.get("shards", 1) == 1 else f"{p['engine']} shard {p['shard']}/{p['shards']}"
        click.echo(f"{name}: {p['templates']} templates, {p['subjects']} subjects -> {p['index_key']}")


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
