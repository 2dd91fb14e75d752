"""``quorum enroll FOLDER`` and ``quorum gallery snapshot | expunge``: what the gallery holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..broker.redis_errors import connect
from ..core.config import settings
from .common import operator_name, require_redis, tqdm_bar


@click.command("enroll")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with a header subject_id,image[,booking_date]; image is a file path or key:<object key>",
)
@click.option(
    "--nist",
    "nist_paths",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="ANSI/NIST-ITL transaction files (or folders of *.eft, *.an2, *.nist, *.int, *.ebts): each Type-10 "
    "face enrolled under the transaction's QUORUM_NIST_SUBJECT_FIELD (2.015); repeatable",
)
@click.option("--profiles", is_flag=True, help="with --nist: enrol profile faces (10.020 L, R, A) too")
@click.option("--batch", default=16, show_default=True, help="images per task")
@click.option(
    "--snapshot-every",
    default=100_000,
    show_default=True,
    help="snapshot the galleries (trimming their logs) after this many images, and at the end; 0: never",
)
def enroll(
    folder: Path | None,
    manifest: Path | None,
    nist_paths: tuple[Path, ...],
    profiles: bool,
    batch: int,
    snapshot_every: int,
) -> None:
    """Enrol FOLDER/<subject>/<image>, a booking system's --manifest, or its --nist transactions, into
    every engine's gallery.

    Run it again with the same input to resume: what was enrolled is skipped."""
    from ..core.objectstore import open_store
    from ..gallery.enrol import enrol
    from ..gallery.items import folder_items, manifest_items

    if sum(x is not None and x != () for x in (folder, manifest, nist_paths)) != 1:
        raise click.UsageError("give a FOLDER or --manifest FILE or --nist FILE (one of them)")
    s = settings()
    # A bad manifest (or, below, a probe image among the gallery's) is a QuorumError: QuorumGroup prints it.
    if nist_paths:
        items = _nist_items(s, nist_paths, profiles)
    else:
        items = manifest_items(manifest) if manifest is not None else folder_items(folder)  # type: ignore[arg-type]
    require_redis(s.redis_url)
    bar = tqdm_bar("enrolling (images)", len(items))
    report = enrol(
        s, open_store(s), items, batch=batch, progress=lambda done, total: bar(done), snapshot_every=snapshot_every
    )
    rate = (report.images - report.skipped) / max(report.seconds, 1e-9)
    click.echo(
        f"{report.images} images ({report.skipped} already enrolled by an earlier run, skipped); "
        f"templates added: {report.enrolled}; "
        + (f"already held (same subject and image): {report.held}; " if report.held else "")
        + f"failed to enrol: { {e: len(f) for e, f in report.failed.items()} } in {report.seconds:.1f}s "
        f"({rate:.1f} images/s)"
    )
    shown = list(
        dict.fromkeys((f["subject_id"], f["image_key"], f["code"]) for fs in report.failed.values() for f in fs)
    )
    for subject, image, code in shown[:20]:
        click.echo(f"  failed: {subject} {image} {code}")


def _nist_items(s, paths: tuple[Path, ...], profiles: bool) -> list:
    """The transactions' items; what is refused (with its code) or skipped is said before enrolling."""
    from ..gallery.nist import nist_items

    found = nist_items(s, paths, profiles=profiles)
    click.echo(f"{found.transactions} transaction(s): {len(found.items)} face image(s) to enrol")
    if found.profiles_skipped:
        click.echo(f"  not enrolled: {found.profiles_skipped} profile face(s) (10.020 not F; --profiles enrols them)")
    if found.other_images:
        click.echo(f"  not enrolled: {found.other_images} Type-10 image(s) that are not faces (10.003)")
    for bad in found.refused:
        click.echo(f"  refused: {bad.code.value}: {bad.message}")
    return found.items


@click.group("gallery")
def gallery() -> None:
    """Gallery maintenance."""


@gallery.command("snapshot")
@click.option("--timeout", default=1800.0, show_default=True, help="seconds to wait for every snapshot")
def gallery_snapshot(timeout: float) -> None:
    """Write every engine's index (every shard of a sharded engine) to the object store, trimming the
    gallery logs; workers load the newest at start."""
    from celery.result import AsyncResult

    from ..broker.app import GALLERY_QUEUE, TASK_SNAPSHOT, make_app

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
    from ..core.objectstore import open_store
    from ..gallery.expunge import expunge

    s = settings()
    out = expunge(s, open_store(s), subject, reason=reason, actor=operator_name(actor))
    click.echo(json.dumps(out))


@gallery.command("reindex")
@click.argument("engine")
@click.option("--batch", default=32, show_default=True, help="images per task")
@click.option("--window", default=8, show_default=True, help="batches in flight at once")
@click.option(
    "--snapshot-every",
    default=100_000,
    show_default=True,
    help="snapshot the new version's gallery (each shard) after this many images; always at the end",
)
@click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")
def gallery_reindex(engine: str, batch: int, window: int, snapshot_every: int, actor: str | None) -> None:
    """Rebuild ENGINE's templates from the stored gallery images with the engine version its reindex
    workers run (`quorum worker ENGINE --reindex`), shard by shard, while searches go on with the old
    version. Run it again to resume (and, before switching the search workers, to take in images
    enrolled since): what is done is skipped. Audited."""
    import time

    from ..gallery.reindex import reindex
    from ..gallery.versions import GalleryRefused, gallery_items

    s = settings()
    require_redis(s.redis_url)

    total = len(gallery_items(connect(s.redis_url)))
    bar = tqdm_bar(f"reindexing {engine} (images)", total)
    t0, last = time.monotonic(), [0.0]

    def progress(done: int, of: int) -> None:
        bar(done)
        now = time.monotonic()
        if now - last[0] >= 10 or done == of:  # a line in the log too, for runs without a terminal
            last[0] = now
            click.echo(f"  {done}/{of} images ({done / max(now - t0, 1e-9):.1f} images/s)", err=True)

    try:
        report = reindex(
            s,
            engine,
            batch=batch,
            window=window,
            snapshot_every=snapshot_every,
            progress=progress,
            actor=operator_name(actor),
        )
    except GalleryRefused as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"{engine} reindexed to {report.version}: {report.images} images, {report.enrolled} templates written, "
        f"{report.skipped} done by an earlier run, {report.held} held already, "
        f"{report.expunged_meanwhile} of subjects expunged meanwhile, {len(report.failed)} failed "
        f"in {report.seconds:.1f}s ({report.images_per_s:.1f} images/s)"
    )
    for f in report.failed[:20]:
        click.echo(f"  failed: {f['subject_id']} {f['image_key']} {f['code']}")
    for p in report.snapshots:
        click.echo(f"  snapshot shard {p['shard']}/{p['shards']}: {p['templates']} templates -> {p['index_key']}")
    print_gallery_status(s, engines=[engine])


def print_gallery_status(s, engines: list[str] | None = None) -> None:
    """Per engine, the versions present: templates, log entries, snapshots, and the live workers of each
    (searching, shard, reindex): an engine upgrade in progress shows two versions."""
    from ..core.objectstore import open_store
    from ..gallery.versions import gallery_status

    for e in gallery_status(s, open_store(s)):
        if engines and e["engine"] not in engines:
            continue
        shards = f" ({e['shards']} shards)" if e["shards"] > 1 else ""
        click.echo(f"gallery {e['engine']}{shards}:" + ("" if e["versions"] else " empty"))
        if e.get("reshard"):
            rs = e["reshard"]
            built = sorted(int(k.split(":")[1]) for k in rs if k.startswith("done:"))
            click.echo(f"  resharding {rs['layout'].replace(':', ' -> ')} ({rs['version']}): new shards built {built}")
        for v in e["versions"]:
            snaps = ", ".join(f"shard {x['shard']} {x['templates']} at {x['created_at']}" for x in v["snapshots"])
            workers = [
                f"{v[k]} {what}"
                for k, what in (
                    ("searching_workers", "searching"),
                    ("shard_workers", "shard"),
                    ("reindex_workers", "reindex"),
                )
                if v[k]
            ]
            click.echo(
                f"  {v['version']}: {v['templates']} templates, {v['log_entries']} log entries; "
                f"snapshots: {snaps or 'none'}; workers: {', '.join(workers) or 'none'}"
            )


@gallery.command("status")
def gallery_status_cmd() -> None:
    """Per engine: the versions its gallery holds (templates, log entries, snapshots) and which versions
    the live workers run (searching, per shard, reindexing)."""
    s = settings()
    require_redis(s.redis_url)
    print_gallery_status(s)


@gallery.command("drop-version")
@click.argument("engine")
@click.argument("version")
@click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")
def gallery_drop_version(engine: str, version: str, actor: str | None) -> None:
    """Delete ENGINE's gallery state of VERSION (logs, snapshots, enrolment marks) once no worker runs it:
    the last step of an engine upgrade (audited)."""
    from ..core.objectstore import open_store
    from ..gallery.versions import GalleryRefused, drop_version

    s = settings()
    require_redis(s.redis_url)
    try:
        click.echo(json.dumps(drop_version(s, open_store(s), engine, version, actor=operator_name(actor))))
    except GalleryRefused as err:
        raise click.ClickException(str(err)) from None


@gallery.command("reshard")
@click.argument("engine")
@click.option("--shards", type=int, default=None, help="the new shard count (to begin or resume a reshard)")
@click.option("--finish", "step", flag_value="finish", help="after the switch: drop the old layout")
@click.option("--abort", "step", flag_value="abort", help="give the reshard up: drop the new layout")
@click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")
def gallery_reshard(engine: str, shards: int | None, step: str | None, actor: str | None) -> None:
    """Build a new shard layout of ENGINE's gallery from the templates it holds (no image is embedded
    again) while the old layout serves; then set QUORUM_SHARDS=ENGINE=N, restart the engine's workers and
    start the new shards' workers, and run it with --finish. Resumable; audited (deploy/README.md
    "Resharding")."""
    from ..core.objectstore import open_store
    from ..gallery import reshard
    from ..gallery.versions import GalleryRefused

    s = settings()
    require_redis(s.redis_url)
    who = operator_name(actor)
    try:
        if step:
            if shards is not None:
                raise click.UsageError(f"--{step} takes no --shards")
            done = (reshard.finish if step == "finish" else reshard.abort)(s, open_store(s), engine, actor=who)
            click.echo(json.dumps(done))
            return
        if shards is None:
            raise click.UsageError("give --shards N (or --finish / --abort for a reshard in progress)")
        state = reshard.begin(s, engine, shards, actor=who)
        bar = tqdm_bar(f"resharding {engine} (new shards)", shards)
        report = reshard.build(s, open_store(s), engine, progress=lambda done, _of: bar(done), actor=who)
    except GalleryRefused as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"{engine} {report.version}: {report.old} -> {report.new} shards built in {report.seconds:.1f}s "
        f"({len(report.skipped)} built by an earlier run; {report.dropped_no_record} templates of subjects "
        f"expunged meanwhile left out); writes go to both layouts since {state['started_at']}"
    )
    for b in report.built:
        click.echo(f"  shard {b['shard']}/{report.new}: {b['templates']} templates, {b['subjects']} subjects")
    click.echo(
        f"next: set QUORUM_SHARDS={engine}={report.new}, restart {engine}'s workers and start its new shard workers "
        f"(quorum worker {engine} --shard I/{report.new}), then: quorum gallery reshard {engine} --finish"
    )


@gallery.command("migrate-keys")
def gallery_migrate_keys() -> None:
    """Once, when upgrading Quorum to the release that keeps gallery state per engine version: move each
    configured engine's log and snapshot pointer to its version's names (before the new workers start;
    idempotent)."""

    from ..core.objectstore import open_store
    from ..workers.replica import migrate_unversioned

    s = settings()
    require_redis(s.redis_url)
    r, store = connect(s.redis_url), open_store(s)
    for engine in s.engines:
        click.echo(json.dumps(migrate_unversioned(r, store, engine, s.shards_of(engine))))


COMMANDS = (enroll, gallery)
