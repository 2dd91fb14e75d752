"""``quorum eval --via-queue``: the protocol through a running stack (``quorum up``), end to end.

Enrols the gallery through the enrolment worker and searches every probe through the broker, so the
outcome is the stack's configured fusion as deployed (the broker, stack and schemas are imported lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .runs import Outcome

if TYPE_CHECKING:
    from .runs import Run


def queue_outcome(
    run: Run, *, timeout: float = 24 * 3600.0, progress: bool = True, echo: Callable[[str], None] = lambda m: None
) -> tuple[Outcome, dict]:
    """Enrol the protocol's gallery into the running stack and search every probe through the queue.

    Uses the stack's configured fusion (``settings().fusion_method``). The stack's gallery should
    hold nothing else: enrol into a dedicated stack (e.g. ``QUORUM_HOME=/tmp/evalstack quorum up``)."""
    from ..accountability.registry import DEMO_AGENCY, DEMO_USER, provision_demo
    from ..broker.client import QuorumClient
    from ..core.config import settings
    from ..core.objectstore import open_store
    from ..gallery.enrol import enrol
    from ..schemas.messages import ErrorResult

    s = settings()
    p = run.protocol
    echo(f"enrolling {len(p.gallery)} gallery images through the queue ...")
    rep = enrol(s, open_store(s), [(im.identity, im.path) for im in p.gallery])
    client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, provision_demo(s))
    probes = run.probes
    echo(f"searching {len(probes)} probes through the queue ...")
    rids = [
        client.submit(im.path, case_number="EVAL-0001", offence_code="DEMO", purpose="demo", candidates=run.top_n)
        for im in probes
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rids), desc="queue", unit="probe", mininterval=2.0, leave=False)
    last = [0]

    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n - last[0])
            last[0] = n

    results = client.wait_all(rids, timeout=timeout, progress=tick)
    if bar is not None:
        bar.close()
    nm = len(p.mated)
    ranks = np.zeros(nm, dtype=np.int64)
    scores = np.full(nm, np.nan)
    top = np.full(len(p.nonmated), np.nan)
    errors: dict[str, int] = {}
    degraded = 0
    methods: set[str] = set()
    for i, rid in enumerate(rids):
        res = results[rid]
        if isinstance(res, ErrorResult):
            errors[res.code] = errors.get(res.code, 0) + 1
            continue
        degraded += int(res.degraded)
        methods.add(res.fusion_method)
        if i < nm:
            for c in res.candidates:
                if c.subject_id == p.mated[i].identity:
                    ranks[i], scores[i] = c.rank, c.fused_score
                    break
        elif res.candidates:
            top[i - nm] = res.candidates[0].fused_score
    info = {
        "enrolled": rep.enrolled,
        "failed_to_enrol": {e: len(f) for e, f in rep.failed.items()},
        "errors": errors,
        "degraded": degraded,
        "fusion_methods": sorted(methods),
    }
    return Outcome(ranks, scores, top), info
