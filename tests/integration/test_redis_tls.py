"""The deployment's Redis as compose runs it: TLS only (no plaintext port), certificates and passwords
from `quorum deploy init`, the ACL file rendered from the registry with one user per service
(`quorum registry redis-acl --services`), the default user off. A real redis-server with TLS; the
services' URL files as written (host and CA path pointed at this machine); a real Celery worker process
logged in as the `worker` user round-trips a task sent by the `gateway` user; an agency submits over
rediss:// with its own ACL user through QuorumClient."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.deploy import CONTAINER_CA, make_certs
from quorum.cli.main import main
from quorum.core.config import settings
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _local(url: str, port: int, ca: Path) -> str:
    """A service URL file as written for compose (host `redis`, CA under /run/secrets) made local."""
    return url.replace("@redis:6379/", f"@127.0.0.1:{port}/").replace(quote(CONTAINER_CA, safe="/"), str(ca))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    home = tmp_path_factory.mktemp("tls")
    secrets = home / "secrets"
    runner = CliRunner()
    result = runner.invoke(main, ["deploy", "init", str(secrets), "--host", "127.0.0.1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    db.dispose_all()
    eng = db.get_engine(f"sqlite:///{home / 'quorum.db'}")
    creds = {a: registry.add_agency(eng, a, a.upper()) for a in ("a", "b", "c")}
    registry.set_agency_status(eng, "c", "suspended", reason="test")
    env = {**os.environ, "QUORUM_DATABASE_URL": f"sqlite:///{home / 'quorum.db'}", "QUORUM_HOME": str(home)}
    acl = secrets / "redis" / "users.acl"
    settings.cache_clear()  # the CLI reads this registry (QUORUM_DATABASE_URL below)
    result = runner.invoke(
        main,
        ["registry", "redis-acl", "--services", str(secrets / "redis-services.sha256"), "--out", str(acl)],
        env=env,
        catch_exceptions=False,
    )
    settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "user agency-a on" in acl.read_text() and "user agency-c off" in acl.read_text()
    port = free_port()
    rdir = secrets / "redis"
    subprocess.run(
        [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",  # no plaintext port, as in compose
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(rdir / "redis.crt"),
            "--tls-key-file",
            str(rdir / "redis.key"),
            "--tls-ca-cert-file",
            str(rdir / "ca.crt"),
            "--tls-auth-clients",
            "no",
            "--aclfile",
            str(acl),
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(home),
            "--pidfile",
            str(home / "redis.pid"),
            "--logfile",
            str(home / "redis.log"),
        ],
        check=True,
    )
    urls = {
        u: _local((secrets / f"redis-{u}.url").read_text().strip(), port, rdir / "ca.crt")
        for u in ("gateway", "worker", "review", "admin")
    }
    admin = redis.Redis.from_url(urls["admin"])
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, (home / "redis.log").read_text()[-2000:]
            time.sleep(0.05)
    yield {"port": port, "urls": urls, "creds": creds, "admin": admin, "ca": rdir / "ca.crt", "home": home}
    with contextlib.suppress(redis.RedisError):
        admin.shutdown(nosave=True)
    db.dispose_all()


def _tls(port: int, ca: Path, **kw) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        ssl=True,
        ssl_ca_certs=str(ca),
        ssl_cert_reqs="required",
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=3,
        **kw,
    )


def test_default_user_is_off_and_plaintext_is_refused(tls_redis):
    port, ca = tls_redis["port"], tls_redis["ca"]
    with pytest.raises(redis.exceptions.AuthenticationError):
        _tls(port, ca).ping()  # the default user, no password
    with pytest.raises(redis.exceptions.AuthenticationError):
        _tls(port, ca, username="default", password="anything").ping()
    with pytest.raises(redis.ConnectionError):  # plaintext on the TLS port: the handshake never happens
        redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), socket_timeout=2).ping()
    assert _tls(port, ca, username="healthcheck", password="x").ping()  # the compose health check
    with pytest.raises(redis.exceptions.NoPermissionError):
        _tls(port, ca, username="healthcheck", password="x").get("quorum:anything")


def test_a_server_certificate_from_another_ca_is_refused(tls_redis, tmp_path):
    other = tmp_path / "other-ca.crt"
    other.write_bytes(make_certs(("elsewhere",))["ca.crt"])
    with pytest.raises(redis.ConnectionError):
        _tls(tls_redis["port"], other, username="healthcheck", password="x").ping()


def test_service_users_have_what_they_need_and_no_more(tls_redis):
    gateway = redis.Redis.from_url(tls_redis["urls"]["gateway"], retry=Retry(NoBackoff(), 0))
    worker = redis.Redis.from_url(tls_redis["urls"]["worker"], retry=Retry(NoBackoff(), 0))
    # The gateway reads intake streams (consumer group), keeps nonces and publishes refusals.
    gateway.xadd(keys.intake_stream("a"), {"payload": "{}"})
    gateway.xgroup_create(keys.intake_stream("a"), "gateways", id="0")
    assert gateway.xreadgroup("gateways", "g1", {keys.intake_stream("a"): ">"})
    assert gateway.set(keys.nonce_key("a", "n1"), "1", nx=True, ex=60)
    assert list(gateway.scan_iter(match=keys.INTAKE_STREAM_PREFIX + "*", _type="STREAM"))
    # Workers: jobs, results, gallery, timers; never an agency's intake stream or nonces.
    worker.set(keys.job_key("r1"), "{}")
    worker.xadd(keys.results_stream("a"), {"type": "error"})
    worker.set(keys.result_key("a", "r1"), "{}")
    worker.zadd(keys.DEADLINES, {"t": 1})
    for attempt in (
        lambda: worker.xrange(keys.intake_stream("a")),
        lambda: worker.get(keys.nonce_key("a", "n1")),
        lambda: worker.xadd(keys.REJECTED_STREAM, {"x": "1"}),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # The reviewers' web app: results and subject records to read, its own sessions; nothing else.
    review = redis.Redis.from_url(tls_redis["urls"]["review"], retry=Retry(NoBackoff(), 0))
    assert review.get(keys.result_key("a", "r1")) == b"{}"
    assert review.hmget(keys.GALLERY_SUBJECTS, ["s1"]) == [None]
    review.set(keys.review_session("abc"), "{}", ex=60)
    assert review.getdel(keys.review_session("abc")) == b"{}"
    for attempt in (
        lambda: review.set(keys.result_key("a", "r1"), "forged"),
        lambda: review.get(keys.job_key("r1")),
        lambda: review.xadd(keys.intake_stream("a"), {"payload": "{}"}),
        lambda: review.hset(keys.GALLERY_SUBJECTS, "s1", "{}"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # Neither service may administer Redis.
    for client in (gateway, worker):
        for attempt in (
            lambda c=client: c.execute_command("ACL", "LOAD"),
            lambda c=client: c.config_get("*"),
            lambda c=client: c.flushall(),
            lambda c=client: c.keys("*"),
            lambda c=client: c.execute_command("BGREWRITEAOF"),
            lambda c=client: c.execute_command("CLIENT", "KILL", "ID", "999999"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    # The operator's admin user reloads the ACL file (after an agency change) and takes backups.
    admin = tls_redis["admin"]
    assert admin.execute_command("ACL", "LOAD") in (b"OK", "OK", True)
    exporter_pw = (tls_redis["home"] / "secrets" / "redis-exporter.password").read_text().strip()
    exporter = _tls(tls_redis["port"], tls_redis["ca"], username="exporter", password=exporter_pw)
    assert "redis_version" in exporter.info()
    with pytest.raises(redis.exceptions.NoPermissionError):
        exporter.set("quorum:x", "1")


def test_agency_submits_over_tls_with_its_own_acl_user(tls_redis):
    port, ca, creds, admin = tls_redis["port"], tls_redis["ca"], tls_redis["creds"], tls_redis["admin"]
    c = creds["a"]
    # What an agency is given: its user and password, the CA certificate, the host name in the certificate.
    url = (
        f"rediss://{c.redis_user}:{quote(c.redis_password, safe='')}@127.0.0.1:{port}/0"
        f"?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    )
    client = QuorumClient(url, "a", "u1", secret=None)
    entry = client.submit_raw('{"hello": 1}')
    assert [e for e, _ in admin.xrange(keys.intake_stream("a"), entry, entry)]
    admin.set(keys.result_key("a", "r9"), "result of a")
    admin.set(keys.result_key("b", "r9"), "result of b")
    assert client.redis.get(keys.result_key("a", "r9")) == b"result of a"
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.redis.get(keys.result_key("b", "r9"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.redis.xadd(keys.intake_stream("b"), {"payload": "{}"})
    suspended = creds["c"]
    with pytest.raises(redis.exceptions.AuthenticationError):
        _tls(port, ca, username=suspended.redis_user, password=suspended.redis_password).ping()


def test_celery_round_trip_over_tls_as_the_service_users(tls_redis, tmp_path):
    """kombu (broker) and the Celery result backend both over rediss://, each process as its own user."""
    urls = tls_redis["urls"]
    env = {**os.environ, "QUORUM_REDIS_URL": urls["worker"], "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.integration.tls_celery_app",
            "worker",
            "-Q",
            "intake,enrol",  # as `quorum worker intake` consumes (broker.app.ROLE_QUEUES)
            "--pool",
            "solo",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        os.environ["QUORUM_REDIS_URL"] = urls["gateway"]
        try:
            from quorum.broker.app import make_app

            sender = make_app(urls["gateway"])
            result = sender.send_task("quorum.intake.echo", args=["over tls"], queue="intake")
            try:
                assert result.get(timeout=60) == "echo over tls"
            except Exception:
                log.flush()
                raise AssertionError((tmp_path / "worker.log").read_text()[-4000:]) from None
        finally:
            del os.environ["QUORUM_REDIS_URL"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_compose_healthcheck_command_and_acl_load(tls_redis):
    """The redis service's health check (redis-cli as `healthcheck`, over TLS) as compose runs it, and
    `quorum deploy acl-load` as the admin user; the gateway's user may not reload the ACL."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    check = compose["services"]["redis"]["healthcheck"]["test"][1]
    check = check.replace("/etc/redis/quorum/ca.crt", str(tls_redis["ca"])).replace(
        "redis-cli ", f"redis-cli -p {tls_redis['port']} "
    )
    assert subprocess.run(["sh", "-c", check], timeout=30).returncode == 0
    env = {**os.environ, "QUORUM_REDIS_URL": tls_redis["urls"]["admin"]}
    env.pop("QUORUM_SETTINGS", None)
    loaded = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "deploy", "acl-load"], env=env, capture_output=True, text=True, timeout=60
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "users now" in loaded.stdout and "agency-a" in loaded.stdout
    env["QUORUM_REDIS_URL"] = tls_redis["urls"]["gateway"]
    refused = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "deploy", "acl-load"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "may not reload the ACL" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_review_app_signs_in_over_tls_as_its_own_user(tls_redis, tmp_path):
    """`quorum review` as compose runs it (Redis user `review`, rediss://): a token issued by the operator
    (admin user) signs a reviewer in, and the list page opens with the session kept in Redis."""
    import http.client
    import urllib.parse
    from datetime import date, timedelta

    from quorum.review import signin

    home = tls_redis["home"]
    url = f"sqlite:///{home / 'quorum.db'}"
    db.dispose_all()
    eng = db.get_engine(url)
    registry.add_user(eng, "rev-1", "a", "investigator", cert_id="C-1", cert_expires=date.today() + timedelta(days=30))
    token = signin.issue_token(tls_redis["admin"], eng, "rev-1", actor="test")
    db.dispose_all()
    port = free_port()
    env = {**os.environ, "QUORUM_REDIS_URL": tls_redis["urls"]["review"], "QUORUM_DATABASE_URL": url}
    env["QUORUM_HOME"] = str(tmp_path / "home")
    env.pop("QUORUM_SETTINGS", None)
    log = (tmp_path / "review.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "quorum.cli", "review", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def request(method: str, path: str, body: str | None = None, cookie: str = "") -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        if cookie:
            headers["Cookie"] = cookie
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse()

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                form = request("GET", "/signin")
                if form.status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "review.log").read_text()[-2000:]
            time.sleep(0.3)
        # As a browser does: the form's token comes back both in the form and in its cookie.
        form_cookie = form.getheader("Set-Cookie", "").split(";", 1)[0]
        form_token = re.search(rb'name="form_token" value="([^"]+)"', form.read())
        assert form_cookie.startswith("quorum_signin=") and form_token, form_cookie
        body = urllib.parse.urlencode({"token": token, "form_token": form_token[1].decode()})
        resp = request("POST", "/signin", body, cookie=form_cookie)
        assert resp.status == 303, resp.read()[:500]
        cookie = resp.getheader("Set-Cookie", "").split(";", 1)[0]
        assert cookie
        page = request("GET", "/", cookie=cookie)
        assert page.status == 200 and b"rev-1" in page.read()
        # One-time (GETDEL): the same token again, with a fresh form, is refused for the token itself.
        form = request("GET", "/signin")
        form_cookie = form.getheader("Set-Cookie", "").split(";", 1)[0]
        fresh = re.search(rb'name="form_token" value="([^"]+)"', form.read())
        assert fresh
        body = urllib.parse.urlencode({"token": token, "form_token": fresh[1].decode()})
        again = request("POST", "/signin", body, cookie=form_cookie)
        assert again.status == 403 and b"FORM_EXPIRED" not in again.read()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
