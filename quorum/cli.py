"""The ``quorum`` command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from quorum.config import settings
from quorum.logging import configure_logging

from quorum.demo import DEMO_AGENCY as DEFAULT_AGENCY
from quorum.demo import DEMO_USER as DEFAULT_USER


@click.group()
def main() -> None:
    """Quorum: multi-engine face search. Every candidate list is an investigative lead only."""
    s = settings()
    configure_logging(s.log_level, s.log_json)


# ---- processes ----------------------------------------------------------------------------------

@main.command()
def gateway() -> None:
    """Run the gateway (reads agencies' intake streams)."""
    from workers.serve import run_gateway

    run_gateway()


@main.command()
@click.argument("role", type=click.Choice(["intake", "sface", "dlib", "facenet", "fusion", "gallery"]))
def worker(role: str) -> None:
    """Run a Celery worker for ROLE's queue."""
    from workers.serve import run_worker

    run_worker(role)


@main.command()
@click.option("--metrics-base", default=0, show_default=True,
              help="serve each process's /metrics on consecutive ports from here (0: none)")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for every worker")
def up(metrics_base: int, timeout: float) -> None:
    """Start the local stack (Redis, gateway, one worker per queue) in the background."""
    from quorum.stack import Stack

    s = settings()
    click.echo(f"starting Quorum under {s.home} (redis {s.redis_url}, store: {s.store_kind})")
    Stack(s).up(metrics_base=metrics_base, timeout=timeout)
    click.echo("ready")


@main.command()
def down() -> None:
    """Stop what `quorum up` started."""
    from quorum.stack import Stack

    stopped = Stack(settings()).down()
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@main.command()
def status() -> None:
    """Processes, queues and gallery sizes."""
    import redis as redis_lib

    from broker import keys
    from broker.app import ALL_QUEUES
    from quorum.stack import Stack

    s = settings()
    for name, state in Stack(s).status().items():
        click.echo(f"{name:<10} {state}")
    try:
        r = redis_lib.Redis.from_url(s.redis_url, socket_connect_timeout=1)
        click.echo("queues:   " + "  ".join(f"{q}={r.llen(q)}" for q in ALL_QUEUES))
        click.echo(f"subjects: {r.hlen(keys.GALLERY_SUBJECTS)}")
        click.echo("gallery log entries: " + "  ".join(f"{e}={r.xlen(keys.gallery_log(e))}" for e in s.engines))
    except redis_lib.RedisError as exc:
        click.echo(f"redis: unreachable ({exc})")


# ---- gallery ------------------------------------------------------------------------------------

def _tqdm_bar(label: str, total: int, unit: str = "img"):
    """A progress callback ``update(done)`` drawing a bar on stderr; closes itself when complete."""
    from tqdm import tqdm

    bar = tqdm(desc=label, total=total, unit=unit, file=sys.stderr)

    def update(done: int) -> None:
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", default=16, show_default=True)
def enroll(folder: Path, batch: int) -> None:
    """Enrol FOLDER/<subject>/<image> into every engine's gallery."""
    from quorum.galleryadmin import enrol, folder_items
    from quorum.objectstore import open_store

    s = settings()
    items = folder_items(folder)
    bar = _tqdm_bar("enrolling (image x engine)", len(items) * len(s.engines))
    report = enrol(s, open_store(s), items, batch=batch, progress=lambda done, total: bar(done))
    click.echo(f"{report.images} images; templates added: {report.enrolled}; "
               f"failed to enrol: { {e: len(f) for e, f in report.failed.items()} } in {report.seconds:.1f}s")


@main.group()
def gallery() -> None:
    """Gallery maintenance."""


@gallery.command("snapshot")
def gallery_snapshot() -> None:
    """Write every engine's index to the object store (workers load it at start)."""
    from broker.app import GALLERY_QUEUE, make_app

    res = make_app(settings().redis_url).send_task("quorum.gallery.snapshot", queue=GALLERY_QUEUE)
    for p in res.get(timeout=600):
        click.echo(f"{p['engine']}: {p['templates']} templates, {p['subjects']} subjects -> {p['index_key']}")


@gallery.command("expunge")
@click.argument("subject")
@click.option("--reason", required=True, help="why (court order, no charge filed, ...)")
@click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")
def gallery_expunge(subject: str, reason: str, actor: str | None) -> None:
    """Remove SUBJECT from every engine, the object store and the metadata (audited)."""
    from quorum.cli_admin import operator_name
    from quorum.galleryadmin import expunge
    from quorum.objectstore import open_store

    s = settings()
    out = expunge(s, open_store(s), subject, reason=reason, actor=operator_name(actor))
    click.echo(json.dumps(out))


# ---- search -------------------------------------------------------------------------------------

def _print_list(result) -> None:
    from schemas import ErrorResult

    if isinstance(result, ErrorResult):
        click.echo(f"ERROR {result.code}: {result.message}" + (" (retryable)" if result.retryable else ""))
        return
    click.echo(result.notice)
    click.echo(f"request {result.request_id}  case {result.case_number}  fusion {result.fusion_method}  "
               f"engines {','.join(result.engines_contributed)}"
               + (f"  DEGRADED (missing: {result.engines_failed})" if result.degraded else ""))
    f = result.face
    click.echo(f"face {f.index} of {f.faces_found} ({f.chosen_by}), box {tuple(round(v) for v in f.box)}")
    engines = sorted({e for c in result.candidates for e in c.engines})
    click.echo(f"{'rank':>4}  {'subject':<32} {'fused':>8}  " + "  ".join(f"{e + ' rank/score':>18}" for e in engines))
    for c in result.candidates:
        cells = [f"{c.engines[e].rank:>7}/{c.engines[e].score:>+.3f}" if e in c.engines else f"{'-':>18}"
                 for e in engines]
        click.echo(f"{c.rank:>4}  {c.subject_id:<32} {c.fused_score:>8.2f}  " + "  ".join(f"{x:>18}" for x in cells))
    click.echo(result.notice)


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--case", "case_number", required=True)
@click.option("--offence", "offence_code", required=True)
@click.option("--purpose", required=True)
@click.option("--top", default=250, show_default=True, type=click.IntRange(1, 250))
@click.option("--face-index", type=int, default=None, help="which face when there are several (0 = largest)")
@click.option("--agency", default=DEFAULT_AGENCY, show_default=True, envvar="QUORUM_AGENCY")
@click.option("--user", default=DEFAULT_USER, show_default=True, envvar="QUORUM_USER")
@click.option("--secret", default=None, envvar="QUORUM_AGENCY_SECRET",
              help="the agency's signing secret (default: looked up in the local registry)")
@click.option("--timeout", default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result exactly as the schema defines it")
def search(image: Path, case_number: str, offence_code: str, purpose: str, top: int, face_index: int | None,
           agency: str, user: str, secret: str | None, timeout: float, as_json: bool) -> None:
    """Search IMAGE through the queue and print the fused candidate list."""
    from broker.client import QuorumClient

    if secret is None:
        from quorum import db, registry

        secret = registry.agency_secret(db.get_engine(settings()), agency)
    client = QuorumClient(settings().redis_url, agency, user, secret)
    rid = client.submit(image, case_number=case_number, offence_code=offence_code, purpose=purpose,
                        candidates=top, face_index=face_index)
    result = client.wait(rid, timeout=timeout)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        _print_list(result)
    sys.exit(0 if result.type == "candidate_list" else 2)


# ---- the main job -------------------------------------------------------------------------------

@main.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="labelled faces (default: QUORUM_DATA_DIR or ../shared/data); uses its ci/ split")
@click.option("--keep-running", is_flag=True, help="leave the stack up afterwards")
def demo(data: Path | None, keep_running: bool) -> None:
    """Start the stack, enrol the ci gallery, search every probe through the queue, print hit rates."""
    from quorum.demo import enrol_and_search, read_split
    from quorum.stack import Stack

    s = settings()
    ci = (data or s.shared_data()) / "ci"
    if not (ci / "split.csv").exists():
        raise click.ClickException(f"no split.csv under {ci}; set QUORUM_DATA_DIR or pass --data")
    stack = Stack(s)
    click.echo(f"[1/4] starting the stack under {s.home} (redis {s.redis_url}, store: {s.store_kind}) ...")
    t0 = time.monotonic()
    stack.up()
    try:
        enrol_and_search(s, read_split(ci), echo=click.echo, bar_factory=_tqdm_bar)
        click.echo(f"total {time.monotonic() - t0:.0f}s")
    finally:
        if not keep_running:
            stack.down()
            click.echo("stack stopped")


from quorum.cli_admin import ALL_GROUPS  # noqa: E402  (accountability: db, registry, audit, report, ...)

for _group in ALL_GROUPS:
    main.add_command(_group)

from quorum.cli_eval import calibrate_command, eval_command  # noqa: E402
main.add_command(eval_command), main.add_command(calibrate_command)

if __name__ == "__main__":
    main()
