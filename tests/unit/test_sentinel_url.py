"""The Sentinel URL (``broker.sentinel``): parsed into the sentinels, the primary's name, the data nodes'
credentials and database, and turned into Celery's transport settings (pure logic)."""

from __future__ import annotations

import pytest

from quorum.broker import sentinel


def test_a_sentinel_url_names_the_sentinels_the_primary_and_the_data_user():
    sen = sentinel.parse("redis+sentinel://worker:s3cr%40t@10.0.0.1:26379,10.0.0.2:26380,sen-3:26381/quorum/2")
    assert sen is not None
    assert sen.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sen-3", 26381))
    assert (sen.master, sen.db, sen.username, sen.password, sen.tls) == ("quorum", 2, "worker", "s3cr@t", False)
    assert sen.connection_kwargs() == {"db": 2, "username": "worker", "password": "s3cr@t"}
    assert sen.sentinel_kwargs() == {}
    tls = sentinel.parse("rediss+sentinel://h:26379/q?sentinel_password=pw&ssl_ca_certs=/run/secrets/redis-ca")
    assert tls is not None and tls.tls and tls.db == 0 and tls.username is None
    assert tls.sentinel_kwargs() == {"password": "pw", "ssl": True, "ssl_ca_certs": "/run/secrets/redis-ca"}


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://h:26379", "redis+sentinel://h:26379/q/x", "redis+sentinel://h/q", "redis+sentinel://:1/q"],
)
def test_a_malformed_sentinel_url_is_refused_with_what_to_give(url):
    with pytest.raises(ValueError, match="sentinel"):
        sentinel.parse(url)


def test_one_server_urls_are_not_sentinel_urls():
    assert sentinel.parse("redis://127.0.0.1:6379/0") is None
    assert sentinel.parse("rediss://u:p@redis:6379/0") is None
    assert sentinel.celery_config("redis://127.0.0.1:6379/0") == {
        "broker_url": "redis://127.0.0.1:6379/0",
        "result_backend": "redis://127.0.0.1:6379/0",
        "transport_options": {},
    }


def test_celery_follows_the_primary_through_kombus_sentinel_transport():
    conf = sentinel.celery_config("redis+sentinel://worker:pw@a:26379,b:26380/quorum/0")
    assert conf["broker_url"] == "sentinel://worker:pw@a:26379/0;sentinel://worker:pw@b:26380/0"
    assert conf["result_backend"] == conf["broker_url"]
    assert conf["transport_options"] == {"master_name": "quorum"}
    with pytest.raises(ValueError, match="TLS through Sentinel"):
        sentinel.celery_config("rediss+sentinel://a:26379/quorum")


def test_the_celery_app_takes_the_sentinel_settings():
    from quorum.broker.app import make_app

    app = make_app("redis+sentinel://worker:pw@a:26379,b:26380/quorum/0")
    assert app.conf.broker_url.startswith("sentinel://worker:pw@a:26379/0;")
    assert app.conf.broker_transport_options["master_name"] == "quorum"
    assert app.conf.broker_transport_options["visibility_timeout"] > 0
    assert app.conf.result_backend_transport_options == {"master_name": "quorum"}
