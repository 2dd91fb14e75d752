"""Enrolment and gallery maintenance: find each gallery image's face once, embed it with each engine and
append the templates to the engine's gallery log; snapshot galleries (which trims their logs).

Operator-side enrolment (``quorum.gallery``) sends batches to the ``enrol`` queue, where
:func:`enrol_detect` finds each face once and sends it to every engine's :func:`enrol`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np

from ...broker import keys
from ...broker.app import TASK_ENROL, TASK_SNAPSHOT, engine_queue, shard_queue
from ...core.errors import QuorumError
from ..detect import choose_face
from ..faces import Face
from ..replica import enrolled_member, log_add_entries
from .context import Outcome, Send, StageContext, StageResult
from .search import embed_faces


def _gallery_face(ctx: StageContext, image: np.ndarray) -> Face:
    """The face a gallery image is enrolled with: the largest, big enough (raises its code if none)."""
    return choose_face(ctx.detect(image), None, min_face_pixels=ctx.settings.min_face_pixels)[1]


def enrol_detect(
    ctx: StageContext, *, items: Sequence[dict], engines: Sequence[str], task_ids: dict[str, str]
) -> StageResult:
    """Find the face in each gallery image once, for every engine, and hand the faces to each engine's
    enrolment (task ids chosen by the sender, who waits on them). An image without a usable face is
    reported to every engine with its code; nothing raises on input."""
    faced: list[dict] = []
    failed: list[dict] = []
    for item in items:
        try:
            faced.append({**item, "face": _gallery_face(ctx, ctx.load_image(item["image_key"])).to_dict()})
        except QuorumError as err:
            failed.append({"subject_id": item["subject_id"], "image_key": item["image_key"], "code": err.code.value})
    send = tuple(
        Send(TASK_ENROL, {"engine": e, "items": faced, "failed": failed}, engine_queue(e), task_ids[e]) for e in engines
    )
    return StageResult("enrolment", Outcome.DETECTED, send=send, detail={"faces": len(faced), "failed": len(failed)})


def enrol(ctx: StageContext, *, engine: str, items: Sequence[dict], failed: Sequence[dict] = ()) -> StageResult:
    """Embed gallery images and append them to the engine's gallery log.

    ``items``: ``[{"subject_id": ..., "image_key": ..., "face": {...}}]``; an item with its ``face``
    (found once for every engine by :func:`enrol_detect`) is not detected again here. ``failed``: the
    items detection refused, reported with this engine's counts. ``detail`` holds the counts and, per
    image that could not be enrolled, its stable error code (failure to enrol is data, not an exception).
    """
    r, s = ctx.redis, ctx.settings
    eng = ctx.engine(engine)
    done_key = keys.gallery_enrolled(engine)
    failures: list[dict] = list(failed)
    todo: list[tuple[str, str, np.ndarray, Face]] = []
    detected_here = skipped = 0
    for item in items:
        subject, key = item["subject_id"], item["image_key"]
        if r.sismember(done_key, enrolled_member(subject, key, eng.version)):
            skipped += 1
            continue
        try:
            image = ctx.load_image(key)
            if item.get("face"):
                face = Face.from_dict(item["face"])
            else:
                face = _gallery_face(ctx, image)
                detected_here += 1
            todo.append((subject, key, image, face))
        except QuorumError as err:
            failures.append({"subject_id": subject, "image_key": key, "code": err.code.value})
    vectors = embed_faces(ctx, engine, [(img, face) for _, _, img, face in todo])
    subjects = [t[0] for t in todo]
    images = [t[1] for t in todo]
    # Marks each template in done_key too, and leaves out a subject expunged meanwhile (one Lua script).
    written = log_add_entries(r, engine, eng.version, subjects, vectors, images, shards=s.shards_of(engine))
    counts = {
        "engine": engine,
        "version": eng.version,
        "enrolled": len(written),
        "expunged_meanwhile": len(todo) - len(written),
        "skipped": skipped,
        "failed": failures,
        "detected_here": detected_here,
    }
    return StageResult("enrolment", Outcome.DONE, detail=counts)


def snapshot(ctx: StageContext, *, engines: Sequence[str] | None = None, shard: int | None = None) -> StageResult:
    """Snapshot galleries and trim their logs. On the gallery queue (``shard=None``): each unsharded
    engine's gallery here, and for a sharded engine one snapshot message to each of its shards' queues
    (``detail["sent"]``: their task ids), so each is written by a worker that holds that shard and the
    gallery worker never loads a sharded gallery. On a shard's queue: that shard."""
    s = ctx.settings
    names = list(engines or s.engines)
    if shard is not None:
        (engine,) = names
        return StageResult("gallery", Outcome.DONE, detail={"snapshots": [ctx.replica(engine, shard).save_snapshot()]})
    pointers = [ctx.replica(e).save_snapshot() for e in names if s.shards_of(e) == 1]
    send = tuple(
        Send(
            TASK_SNAPSHOT,
            {"engines": [e], "shard": i},
            shard_queue(e, i, s.shards_of(e)),
            f"snapshot.{e}.{i}of{s.shards_of(e)}.{uuid.uuid4().hex[:12]}",
        )
        for e in names
        if s.shards_of(e) > 1
        for i in range(s.shards_of(e))
    )
    detail = {"snapshots": pointers, "sent": [m.task_id for m in send]}
    return StageResult("gallery", Outcome.DONE, send=send, detail=detail)
