"""``quorum search IMAGE``: one probe through the agency's intake stream, and its candidate list."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..accountability.registry import DEMO_AGENCY as DEFAULT_AGENCY
from ..accountability.registry import DEMO_USER as DEFAULT_USER
from ..core.config import settings
from .common import label_fields

# What to do next, for the refusals a user can fix themselves ({agency}, {user} ... filled in).
NEXT_STEP = {
    "UNKNOWN_AGENCY": "agency {agency!r} is not registered: quorum registry agency add {agency} --name NAME "
    "(it prints the signing secret once)",
    "AGENCY_SUSPENDED": "agency {agency!r} is suspended: quorum registry agency activate {agency}",
    "BAD_SIGNATURE": "the signing secret does not match agency {agency!r}: pass --secret (or QUORUM_AGENCY_SECRET), "
    "or issue a new one with quorum registry agency rotate {agency}",
    "USER_UNKNOWN": "user {user!r} is not registered: quorum registry user add {user} --agency {agency} "
    "--role investigator --cert CERT-ID --cert-expires YYYY-MM-DD",
    "USER_OTHER_AGENCY": "user {user!r} belongs to another agency: pass --agency, or --user for a user of {agency!r}",
    "USER_INACTIVE": "user {user!r} is deactivated: another user must search, or an operator re-registers them",
    "ROLE_NOT_ALLOWED": "user {user!r} has a role that may not search (investigators and supervisors may)",
    "CERTIFICATE_MISSING": "user {user!r} has no face-search training certificate on record: "
    "quorum registry user certify {user} --cert CERT-ID --expires YYYY-MM-DD",
    "CERTIFICATE_EXPIRED": "user {user!r}'s training certificate has expired: "
    "quorum registry user certify {user} --cert CERT-ID --expires YYYY-MM-DD",
    "CASE_NUMBER_MISSING": "every search needs a real case number: --case 2026-001234",
    "CASE_NUMBER_MALFORMED": "--case must be a case number of letters, digits and - / . (e.g. 2026-001234)",
    "OFFENCE_UNKNOWN": "offence {offence!r} is not in the registry: quorum registry offence {offence} "
    "--description TEXT",
    "PURPOSE_NOT_ALLOWED": "purpose {purpose!r} is not allowed (criminal-investigation, missing-person and "
    "victim-identification are); see quorum registry list",
    "QUOTA_EXCEEDED": "agency {agency!r} used its searches for today (UTC): quorum registry agency quota {agency} N",
    "GALLERY_EMPTY": "the gallery is empty: enrol booking photos first with quorum enroll DIR",
    "NO_FACE": "no face was found in the image: use a photo where the face is visible and at least 20 px wide",
    "FACE_INDEX_OUT_OF_RANGE": "--face-index is past the faces found: omit it to search the largest face",
    "NOT_AN_IMAGE": "the file is not a JPEG, PNG, WebP, BMP, TIFF or GIF image",
    "IMAGE_TRUNCATED": "the image file is cut short: copy it again from its source",
}


def next_step(code: str, **context: str) -> str | None:
    hint = NEXT_STEP.get(code)
    return hint.format(**context) if hint else None


def print_list(result: Any, **context: str) -> None:
    """A candidate list (or an error result) as a person reads it."""
    from ..schemas import ErrorResult

    if isinstance(result, ErrorResult):
        click.echo(f"ERROR {result.code}: {result.message}" + (" (retryable)" if result.retryable else ""))
        hint = next_step(result.code, **context)
        if hint:
            click.echo(f"next: {hint}")
        return
    click.echo(result.notice)
    click.echo(
        f"request {result.request_id}  case {result.case_number}  fusion {result.fusion_method}  "
        f"engines {','.join(result.engines_contributed)}"
        + (f"  DEGRADED (missing: {result.engines_failed})" if result.degraded else "")
    )
    f = result.face
    click.echo(f"face {f.index} of {f.faces_found} ({f.chosen_by}), box {tuple(round(v) for v in f.box)}")
    engines = sorted({e for c in result.candidates for e in c.engines})
    click.echo(f"{'rank':>4}  {'subject':<32} {'fused':>8}  " + "  ".join(f"{e + ' rank/score':>18}" for e in engines))
    for c in result.candidates:
        cells = [
            f"{c.engines[e].rank:>7}/{c.engines[e].score:>+.3f}" if e in c.engines else f"{'-':>18}" for e in engines
        ]
        click.echo(f"{c.rank:>4}  {c.subject_id:<32} {c.fused_score:>8.2f}  " + "  ".join(f"{x:>18}" for x in cells))
    click.echo(result.notice)


@click.command("search")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--case",
    "case_number",
    default=None,
    help="the case number (needed; for an ANSI/NIST-ITL IMAGE, read from QUORUM_NIST_CASE_FIELD, 2.010, "
    "when not given)",
)
@click.option(
    "--offence",
    "offence_code",
    default=None,
    help="the offence code (needed; for an ANSI/NIST-ITL IMAGE, read from QUORUM_NIST_OFFENCE_FIELD when "
    "set and not given)",
)
@click.option("--purpose", required=True)
@click.option("--top", default=250, show_default=True, type=click.IntRange(1, 250))
@click.option("--face-index", type=int, default=None, help="which face when there are several (0 = largest)")
@click.option("--agency", default=DEFAULT_AGENCY, show_default=True, envvar="QUORUM_AGENCY")
@click.option("--user", default=DEFAULT_USER, show_default=True, envvar="QUORUM_USER")
@click.option(
    "--secret",
    default=None,
    envvar="QUORUM_AGENCY_SECRET",
    help="the agency's signing secret (default: looked up in the local registry)",
)
@click.option("--timeout", default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result exactly as the schema defines it")
@click.option(
    "--sheet",
    "sheet_out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="also write the candidate sheet (self-contained HTML) to this file",
)
def search(
    image: Path,
    case_number: str | None,
    offence_code: str | None,
    purpose: str,
    top: int,
    face_index: int | None,
    agency: str,
    user: str,
    secret: str | None,
    timeout: float,
    as_json: bool,
    sheet_out: Path | None,
) -> None:
    """Search IMAGE through the queue and print the fused candidate list. IMAGE may be an ANSI/NIST-ITL
    transaction (traditional encoding): its first frontal Type-10 face is the probe."""
    from ..broker.client import QuorumClient
    from ..core.nist import is_transaction

    transaction = is_transaction(image)
    if not transaction and (case_number is None or offence_code is None):
        raise click.UsageError("--case and --offence are needed (a transaction may carry them: see --help)")

    # A ProbeRequest that does not validate is reported under the options the user typed.
    label_fields(
        case_number="--case",
        offence_code="--offence",
        purpose="--purpose",
        candidates="--top",
        face_index="--face-index",
        agency_id="--agency",
        user_id="--user",
        image="IMAGE",
    )
    if sheet_out is not None:
        from .sheet import check_out

        check_out(sheet_out, "--sheet")
    if secret is None:
        from ..accountability import db, registry

        secret = registry.agency_secret(db.get_engine(settings()), agency)
    client = QuorumClient(settings().redis_url, agency, user, secret)
    if transaction:
        s = settings()
        rid = client.submit_transaction(
            image,
            case_number=case_number,
            offence_code=offence_code,
            purpose=purpose,
            case_field=s.nist_case_field,
            offence_field=s.nist_offence_field,
            max_record_bytes=s.max_image_bytes,
            candidates=top,
            face_index=face_index,
        )
    else:
        rid = client.submit(
            image,
            case_number=case_number or "",
            offence_code=offence_code or "",
            purpose=purpose,
            candidates=top,
            face_index=face_index,
        )
    try:
        result = client.wait(rid, timeout=timeout)
    except TimeoutError:
        raise click.ClickException(
            f"no answer to request {rid} in {timeout:.0f}s: is the stack running (quorum status; quorum up)? "
            f"The request stays queued; look for it later with quorum audit query --request {rid}"
        ) from None
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        print_list(result, agency=agency, user=user, offence=offence_code or "", purpose=purpose)
    if sheet_out is not None and result.type == "candidate_list":
        from .sheet import write

        # Status lines go to stderr under --json, so standard output stays the one JSON document.
        write(rid, sheet_out, on_behalf_of=user, agency=agency, via="search", err=as_json)
    elif sheet_out is not None:
        click.echo(f"no sheet written to {sheet_out}: the search has no candidate list", err=True)
    sys.exit(0 if result.type == "candidate_list" else 2)


COMMANDS = (search,)
