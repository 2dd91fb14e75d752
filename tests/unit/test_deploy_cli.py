"""`quorum deploy init` / `certs`: what a compose deployment is given before its first start."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import stat
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from quorum.accountability.registry import SERVICE_ACL, render_service_acl
from quorum.cli.deploy import REDIS_SERVICE_USERS, SECRET_FILES, read_service_hashes
from quorum.cli.main import main


def invoke(*args: str):
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res


def test_init_writes_every_secret_once_and_keeps_them(tmp_path: Path) -> None:
    d = tmp_path / "secrets"
    res = invoke("deploy", "init", str(d), "--host", "redis.agencies.example", "--host", "10.0.0.5")
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in [n for n, _ in SECRET_FILES] + ["database-url", "secrets-key", "redis-gateway.url"]:
        value = (d / name).read_text()
        assert value and value == value.strip(), f"{name}: one value, no trailing newline"
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "redis" / "redis.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "s3-secret-key").stat().st_mode) == 0o644  # readable by the service's user
    # URLs: each service its own user, TLS verified against the mounted CA; passwords match the hashes.
    hashes = read_service_hashes(d / "redis-services.sha256")
    assert set(hashes) == set(REDIS_SERVICE_USERS)
    for user in ("gateway", "worker", "review", "admin"):
        url = (d / f"redis-{user}.url").read_text().strip()
        pool = redis.ConnectionPool.from_url(url)
        kw = pool.connection_kwargs
        assert pool.connection_class is redis.SSLConnection
        assert kw["username"] == user and kw["ssl_cert_reqs"] == "required"
        assert kw["ssl_ca_certs"] == "/run/secrets/redis-ca" and kw["host"] == "redis"
        assert hashlib.sha256(kw["password"].encode()).hexdigest() == hashes[user]
    exporter = json.loads((d / "redis-exporter.json").read_text())
    assert hashlib.sha256(exporter["rediss://redis:6379"].encode()).hexdigest() == hashes["exporter"]
    app_pw = (d / "postgres-app-password").read_text().strip()
    assert (d / "database-url").read_text().strip() == f"postgresql+psycopg://quorum:{app_pw}@postgres:5432/quorum"
    acl = (d / "redis" / "users.acl").read_text()
    assert acl == render_service_acl(hashes)
    assert "user default off" in acl and "user healthcheck on nopass" in acl
    # Again: nothing replaced.
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    res = invoke("deploy", "init", str(d))
    assert res.exit_code == 0 and "nothing (all present)" in res.output
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path: Path) -> None:
    d = tmp_path / "s"
    assert invoke("deploy", "certs", str(d), "--host", "redis.agencies.example", "--host", "10.0.0.5").exit_code == 0
    ca = x509.load_pem_x509_certificate((d / "redis" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((d / "redis" / "redis.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"redis.agencies.example", "redis", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    # Renewal is explicit.
    res = CliRunner().invoke(main, ["deploy", "certs", str(d)])
    assert res.exit_code != 0 and "--force" in res.output
    old = (d / "redis" / "redis.crt").read_bytes()
    assert invoke("deploy", "certs", str(d), "--force").exit_code == 0
    assert (d / "redis" / "redis.crt").read_bytes() != old


def test_service_acl_rights_are_defined_for_every_service_user() -> None:
    assert set(REDIS_SERVICE_USERS) <= set(SERVICE_ACL)
    with pytest.raises(ValueError, match="no Redis rights defined"):
        render_service_acl({"nobody": "0" * 64})
    worker = SERVICE_ACL["worker"]
    assert "~quorum:intake:" not in worker and "~quorum:* " not in worker and "-@admin" in worker


def test_service_users_reach_every_celery_queue() -> None:
    """A queue added to broker.app must be in the gateway's and the workers' key patterns, or the workers
    that consume it are refused by Redis in the compose deployment (BRPOP on all their queues at once)."""
    from fnmatch import fnmatchcase

    from quorum.broker.app import ALL_QUEUES, shard_queue

    queues = [*ALL_QUEUES, shard_queue("sface", 0, 4)]
    for user in ("gateway", "worker"):
        patterns = [w[1:] for w in SERVICE_ACL[user].split() if w.startswith("~")]
        for q in queues:
            for key in (q, f"{q}\x06\x163", "_kombu.binding." + q):  # kombu's priority queue, binding set
                assert any(fnmatchcase(key, p) for p in patterns), f"{user} may not use {key!r}"
