"""core.local_redis: the local stack's service passwords, URLs, and when a command logs in as admin."""

from __future__ import annotations

import os
import stat

from quorum.accountability.registry import DEFAULT_USER_OFF, SERVICE_ACL, render_service_acl
from quorum.cli.stack import settings_env
from quorum.core import local_redis
from quorum.core.config import load_settings


def test_urls_with_and_without_credentials():
    url = "redis://127.0.0.1:6390/0"
    admin = local_redis.with_credentials(url, "admin", "p@ss/w:rd")
    assert admin == "redis://admin:p%40ss%2Fw%3Ard@127.0.0.1:6390/0"
    assert local_redis.url_user(admin) == "admin" and local_redis.has_credentials(admin)
    assert local_redis.without_credentials(admin) == url
    assert local_redis.with_credentials(admin, "worker", "x") == "redis://worker:x@127.0.0.1:6390/0"
    assert not local_redis.has_credentials(url) and local_redis.url_user(url) is None
    assert local_redis.server_address("redis://localhost:6390/0") == local_redis.server_address(admin)
    assert local_redis.server_address("redis://127.0.0.1/0") == "127.0.0.1:6379"


def test_each_role_has_its_user():
    assert local_redis.role_user("gateway") == "gateway"
    assert local_redis.role_user("supervisor") == "admin"
    for role in ("intake", "sface", "fusion", "gallery", "sface.0of3", "sface.reindex"):
        assert local_redis.role_user(role) == "worker"
    assert set(local_redis.SERVICE_USERS) <= set(SERVICE_ACL)


def test_passwords_are_made_once_and_private(tmp_path):
    first = local_redis.ensure_passwords(tmp_path)
    assert set(first) == set(local_redis.SERVICE_USERS) and len(set(first.values())) == len(first)
    assert local_redis.ensure_passwords(tmp_path) == first == local_redis.read_passwords(tmp_path)
    assert stat.S_IMODE(local_redis.passwords_file(tmp_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(local_redis.secrets_dir(tmp_path).stat().st_mode) == 0o700
    assert local_redis.read_passwords(tmp_path / "elsewhere") == {}


def _pretend_started(home, url):
    """As Stack.start_redis leaves the run dir, with this test's own pid standing in for redis-server's."""
    (home / "run").mkdir()
    local_redis.record_started(home, url)
    local_redis.pid_file(home).write_text(str(os.getpid()))


def test_a_command_in_the_home_of_the_running_local_redis_logs_in_as_admin(tmp_path):
    url = "redis://127.0.0.1:6390/0"
    assert load_settings(env={}, home=str(tmp_path), redis_url=url).redis_url == url  # nothing started
    passwords = local_redis.ensure_passwords(tmp_path)
    _pretend_started(tmp_path, url)
    admin = f"redis://admin:{passwords['admin']}@127.0.0.1:6390/0"
    assert load_settings(env={}, home=str(tmp_path), redis_url=url).redis_url == admin
    assert load_settings(env={}, home=str(tmp_path), redis_url="redis://localhost:6390/0").redis_url.startswith(
        "redis://admin:"
    )
    # Another port, explicit credentials: used as they are.
    assert load_settings(env={}, home=str(tmp_path), redis_url="redis://127.0.0.1:6391/0").redis_url.endswith(
        "127.0.0.1:6391/0"
    )
    mine = "redis://someone:pw@127.0.0.1:6390/0"
    assert load_settings(env={}, home=str(tmp_path), redis_url=mine).redis_url == mine
    # The server gone (its pid file names no process): no credentials added.
    local_redis.pid_file(tmp_path).write_text("999999999")
    assert load_settings(env={}, home=str(tmp_path), redis_url=url).redis_url == url


def test_a_child_reads_its_own_users_url_from_a_file(tmp_path):
    url = "redis://127.0.0.1:6390/0"
    passwords = local_redis.ensure_passwords(tmp_path)
    _pretend_started(tmp_path, url)
    s = load_settings(env={}, home=str(tmp_path), redis_url=url)  # the stack's own settings: admin
    worker_file = local_redis.write_url_file(tmp_path, s.redis_url, "worker")
    assert stat.S_IMODE(worker_file.stat().st_mode) == 0o600
    env = settings_env(s, redis_url_file=worker_file)
    assert "QUORUM_REDIS_URL" not in env and env["QUORUM_REDIS_URL_FILE"] == str(worker_file)
    assert not any(passwords["admin"] in v for v in env.values())  # the admin password stays with the stack
    child = load_settings(env={k: v for k, v in env.items() if k.startswith("QUORUM_")})
    assert child.redis_url == f"redis://worker:{passwords['worker']}@127.0.0.1:6390/0"


def test_settings_env_drops_a_file_form_it_overrides(monkeypatch, tmp_path):
    f = tmp_path / "url"
    f.write_text("redis://127.0.0.1:1/0")
    monkeypatch.setenv("QUORUM_REDIS_URL_FILE", str(f))
    s = load_settings(env={}, redis_url="redis://127.0.0.1:2/0")
    env = settings_env(s)
    assert env["QUORUM_REDIS_URL"] == "redis://127.0.0.1:2/0" and "QUORUM_REDIS_URL_FILE" not in env


def test_default_is_off_but_keeps_the_rights_the_aof_replay_needs():
    acl = render_service_acl({"worker": "0" * 64})
    assert DEFAULT_USER_OFF in acl.splitlines()
    words = DEFAULT_USER_OFF.split()
    assert words[:3] == ["user", "default", "off"] and "resetpass" in words and "nopass" not in words
    assert "+@all" in words and "~*" in words  # AOF transactions replay as `default` (redis/redis#14541)
