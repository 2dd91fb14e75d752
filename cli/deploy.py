"""``quorum deploy``: what a docker-compose deployment needs before its first start.

``quorum deploy init DIR`` writes every credential the compose file mounts as a secret (random
passwords, one per service and store), the Redis TLS certificates (a private CA and a server
certificate) and a first Redis ACL file (the services' users, no agency yet); ``quorum deploy certs DIR``
renews the certificates alone. Files that exist are kept (``--force`` replaces them), so running
``init`` again only fills in what is missing. Layout (deploy/README.md "First start"):

``redis/``: mounted into the redis container: ``ca.crt``, ``redis.crt``, ``redis.key``, ``users.acl``;
``ca.key``: the CA's private key (keep it offline; needed only to issue a new server certificate);
``redis-{gateway,worker,review,admin}.url``: each service's ``rediss://`` URL with its own ACL user;
``redis-services.sha256``: the service users' password hashes, read by ``quorum registry redis-acl``;
``redis-exporter.json``: redis_exporter's password file; ``database-url``: the services' PostgreSQL URL
(role ``quorum``); ``secrets-key``: the key sealing agency secrets; the rest one value a file (SECRET_FILES).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
from pathlib import Path
from urllib.parse import quote

import click

# Redis ACL users of the services (accountability.registry.SERVICE_ACL has their rights).
REDIS_SERVICE_USERS = ("gateway", "worker", "review", "admin", "exporter")
# Names under which a Redis client inside compose finds the CA (the compose secret `redis-ca`).
CONTAINER_CA = "/run/secrets/redis-ca"
# docker-compose (v1, and v2 without swarm) mounts a secret file as it is, with its owner and mode, and
# the services run as other users (quorum 10001, postgres 999, grafana 472): the files are readable
# (0644) inside a directory that only its owner may enter (0700). The two private keys stay 0600.
SECRET_MODE = 0o644
REDIS_UID = 999  # the redis:7 image's user: it must read redis/redis.key
# One value a file: (file name, how to make it).
SECRET_FILES: tuple[tuple[str, str], ...] = (
    ("minio-root-user", "name"),
    ("minio-root-password", "password"),
    ("s3-access-key", "name"),
    ("s3-secret-key", "password"),
    ("postgres-password", "password"),  # the PostgreSQL superuser: only the postgres container has it
    ("postgres-app-password", "password"),  # role `quorum`, owner of database `quorum`: the services
    ("postgres-exporter-password", "password"),  # role `exporter` (pg_monitor)
    ("grafana-admin-password", "password"),
)


def _write(path: Path, data: str | bytes, *, mode: int, force: bool) -> bool:
    """Write ``path`` unless it exists (and ``force`` is off); returns whether it was written."""
    if path.exists() and not force:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    raw = data.encode() if isinstance(data, str) else data
    path.touch(mode=0o600)
    path.write_bytes(raw)
    path.chmod(mode)
    return True


def make_certs(hosts: tuple[str, ...], days: int = 825) -> dict[str, bytes]:
    """A private CA and a Redis server certificate for ``hosts`` (names or IP addresses), as PEM:
    ``ca.crt``, ``ca.key``, ``redis.crt``, ``redis.key``. EC P-256 keys, SHA-256 signatures."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Quorum Redis CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days + 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key),
        "redis.crt": cert.public_bytes(serialization.Encoding.PEM),
        "redis.key": pem_key(key),
    }


def redis_url(user: str, password: str, host: str = "redis", port: int = 6379, ca: str = CONTAINER_CA) -> str:
    """A ``rediss://`` URL that logs in as ``user`` and verifies the server against ``ca``."""
    return (
        f"rediss://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/0"
        f"?ssl_cert_reqs=required&ssl_ca_certs={quote(ca, safe='/')}"
    )


def database_url(password: str, host: str = "postgres", role: str = "quorum", database: str = "quorum") -> str:
    """The services' PostgreSQL URL: role ``quorum`` (deploy/postgres/init-roles.sh), not the superuser."""
    return f"postgresql+psycopg://{role}:{quote(password, safe='')}@{host}:5432/{database}"


def write_certs(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> list[str]:
    """The CA and server certificate into ``directory`` (CA key beside ``redis/``); returns what was written."""
    redis_dir = directory / "redis"
    if (redis_dir / "redis.crt").exists() and not force:
        return []
    pem = make_certs(hosts, days)
    written = []
    for name, mode, path in (
        ("ca.crt", 0o644, redis_dir / "ca.crt"),
        ("redis.crt", 0o644, redis_dir / "redis.crt"),
        # redis:7 runs as uid 999: deploy/README.md says to chown redis/ to it.
        ("redis.key", 0o600, redis_dir / "redis.key"),
        ("ca.key", 0o600, directory / "ca.key"),
    ):
        _write(path, pem[name], mode=mode, force=True)
        written.append(str(path.relative_to(directory)))
    redis_dir.chmod(0o755)
    if os.geteuid() == 0:  # else deploy/README.md: chown 999 redis/redis.key
        os.chown(redis_dir / "redis.key", REDIS_UID, REDIS_UID)
    return written


@click.group("deploy")
def deploy_group() -> None:
    """Prepare a docker-compose deployment: secrets, Redis TLS certificates and ACL (deploy/README.md)."""


_hosts_option = click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME|IP",
    help="a name or address agencies use to reach Redis (repeat); 'redis', 'localhost' and 127.0.0.1 are always in",
)


def _all_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    return (*hosts, "redis", "localhost", "127.0.0.1") if hosts else ("redis", "localhost", "127.0.0.1")


@deploy_group.command("certs")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_hosts_option
@click.option("--days", default=825, show_default=True, help="validity of the server certificate")
@click.option("--force", is_flag=True, help="replace existing certificates")
def certs(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Write a private CA and a Redis server certificate into DIRECTORY/redis (CA key: DIRECTORY/ca.key)."""
    written = write_certs(directory, _all_hosts(hosts), days, force)
    if not written:
        raise click.ClickException(f"{directory / 'redis' / 'redis.crt'} exists; --force replaces it")
    click.echo(f"wrote {', '.join(written)} in {directory}; give agencies redis/ca.crt (not ca.key)")


@deploy_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_hosts_option
@click.option("--days", default=825, show_default=True, help="validity of the server certificate")
@click.option("--force", is_flag=True, help="replace existing files (new passwords: every service must restart)")
def init(directory: Path, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Write every secret the compose file mounts, the Redis certificates and a first ACL file."""
    from ..accountability.registry import render_service_acl

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    written = write_certs(directory, _all_hosts(hosts), days, force)
    # One value a file, without a trailing newline: some images read a secret file byte for byte.
    for name, kind in SECRET_FILES:
        value = f"quorum-{secrets.token_hex(4)}" if kind == "name" else secrets.token_urlsafe(32)
        if _write(directory / name, value, mode=SECRET_MODE, force=force):
            written.append(name)
    passwords: dict[str, str] = {}
    for user in REDIS_SERVICE_USERS:
        pw_file = directory / f"redis-{user}.password"
        if _write(pw_file, secrets.token_urlsafe(32), mode=SECRET_MODE, force=force):
            written.append(pw_file.name)
        passwords[user] = pw_file.read_text().strip()
    for user in ("gateway", "worker", "review", "admin"):
        url = redis_url(user, passwords[user])
        if _write(directory / f"redis-{user}.url", url, mode=SECRET_MODE, force=force):
            written.append(f"redis-{user}.url")
    exporter = json.dumps({"rediss://redis:6379": passwords["exporter"]}) + "\n"
    if _write(directory / "redis-exporter.json", exporter, mode=SECRET_MODE, force=force):
        written.append("redis-exporter.json")
    app_pw = (directory / "postgres-app-password").read_text().strip()
    if _write(directory / "database-url", database_url(app_pw), mode=SECRET_MODE, force=force):
        written.append("database-url")
    hashes = {u: hashlib.sha256(p.encode()).hexdigest() for u, p in passwords.items()}
    # Derived from the passwords: always rewritten so that they match.
    (directory / "redis-services.sha256").write_text("".join(f"{u} {h}\n" for u, h in hashes.items()))
    if _write(directory / "redis" / "users.acl", render_service_acl(hashes), mode=0o644, force=force):
        written.append("redis/users.acl")
    if _write(directory / "secrets-key", _fernet_key(), mode=SECRET_MODE, force=force):
        written.append("secrets-key")
    click.echo(f"{directory}: wrote {', '.join(written) if written else 'nothing (all present)'}")


@deploy_group.command("acl-load")
def acl_load() -> None:
    """Make Redis re-read its ACL file (after `quorum registry redis-acl` rendered it again): ACL LOAD as
    the configured Redis user (compose: `docker-compose run --rm admin quorum deploy acl-load`). Behind
    Sentinel (a redis+sentinel:// URL) on every data node, the primary and each replica: the ACL is not
    replicated, and a replica promoted by a failover must know the same users."""
    from ..broker.sentinel import data_nodes
    from ..core.config import settings

    url = settings().redis_url
    nodes = data_nodes(url, socket_connect_timeout=5)
    for client in nodes:
        kw = client.connection_pool.connection_kwargs
        where = f"{kw.get('host')}:{kw.get('port')}"
        said, users = _acl_load_one(client)
        click.echo(f"{where}: {said}: {len(users)} users now ({', '.join(users)})")
    _compare_with_registry(nodes[0])


def _acl_load_one(client) -> tuple[str, list[str]]:
    import redis as redis_lib
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client.connection_pool.connection_kwargs["retry"] = Retry(NoBackoff(), 0)
    closed = False
    try:
        client.execute_command("ACL", "LOAD")
    except redis_lib.exceptions.ConnectionError:
        # Seen in tests: the connection closed before ACL LOAD's reply (Redis 7 may close the connections
        # of the users it replaced). Not retried blindly: the users in force are read on a new connection.
        closed = True
    except redis_lib.exceptions.NoPermissionError as err:
        raise click.ClickException(
            f"this Redis user may not reload the ACL ({err}): run it as the admin service "
            "(docker-compose run --rm admin quorum deploy acl-load)"
        ) from None
    except redis_lib.exceptions.ResponseError as err:  # the file does not parse: Redis keeps the old ACL
        raise click.ClickException(f"Redis refused the ACL file, the previous ACL stays in force: {err}") from None
    client.connection_pool.disconnect()
    users = [u.decode() if isinstance(u, bytes) else u for u in client.execute_command("ACL", "USERS")]
    return ("ACL LOAD sent, the connection closed before its reply" if closed else "ACL reloaded"), users


def _compare_with_registry(client) -> None:
    """After ``ACL LOAD``: do the agency users Redis now has match the registry? If so, record it (the
    gateway's ``quorum_redis_acl_stale`` goes to 0); if not, say how they differ (a file rendered before
    the last registry change: render it again)."""
    from ..accountability import registry
    from .common import db_engine

    try:
        problems = registry.mark_redis_acl(db_engine(), client)
    except Exception as exc:  # the registry database unreachable from here: the reload stands, said so
        click.echo(f"warning: could not compare the ACL with the registry: {type(exc).__name__}: {exc}", err=True)
        return
    if problems:
        click.echo(
            "warning: Redis's agency users differ from the registry (render the ACL file again, then "
            f"acl-load): {'; '.join(problems[:10])}",
            err=True,
        )
    else:
        click.echo("agency users match the registry")


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def read_service_hashes(path: Path) -> dict[str, str]:
    """``redis-services.sha256``: one ``user sha256`` a line."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        user, _, digest = line.strip().partition(" ")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise click.ClickException(f"{path}:{n}: expected 'USER SHA256-HEX', got {line!r}")
        out[user] = digest
    return out


COMMANDS = (deploy_group,)


@deploy_group.command("render")
@click.option("--engines", metavar="E1,E2", help="the engine set (default: QUORUM_ENGINES)")
@click.option("--shards", metavar="ENGINE=N,...", help="each engine's shard count (default: QUORUM_SHARDS)")
@click.option(
    "--templates",
    type=click.IntRange(min=1),
    default=13_500_000,
    show_default=True,
    help="templates per engine the shards' memory requests are sized for",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="the checkout to write deploy/k8s/ and docker-compose.shards.yml into",
)
@click.option("--check", is_flag=True, help="write nothing; exit 1 if the files there differ from this rendering")
def render(engines: str | None, shards: str | None, templates: int, out: Path, check: bool) -> None:
    """Render the Kubernetes manifests (kustomize base, cpu and gpu overlays) and the compose shard
    services from one layout (deploy/README.md "Kubernetes")."""
    from ..core.config import Settings, settings
    from . import manifests

    base = settings()
    s = Settings(
        engines=engines if engines is not None else base.engines,
        shards=shards if shards is not None else dict(base.shards),
    )
    compose_file = out / "docker-compose.yml"
    if not compose_file.is_file():
        raise click.ClickException(f"no docker-compose.yml in {out}: give --out the Quorum checkout")
    import yaml

    files = manifests.render(manifests.Layout.from_settings(s, templates), yaml.safe_load(compose_file.read_text()))
    stale = [p for p, text in files.items() if not (out / p).is_file() or (out / p).read_text() != text]
    # Files an earlier rendering wrote that this one does not (a layout without shards has no shards.yaml).
    leftover = [p for p in manifests.rendered_files(out) if p not in files]
    if check:
        if stale or leftover:
            differ = ", ".join(stale + [f"{p} (not rendered now)" for p in leftover])
            raise click.ClickException(f"not as rendered: {differ}; run `quorum deploy render` again")
        click.echo(f"{len(files)} files as rendered")
        return
    for rel in stale:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(files[rel])
    for rel in leftover:
        (out / rel).unlink()
    n_shards = sum(n for e, n in s.shards if n > 1 and e in s.engines)
    click.echo(f"rendered {len(files)} files ({len(stale)} changed) into {out}: {n_shards} shard deployment(s)")
