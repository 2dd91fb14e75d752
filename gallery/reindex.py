"""Reindex (``quorum gallery reindex``): one engine's templates rebuilt from the stored images for the
engine version its reindex workers run, into that version's own logs, reusing enrolment's resumable
batch loop (``gallery.batches``), while the workers of the current version go on searching theirs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from celery.result import AsyncResult

from ..accountability import audit
from ..broker import keys
from ..broker.app import TASK_ENROL, make_app, reindex_queue
from ..broker.redis_errors import connect
from ..core.config import Settings
from ..workers.replica import enrolled_member
from .batches import run_batches
from .items import EnrolItem, enrol_job_id
from .versions import GalleryRefused, gallery_items, live_versions, snapshot_version

log = structlog.get_logger()


@dataclass
class ReindexReport:
    engine: str
    version: str  # the version the reindex workers embed with
    images: int = 0
    enrolled: int = 0  # templates written to the new version's log by this run
    skipped: int = 0  # images a previous run of the same job finished (the job's bitmap)
    held: int = 0  # images the new version held already (a run of another job, e.g. before an expunge)
    expunged_meanwhile: int = 0  # images whose subject was expunged while they were being embedded
    failed: list[dict] = field(default_factory=list)  # [{subject_id, image_key, code}]
    seconds: float = 0.0
    snapshots: list[dict] = field(default_factory=list)  # the new version's snapshot pointers (one a shard)
    job_id: str = ""

    @property
    def images_per_s(self) -> float:
        """Images this run sent to be embedded (not those skipped or held already), per second of the
        whole run (final snapshot included)."""
        return (self.images - self.skipped - self.held) / max(self.seconds, 1e-9)


def reindex(
    s: Settings,
    engine: str,
    *,
    batch: int = 32,
    window: int = 8,
    snapshot_every: int = 0,
    timeout: float = 24 * 3600.0,
    progress: Callable[[int, int], None] | None = None,
    actor: str = "operator",
) -> ReindexReport:
    """Rebuild one engine's templates from the gallery's stored images with the engine version that its
    reindex workers run (``quorum worker ENGINE --reindex``), into that version's own logs (one per
    shard), while the workers of the current version go on searching theirs.

    The images are those of the subjects' records (``keys.GALLERY_SUBJECTS``), sent in batches to the
    reindex queue (``broker.app.reindex_queue``), where the reindex workers find each face and embed it
    (nothing is embedded here). Resumable as bulk enrolment is (:func:`run_batches`: the job's bitmap),
    and the workers skip what the new version holds. An add is written only while its subject's record
    exists, so an expunge during the reindex wins. Snapshots of the new version (each shard) are
    written by a reindex worker after about every ``snapshot_every`` images and at the end. Audited
    (``gallery.reindex``) at the start and at the end."""
    if engine not in s.engines:
        raise GalleryRefused(f"{engine} is not a configured engine ({', '.join(s.engines)})")
    if connect(s.redis_url).exists(keys.gallery_reshard(engine)):
        raise GalleryRefused(f"{engine} is being resharded: finish or abort it first (quorum gallery reshard)")
    t0 = time.monotonic()
    run = _Reindex(s, engine, actor)
    run.report.skipped, _ = run_batches(
        run.r,
        run.report.job_id,
        run.items,
        dispatch=run.dispatch,
        absorb=run.absorb,
        batch=batch,
        window=window,
        deadline=time.monotonic() + timeout,
        progress=progress,
        snapshot=run.snapshot if snapshot_every else None,
        snapshot_every=snapshot_every,
        final_snapshot=False,  # the one below, waited for
    )
    run.report.snapshots = snapshot_version(run.app, engine, run.shards, run.queue, wait=True, timeout=timeout)
    run.report.seconds = time.monotonic() - t0
    run.record_done()
    return run.report


def reindex_version(r, engine: str) -> tuple[str, dict[str, str]]:
    """The one engine version the live reindex workers of ``engine`` run, and those workers; refused
    with what to do when none runs, or several versions do."""
    workers = live_versions(r, "reindex", engine)
    versions = sorted(set(workers.values()))
    if len(versions) != 1:
        found = "no reindex worker is running" if not versions else f"reindex workers run versions {versions}"
        raise GalleryRefused(
            f"reindex of {engine}: {found}: start `quorum worker {engine} --reindex` with the new engine version "
            "(one version only)",
        )
    return versions[0], workers


class _Reindex:
    """One reindex run: what it sends to the reindex workers and what it takes back from them."""

    def __init__(self, s: Settings, engine: str, actor: str) -> None:
        self.s, self.engine, self.actor = s, engine, actor
        self.r = connect(s.redis_url)
        self.app = make_app(s.redis_url)
        self.version, workers = reindex_version(self.r, engine)
        self.items = gallery_items(self.r)
        job_items = [EnrolItem(sj, key=k) for sj, k in self.items]
        job = enrol_job_id(job_items, [f"reindex:{engine}@{keys.version_slug(self.version)}"])
        self.report = ReindexReport(engine=engine, version=self.version, images=len(self.items), job_id=job)
        self.shards = s.shards_of(engine)
        self.queue = reindex_queue(engine)
        self.details = {
            "engine": engine,
            "version": self.version,
            "shards": self.shards,
            "job": job,
            "reindex_workers": len(workers),
        }
        started = audit.AuditEvent(
            action=audit.GALLERY_REINDEX,
            outcome="started",
            actor=actor,
            details={**self.details, "images": len(self.items)},
        )
        audit.record(s, started)

    def dispatch(self, chunk: list[tuple[int, tuple[str, str]]]) -> dict[str, AsyncResult]:
        # What the new version holds already (an earlier run of another job: the gallery changed since)
        # is not sent; the workers check again before embedding.
        members = [enrolled_member(sj, k, self.version) for _, (sj, k) in chunk]
        held = self.r.smismember(keys.gallery_enrolled(self.engine), members)
        payload = [{"subject_id": sj, "image_key": k} for (_, (sj, k)), h in zip(chunk, held, strict=True) if not h]
        self.report.held += len(chunk) - len(payload)
        if not payload:
            return {}
        kwargs = {"engine": self.engine, "items": payload}
        return {"enrol": self.app.send_task(TASK_ENROL, kwargs=kwargs, queue=self.queue)}

    def absorb(self, _: str, out: dict) -> None:
        if out.get("version") != self.version:
            raise GalleryRefused(f"a reindex worker embedded with {out.get('version')}, not {self.version}: stopped")
        report = self.report
        report.enrolled += out["enrolled"]
        report.held += out["skipped"]
        report.expunged_meanwhile += out.get("expunged_meanwhile", 0)
        report.failed.extend(out["failed"])

    def snapshot(self) -> None:
        self.report.snapshots = snapshot_version(self.app, self.engine, self.shards, self.queue, wait=False)

    def record_done(self) -> None:
        """The run, audited (``gallery.reindex``) and logged."""
        report = self.report
        details = {
            **self.details,
            "images": report.images,
            "enrolled": report.enrolled,
            "skipped_as_done": report.skipped,
            "held_already": report.held,
            "expunged_meanwhile": report.expunged_meanwhile,
            "failed": len(report.failed),
            "seconds": round(report.seconds, 1),
            "snapshots": [p["index_key"] for p in report.snapshots],
        }
        audit.record(
            self.s, audit.AuditEvent(action=audit.GALLERY_REINDEX, outcome="ok", actor=self.actor, details=details)
        )
        log.info(
            "gallery.reindexed",
            engine=self.engine,
            version=self.version,
            images=report.images,
            enrolled=report.enrolled,
            skipped=report.skipped,
            failed=len(report.failed),
            seconds=round(report.seconds, 1),
            images_per_s=round(report.images_per_s, 1),
        )
