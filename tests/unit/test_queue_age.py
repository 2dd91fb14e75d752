"""The age of the oldest message on a queue, read from the header every Quorum message carries."""

from __future__ import annotations

import json

from celery.signals import before_task_publish

from quorum.broker.app import SENT_AT_HEADER, oldest_message_age


def test_every_published_message_is_stamped_with_its_send_time() -> None:
    headers: dict = {"id": "x"}
    before_task_publish.send(sender="quorum.engine.search", headers=headers, body=None)
    assert isinstance(headers[SENT_AT_HEADER], float)
    stamped = headers[SENT_AT_HEADER]
    before_task_publish.send(sender="quorum.engine.search", headers=headers, body=None)  # a resend keeps it
    assert headers[SENT_AT_HEADER] == stamped


def test_age_from_the_envelope_the_redis_transport_stores() -> None:
    # kombu's Redis transport LPUSHes json.dumps of the message: body (base64), content type, headers
    # (Celery's, with ours), properties.
    raw = json.dumps(
        {
            "body": "W1tdLCB7fSwge31d",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "quorum.fusion.fuse", "id": "r1", SENT_AT_HEADER: 1000.0},
            "properties": {"delivery_tag": "t", "priority": 0},
        }
    ).encode()
    assert oldest_message_age(raw, now=1042.5) == 42.5
    assert oldest_message_age(raw, now=999.0) == 0.0  # a sender's clock ahead: never negative
    assert oldest_message_age(None, now=5.0) == 0.0  # empty queue
    assert oldest_message_age(json.dumps({"headers": {}}), now=5.0) == 0.0  # sent before the header existed
    assert oldest_message_age(b"\xff not json", now=5.0) == 0.0
