"""Every Celery queue has a binding of its own (its name is its routing key, on its own exchange), so a
message published for one queue reaches that queue only. Real redis-server; kombu's Redis transport keeps
the bindings it routes by in Redis, which is what a worker declares when it starts."""

from __future__ import annotations

import pytest
from kombu import Connection, Exchange, Producer

from quorum.broker.app import ALL_QUEUES, make_app, reindex_queue, shard_queue
from tests.integration.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def app_on_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        app = make_app(server.url)
        yield app, server.url
    finally:
        server.stop()


def _depths(conn: Connection, queues) -> dict[str, int]:
    client = conn.default_channel.client
    return {q: client.llen(q) for q in queues}


def test_a_message_for_one_queue_reaches_no_other(app_on_redis) -> None:
    app, url = app_on_redis
    dynamic = (shard_queue("sface", 0, 2), reindex_queue("sface"))  # made on first use, as workers make them
    with Connection(url) as conn:
        queues = [app.amqp.queues[q] for q in (*ALL_QUEUES, *dynamic)]
        for q in queues:
            q(conn.default_channel).declare()  # what each worker does on start
        names = [q.name for q in queues]
        assert len({(q.exchange.name, q.routing_key) for q in queues}) == len(queues), [
            (q.name, q.exchange.name, q.routing_key) for q in queues
        ]
        for q in queues:
            assert q.exchange.name == q.name and q.routing_key == q.name and q.exchange.type == "direct"
        # Published to an exchange and routing key by hand (not by queue name): only that queue gets it.
        producer = Producer(conn.default_channel)
        for target in names:
            before = _depths(conn, names)
            producer.publish({"probe": target}, exchange=Exchange(target, type="direct"), routing_key=target)
            after = _depths(conn, names)
            grew = {q for q in names if after[q] != before[q]}
            assert grew == {target}, (target, grew)
    # And as the pipeline sends: by task name and queue.
    with Connection(url) as conn:
        for target in ("intake", "fusion", "engine.sface"):
            before = _depths(conn, names)
            app.send_task("quorum.engine.search", kwargs={"request_id": "r", "engine": "sface"}, queue=target)
            after = _depths(conn, names)
            assert {q for q in names if after[q] != before[q]} == {target}
