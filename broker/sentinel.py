"""Redis Sentinel: one URL names the sentinels and the primary they watch, and every Quorum client
(services, CLI, Celery's transport and results, the Python agency client) follows the primary through a
failover.

    redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB][?sentinel_password=...]
    rediss+sentinel://...   TLS to the sentinels and the data nodes (ssl_ca_certs=..., as for rediss://):
                            Quorum's own clients only, not yet tried against TLS sentinels; Celery's
                            transport refuses it (not supported yet)

USER and PASSWORD are the data nodes' ACL user (the same on every node: the ACL file is loaded on each,
``quorum deploy acl-load`` does so); ``sentinel_password`` is the sentinels' own, if they require one.
A plain ``redis://`` / ``rediss://`` URL is one server, as before.

What is acknowledged when (deploy/README.md "Redis failover"): replication is asynchronous, so a write
the old primary acknowledged may be lost in a failover unless a replica had it. With
``QUORUM_REDIS_WAIT_REPLICAS`` > 0 the gateway acknowledges an intake entry (XACK) and a result is
published (the fusion task then acknowledged) only after that many replicas confirmed the writes before
it (``WAIT``); the agency client waits the same way after XADD and resubmits a request Redis no longer
knows (``QuorumClient.resubmit_lost``), and a request id is admitted once (the request claim), so a
failover loses no accepted probe and a reader sees each answer once per request id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_CONN_QUERY = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}


@dataclass(frozen=True)
class SentinelURL:
    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_password: str | None = None
    tls_options: dict[str, str] = field(default_factory=dict)

    def connection_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.tls:
            kw |= {"ssl": True, **self.tls_options}
        return kw

    def sentinel_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"password": self.sentinel_password} if self.sentinel_password else {}
        if self.tls:
            kw |= {"ssl": True, **self.tls_options}
        return kw


def parse(url: str) -> SentinelURL | None:
    """The sentinel URL's parts; None for a URL of one server (``redis://``, ``rediss://``)."""
    scheme = url.split("://", 1)[0]
    if scheme not in SCHEMES:
        return None
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    auth, hostlist = (netloc[0], netloc[1]) if len(netloc) == 2 else ("", netloc[0])
    user, _, password = auth.partition(":")
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{scheme} URL: {item!r} is not HOST:PORT of a sentinel")
        hosts.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{scheme} URL: give /MASTER[/DB] after the sentinels (e.g. /quorum/0)")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return SentinelURL(
        hosts=tuple(hosts),
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        tls=SCHEMES[scheme],
        sentinel_password=query.get("sentinel_password"),
        tls_options={k: v for k, v in query.items() if k in _CONN_QUERY},
    )


def sentinel_for(sen: SentinelURL, **kwargs: Any) -> Any:
    from redis.sentinel import Sentinel

    timeout = kwargs.get("socket_connect_timeout", 2.0)
    return Sentinel(
        list(sen.hosts),
        sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout, **sen.sentinel_kwargs()},
        **{**sen.connection_kwargs(), **kwargs},
    )


def open_redis(url: str, redis_class: Any = redis.Redis, **kwargs: Any) -> Any:
    """A client of ``url``: of its one server, or of the primary its sentinels name (followed through a
    failover: a connection lost or refused as read-only asks the sentinels again)."""
    sen = parse(url)
    if sen is None:
        return redis_class.from_url(url, **kwargs)
    return sentinel_for(sen, **kwargs).master_for(sen.master, redis_class=redis_class)


def data_nodes(url: str, **kwargs: Any) -> list[Any]:
    """A client of every data node (the primary first, then the replicas): what is not replicated, such as
    the ACL (``ACL LOAD``), is done on each. One client for a one-server URL."""
    sen = parse(url)
    if sen is None:
        return [redis.Redis.from_url(url, **kwargs)]
    sentinel = sentinel_for(sen, **kwargs)
    primary = sentinel.discover_master(sen.master)
    nodes = [primary, *(n for n in sentinel.discover_slaves(sen.master) if n != primary)]
    return [redis.Redis(host=h, port=p, **{**sen.connection_kwargs(), **kwargs}) for h, p in nodes]


def celery_config(url: str) -> dict[str, Any]:
    """Celery's broker and result-backend settings for ``url``: kombu's ``sentinel://`` transport and
    Celery's sentinel result backend, both following the named primary; for a one-server URL, just it."""
    sen = parse(url)
    if sen is None:
        return {"broker_url": url, "result_backend": url, "transport_options": {}}
    if sen.tls:
        raise ValueError(
            "rediss+sentinel://: TLS through Sentinel is not supported for Celery's transport yet; "
            "use redis+sentinel:// on a private network, or one TLS server (rediss://)"
        )
    auth = ""
    if sen.password:
        auth = f"{sen.username or ''}:{sen.password}@"
    joined = ";".join(f"sentinel://{auth}{h}:{p}/{sen.db}" for h, p in sen.hosts)
    options: dict[str, Any] = {"master_name": sen.master}
    if sen.sentinel_password:
        options["sentinel_kwargs"] = {"password": sen.sentinel_password}
    return {"broker_url": joined, "result_backend": joined, "transport_options": options}


FENCE_KEY = "quorum:alive:fence"  # written just before WAIT (the worker and gateway users may write it)


def replicated(client: Any, replicas: int, timeout_ms: int, where: str) -> int:
    """Block until ``replicas`` replicas hold every write this process made so far (or the timeout); how
    many did. WAIT counts the writes of its own connection, and a process's writes go over several
    pooled connections, so a fence write goes first on WAIT's connection: the replication stream is
    one ordered stream, and a replica that has the fence has everything written before it. 0 replicas
    asked: nothing is sent."""
    if replicas <= 0:
        return 0
    pipe = client.pipeline(transaction=False)
    pipe.incr(FENCE_KEY)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    acked = int(pipe.execute()[1])
    if acked < replicas:
        from ..core import metrics

        metrics.REDIS_WAIT_SHORT.labels(where).inc()
    return acked
