"""``quorum registry``: member agencies, users, offence codes, purposes, and the Redis ACL derived
from them.

Every change is audited under the operator's name: ``--actor``, else ``QUORUM_OPERATOR``, else the login name.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..broker.redis_errors import connect
from .common import CliError, actor_option, db_engine, emit, operator_name

RETRY_HINT = (
    "the registry change is saved; Redis gets it with the next registry change, `quorum registry redis-acl "
    "--apply` or the next `quorum up` (until then the gateway reports quorum_redis_acl_stale 1)"
)


def _warn_refused() -> None:
    """Say which registered agencies no ACL rendering includes (an id outside the grammar)."""
    from ..accountability import registry

    for agency, why in registry.refused_acl_agencies(db_engine()):
        click.echo(f"warning: agency {agency!a} has no Redis user: {why}", err=True)


def _apply_to_local_redis() -> bool:
    """Apply the agency users to the local stack's Redis when it runs (``registry.sync_local_redis``).
    True if it did; False when the configured Redis is not one the local stack started. A push that
    fails ends the command with ``REDIS_ACL_NOT_APPLIED`` (exit status 2), the change itself being saved."""
    from ..accountability import registry
    from ..core.config import settings
    from ..core.errors import QuorumError

    try:
        users = registry.sync_local_redis(settings())
    except QuorumError as exc:
        _warn_refused()
        raise CliError(f"{exc.code.value}: {exc.message}\n       {RETRY_HINT}") from exc
    if users is None:
        return False
    _warn_refused()
    click.echo(f"applied {len(users)} agency users to the local stack's Redis: {' '.join(users) or '(none)'}")
    return True


@click.group("registry")
def registry_group() -> None:
    """Member agencies, users, offence codes and purposes."""


@registry_group.group("agency")
def agency_group() -> None:
    """Member agencies."""


@agency_group.command("add")
@click.argument("agency_id")
@click.option("--name", required=True)
@click.option("--quota", "daily_quota", default=0, show_default=True, help="searches per UTC day (0: unlimited)")
@actor_option
def agency_add(agency_id: str, name: str, daily_quota: int, actor: str | None) -> None:
    """Register an agency; prints its signing secret and Redis password ONCE."""
    from ..accountability import registry

    c = registry.add_agency(db_engine(), agency_id, name, daily_quota=daily_quota, actor=operator_name(actor))
    click.echo(f"agency {agency_id} registered. Give these to the agency now; they are not shown again.")
    click.echo(f"signing secret (HMAC-SHA256): {c.secret}")
    click.echo(f"redis user: {c.redis_user}  password: {c.redis_password}")
    if not _apply_to_local_redis():
        click.echo(
            "then re-render the Redis ACL: quorum registry redis-acl --out <aclfile> && redis-cli ACL LOAD "
            "(a Redis without an ACL file: quorum registry redis-acl --apply)"
        )


@agency_group.command("suspend")
@click.argument("agency_id")
@click.option("--reason", required=True)
@actor_option
def agency_suspend(agency_id: str, reason: str, actor: str | None) -> None:
    from ..accountability import registry

    registry.set_agency_status(db_engine(), agency_id, "suspended", actor=operator_name(actor), reason=reason)
    click.echo(f"agency {agency_id} suspended")
    _apply_to_local_redis()


@agency_group.command("activate")
@click.argument("agency_id")
@click.option("--reason", default="")
@actor_option
def agency_activate(agency_id: str, reason: str, actor: str | None) -> None:
    from ..accountability import registry

    registry.set_agency_status(db_engine(), agency_id, "active", actor=operator_name(actor), reason=reason)
    click.echo(f"agency {agency_id} active")
    _apply_to_local_redis()


@agency_group.command("quota")
@click.argument("agency_id")
@click.argument("daily_quota", type=int)
@actor_option
def agency_quota(agency_id: str, daily_quota: int, actor: str | None) -> None:
    from ..accountability import registry

    registry.set_agency_quota(db_engine(), agency_id, daily_quota, actor=operator_name(actor))
    click.echo(f"agency {agency_id}: {daily_quota or 'unlimited'} searches per day")


@agency_group.command("rotate")
@click.argument("agency_id")
@actor_option
def agency_rotate(agency_id: str, actor: str | None) -> None:
    """New signing secret and Redis password (printed once); the old ones stop working."""
    from ..accountability import registry

    c = registry.rotate_credentials(db_engine(), agency_id, actor=operator_name(actor))
    click.echo(f"signing secret (HMAC-SHA256): {c.secret}")
    click.echo(f"redis user: {c.redis_user}  password: {c.redis_password}")
    _apply_to_local_redis()


@registry_group.group("user")
def user_group() -> None:
    """Users: investigator, supervisor, auditor, operator."""


@user_group.command("add")
@click.argument("user_id")
@click.option("--agency", required=True)
@click.option("--role", required=True, type=click.Choice(["investigator", "supervisor", "auditor", "operator"]))
@click.option("--cert", "cert_id", default=None, help="face-search training certificate id")
@click.option("--cert-expires", type=click.DateTime(["%Y-%m-%d"]), default=None)
@actor_option
def user_add(user_id: str, agency: str, role: str, cert_id: str | None, cert_expires, actor: str | None) -> None:
    from ..accountability import registry

    registry.add_user(
        db_engine(),
        user_id,
        agency,
        role,
        cert_id=cert_id,
        cert_expires=cert_expires.date() if cert_expires else None,
        actor=operator_name(actor),
    )
    click.echo(f"user {user_id} ({role}, {agency}) registered")


@user_group.command("certify")
@click.argument("user_id")
@click.option("--cert", "cert_id", required=True)
@click.option("--expires", type=click.DateTime(["%Y-%m-%d"]), required=True)
@actor_option
def user_certify(user_id: str, cert_id: str, expires, actor: str | None) -> None:
    from ..accountability import registry

    registry.certify_user(db_engine(), user_id, cert_id, expires.date(), actor=operator_name(actor))
    click.echo(f"user {user_id}: certificate {cert_id} valid through {expires.date()}")


@user_group.command("review-token")
@click.argument("user_id")
@click.option("--ttl-hours", default=24.0, show_default=True, type=click.FloatRange(0.01, 24 * 7))
@actor_option
def user_review_token(user_id: str, ttl_hours: float, actor: str | None) -> None:
    """Issue a one-time sign-in token for quorum review (printed once; the user must be certified)."""

    from ..core.config import settings
    from ..review import signin

    r = connect(settings().redis_url)
    token = signin.issue_token(r, db_engine(), user_id, actor=operator_name(actor), ttl_s=round(ttl_hours * 3600))
    click.echo(token)
    click.echo(f"one-time sign-in token for {user_id}, valid {ttl_hours:g} h: it is not shown again", err=True)


@user_group.command("deactivate")
@click.argument("user_id")
@actor_option
def user_deactivate(user_id: str, actor: str | None) -> None:
    from ..accountability import registry

    registry.set_user_active(db_engine(), user_id, False, actor=operator_name(actor))
    click.echo(f"user {user_id} deactivated")


@registry_group.command("offence")
@click.argument("code")
@click.option("--description", default="")
@actor_option
def offence_add(code: str, description: str, actor: str | None) -> None:
    """Add an offence code."""
    from ..accountability import registry

    registry.add_offence(db_engine(), code, description, actor=operator_name(actor))
    click.echo(f"offence {code} registered")


@registry_group.command("purpose")
@click.argument("code")
@click.option("--allowed/--refused", required=True)
@click.option("--description", default="")
@actor_option
def purpose_set(code: str, allowed: bool, description: str, actor: str | None) -> None:
    """Declare a purpose allowed or refused."""
    from ..accountability import registry

    registry.set_purpose(db_engine(), code, allowed, description, actor=operator_name(actor))
    click.echo(f"purpose {code}: {'allowed' if allowed else 'refused'}")


@registry_group.command("list")
def registry_list() -> None:
    """Print the registry (no secrets)."""
    from ..accountability import registry

    snap = registry.snapshot(db_engine())
    click.echo(f"registry version {snap.version}")
    for a in snap.agencies.values():
        click.echo(f"agency  {a.id:<20} {a.status:<10} quota={a.daily_quota or 'unlimited'}  {a.name}")
    for u in snap.users.values():
        click.echo(
            f"user    {u.id:<20} {u.agency_id:<16} {u.role:<12} cert={u.cert_id or '-'} "
            f"expires={u.cert_expires or '-'}{'' if u.active else '  INACTIVE'}"
        )
    for code in sorted(snap.offences):
        click.echo(f"offence {code}")
    for code, allowed in sorted(snap.purposes.items()):
        click.echo(f"purpose {code:<24} {'allowed' if allowed else 'REFUSED'}")


@registry_group.command("redis-acl")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--service-user", default="", help="also define the services' user and turn 'default' off")
@click.option("--service-password-sha256", default="")
@click.option(
    "--apply",
    "apply_live",
    is_flag=True,
    help="load the agency users into the running Redis (QUORUM_REDIS_URL) with ACL SETUSER instead: "
    "for a Redis started without an ACL file, or the local stack's (whose ACL file is written again too)",
)
@click.option(
    "--services",
    "services_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="`USER SHA256` lines (quorum deploy init's redis-services.sha256): one least-privilege user per service",
)
def redis_acl(
    out: Path | None, service_user: str, service_password_sha256: str, apply_live: bool, services_file: Path | None
) -> None:
    """Render the Redis ACL file (one user per agency) from the registry, or apply the agency users live."""
    from ..accountability import registry
    from .deploy import read_service_hashes

    if apply_live:
        if _apply_to_local_redis():
            return

        from .common import load_settings_or_fail, require_redis

        url = load_settings_or_fail().redis_url
        require_redis(url)
        from ..core.errors import QuorumError

        try:
            users = registry.push_redis_acl(db_engine(), connect(url))
        except QuorumError as exc:
            _warn_refused()
            raise CliError(f"{exc.code.value}: {exc.message}\n       {RETRY_HINT}") from exc
        _warn_refused()
        click.echo(f"applied {len(users)} agency users to the running Redis: {' '.join(users) or '(none)'}")
        return
    if services_file and service_user:
        raise click.UsageError("give --services or --service-user, not both")
    text = registry.render_redis_acl(
        db_engine(),
        service_user=service_user,
        service_password_sha256=service_password_sha256,
        services=read_service_hashes(services_file) if services_file else None,
    )
    _warn_refused()
    emit(text, out)


@registry_group.group("secrets-key")
def secrets_key_group() -> None:
    """The key that seals agency signing secrets in the database (kept outside it)."""


@secrets_key_group.command("rotate")
@click.option("--drop-old", is_flag=True, help="then keep only the new key (once every service has reloaded)")
@actor_option
def secrets_key_rotate(drop_old: bool, actor: str) -> None:
    """Add a new key at the top of the key file and reseal every agency secret with it."""
    from ..accountability import registry, sealing

    eng = db_engine()
    path = sealing.key_file_for(eng)
    sealing.read_keys(path)  # created on first use
    sealing.add_new_key(path)
    n = registry.reseal_secrets(eng, actor=actor)
    click.echo(f"resealed {n} agency secrets with a new key in {path}")
    if drop_old:
        click.echo(f"removed {sealing.drop_old_keys(path)} old key(s) from {path}")


@secrets_key_group.command("path")
def secrets_key_path() -> None:
    """Print where the key file is (QUORUM_SECRETS_KEY_FILE, or beside the SQLite database)."""
    from ..accountability import sealing

    click.echo(str(sealing.key_file_for(db_engine())))


COMMANDS = (registry_group,)
