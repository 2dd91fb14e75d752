"""The candidate sheet of one finished search: what it shows, built from plain values (pure).

:func:`build` turns a candidate list and what is known around it (who searched and why, the probe's
faces, the candidates' thumbnails, the subjects removed since) into a :class:`Sheet`; unit tests call it
with plain values. ``review.gather`` finds those values for a request id, ``review.render`` renders the
sheet as HTML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from ..schemas import CandidateList, FusedCandidate
from ..schemas.case import CaseContext
from ..schemas.messages import MAX_CANDIDATES
from .bands import Band, Bands

log = structlog.get_logger()

NOTICE_SHORT = "Investigative lead only — not an identification"
SECTION_SIZE = 25  # candidates per section of the sheet
# Ranks "far apart": the highest rank at least RANK_GAP places below the lowest, and at least twice it
# (1 and 11 are far apart; 120 and 135 are not).
RANK_GAP = 10


@dataclass(frozen=True)
class EngineCell:
    engine: str
    rank: int | None  # None: not in this engine's list
    score: float | None


@dataclass(frozen=True)
class CandidateView:
    rank: int
    removed: bool
    subject_id: str | None = None
    fused_score: float | None = None
    band: Band | None = None
    cells: tuple[EngineCell, ...] = ()
    agree: bool = True
    cues: tuple[str, ...] = ()  # where the engines disagree, in words
    thumb: str | None = None  # data: URI
    images: int = 0  # images enrolled for the subject
    booking: str = ""  # the shown photo's booking date and number, when the booking system gave them


@dataclass(frozen=True)
class FaceBox:
    index: int
    box: tuple[float, float, float, float]
    searched: bool
    too_small: bool


@dataclass(frozen=True)
class Section:
    first: int
    last: int
    candidates: tuple[CandidateView, ...]

    @property
    def anchor(self) -> str:
        return f"ranks-{self.first}-{self.last}"


@dataclass(frozen=True)
class Sheet:
    case: CaseContext  # who searched, for which case and why (the audit trail's submission)
    submitted_at: str
    answered_at: str
    fusion_method: str
    engines: tuple[str, ...]
    engines_failed: Mapping[str, str]
    degraded: bool
    notice: str
    probe_uri: str | None
    probe_size: tuple[int, int] | None  # width, height of the decoded probe
    probe_note: str
    faces: tuple[FaceBox, ...]
    faces_found: int
    face_index: int
    chosen_by: str
    sections: tuple[Section, ...]
    candidates: int
    removed: int
    bands: Bands | None
    bands_note: str
    generated_at: str
    generated_by: str
    notice_short: str = NOTICE_SHORT


def agreement(hits: Mapping[str, tuple[int, float]], engines: Sequence[str], list_length: int) -> tuple[str, ...]:
    """Where the engines that answered disagree about one candidate, in words (empty: they agree)."""
    cues = []
    missing = [e for e in engines if e not in hits]
    if missing:
        cues.append(f"not in {', '.join(missing)}'s top {list_length}")
    if len(hits) >= 2:
        (lo_e, (lo, _)), (hi_e, (hi, _)) = (
            min(hits.items(), key=lambda kv: kv[1][0]),
            max(hits.items(), key=lambda kv: kv[1][0]),
        )
        if hi - lo >= RANK_GAP and hi >= 2 * lo:
            cues.append(f"ranks far apart: {lo_e} #{lo}, {hi_e} #{hi}")
    return tuple(cues)


def _candidate(
    c: FusedCandidate,
    engines: Sequence[str],
    list_length: int,
    *,
    removed: bool,
    thumb: str | None,
    images: int,
    bands: Bands | None,
    method: str,
    booking: str = "",
) -> CandidateView:
    if removed:
        return CandidateView(rank=c.rank, removed=True)
    hits = {e: (h.rank, h.score) for e, h in c.engines.items()}
    cues = agreement(hits, engines, list_length)
    return CandidateView(
        rank=c.rank,
        removed=False,
        subject_id=c.subject_id,
        fused_score=c.fused_score,
        band=bands.band_for(c.fused_score, method) if bands else None,
        cells=tuple(EngineCell(e, *hits.get(e, (None, None))) for e in engines),
        agree=not cues,
        cues=cues,
        thumb=thumb,
        images=images,
        booking=booking,
    )


def build(
    result: CandidateList,
    *,
    case: CaseContext,
    submitted_at: str,
    probe_uri: str | None,
    probe_size: tuple[int, int] | None,
    probe_note: str = "",
    faces: Sequence[tuple[float, float, float, float]] = (),
    min_face_pixels: int = 0,
    removed: frozenset[str] = frozenset(),
    thumbs: Mapping[str, str | None] | None = None,
    images: Mapping[str, int] | None = None,
    bookings: Mapping[str, str] | None = None,
    bands: Bands | None = None,
    bands_note: str = "",
    list_length: int = MAX_CANDIDATES,
    generated_by: str = "",
    now: datetime | None = None,
) -> Sheet:
    """The sheet of ``result`` (pure). ``faces``: every box found in the probe, largest first."""
    thumbs, images = thumbs or {}, images or {}
    engines = tuple(result.engines_contributed)
    views = [
        _candidate(
            c,
            engines,
            list_length,
            removed=c.subject_id in removed,
            thumb=thumbs.get(c.subject_id),
            images=images.get(c.subject_id, 0),
            booking=(bookings or {}).get(c.subject_id, ""),
            bands=bands,
            method=result.fusion_method,
        )
        for c in sorted(result.candidates, key=lambda c: c.rank)
    ]
    sections = tuple(
        Section(chunk[0].rank, chunk[-1].rank, tuple(chunk))
        for chunk in (views[i : i + SECTION_SIZE] for i in range(0, len(views), SECTION_SIZE))
    )
    boxes = list(faces) or [result.face.box]
    face_boxes = tuple(
        FaceBox(
            index=i,
            box=tuple(float(v) for v in b),  # type: ignore[arg-type]
            searched=i == result.face.index,
            too_small=min(b[2], b[3]) < min_face_pixels,
        )
        for i, b in enumerate(boxes)
    )
    if faces and result.face.index < len(face_boxes):
        # The box intake searched is the authority for the searched face (same detector, same pixels).
        fb = face_boxes[result.face.index]
        face_boxes = (
            *face_boxes[: fb.index],
            FaceBox(fb.index, tuple(result.face.box), True, False),  # type: ignore[arg-type]
            *face_boxes[fb.index + 1 :],
        )
    if bands is None:
        note = bands_note or "no strength bands: none are measured"
    elif result.fusion_method != bands.method:
        note = (
            f"no strength bands: this list was fused with {result.fusion_method!r}; "
            f"bands are measured for {bands.method!r} only"
        )
    else:
        note = bands_note
    now = now or datetime.now(UTC)
    return Sheet(
        case=case,
        submitted_at=submitted_at,
        answered_at=result.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        fusion_method=result.fusion_method,
        engines=engines,
        engines_failed=dict(result.engines_failed),
        degraded=result.degraded,
        notice=result.notice,
        probe_uri=probe_uri,
        probe_size=probe_size,
        probe_note=probe_note,
        faces=face_boxes,
        faces_found=result.face.faces_found,
        face_index=result.face.index,
        chosen_by=result.face.chosen_by,
        sections=sections,
        candidates=len(views),
        removed=sum(v.removed for v in views),
        bands=bands if bands is not None and result.fusion_method == bands.method else None,
        bands_note=note,
        generated_at=now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        generated_by=generated_by,
    )
