"""``quorum demo``: the whole job on real faces, end to end through the queue.

Starts the local stack, enrols the gallery and distractors of ``<data>/ci/split.csv``, searches every
probe and unknown probe through the agency intake stream, prints each engine's and the fused rank-1
hit rate and what unknown probes scored, then stops the stack.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..accountability.registry import DEMO_AGENCY, DEMO_USER, provision_demo
from ..core.config import settings
from ..evaluation.ci_split import Scorecard, SplitRow, format_scorecard, score_results
from .common import redacted, stack_failures, tqdm_bar

__all__ = ["demo", "enrol_and_search"]


@click.command("demo")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="labelled faces (default: QUORUM_DATA_DIR or ../shared/data); uses its ci/ split",
)
@click.option("--keep-running", is_flag=True, help="leave the stack up afterwards")
def demo(data: Path | None, keep_running: bool) -> None:
    """Start the stack, enrol the ci gallery, search every probe through the queue, print hit rates."""
    from ..evaluation.ci_split import read_split
    from .stack import Stack

    s = settings()
    ci = (data or s.shared_data()) / "ci"
    if not (ci / "split.csv").exists():
        raise click.ClickException(f"no split.csv under {ci}; set QUORUM_DATA_DIR or pass --data")
    stack = Stack(s)
    click.echo(f"[1/4] starting the stack under {s.home} (redis {redacted(s.redis_url)}, store: {s.store_kind}) ...")
    t0 = time.monotonic()
    with stack_failures():
        stack.up()
    s = stack.s  # logged in as the admin user when the stack started its own Redis (core.local_redis)
    try:
        enrol_and_search(s, read_split(ci), echo=click.echo, bar_factory=tqdm_bar)
        click.echo(f"total {time.monotonic() - t0:.0f}s")
    finally:
        if not keep_running:
            stack.down()
            click.echo("stack stopped")


COMMANDS = (demo,)


def enrol_and_search(s, rows: list[SplitRow], *, echo=print, bar_factory=None) -> tuple[Scorecard, dict]:
    """Enrol the split's gallery and distractors, search its probes through the queue, score them.

    The stack must be up. Returns the scorecard and timings/enrolment figures.
    """
    from ..broker.client import QuorumClient
    from ..core.objectstore import open_store
    from ..gallery.enrol import enrol

    bar_factory = bar_factory or (lambda label, total: None)
    gallery_rows = [r for r in rows if r.role in {"gallery", "distractor_gallery"}]
    echo(f"[2/4] enrolling {len(gallery_rows)} gallery images into {len(s.engines)} engines ...")
    bar = bar_factory("enrolling (images)", len(gallery_rows))
    report = enrol(
        s,
        open_store(s),
        [(r.identity, r.path) for r in gallery_rows],
        progress=(lambda done, total: bar(done)) if bar else None,
    )
    echo(
        f"      templates added {report.enrolled}, failed to enrol "
        f"{ {e: len(f) for e, f in report.failed.items()} } ({report.seconds:.0f}s)"
    )
    probes = [r for r in rows if r.role in {"probe", "unknown_probe"}]
    echo(f"[3/4] searching {len(probes)} probes through the queue ...")
    client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, provision_demo(s))
    truth: dict[str, str | None] = {}
    t1 = time.monotonic()
    for r in probes:
        rid = client.submit(r.path, case_number="DEMO-0001", offence_code="DEMO", purpose="demo")
        truth[rid] = r.identity if r.role == "probe" else None
    bar = bar_factory("searching (probes answered)", len(truth))
    results = client.wait_all(list(truth), timeout=3600, progress=bar)
    elapsed = time.monotonic() - t1
    card = score_results(truth, results, s.engines)
    echo(f"[4/4] results ({len(probes) / elapsed:.1f} searches/s through the queue):")
    echo(format_scorecard(card, s.engines))
    return card, {"enrol": report, "search_seconds": elapsed, "results": results, "truth": truth}
