"""A Celery app on the project's broker configuration (broker.app.make_app) with one echo task, for
tests/integration/test_redis_tls.py: a worker process logged in as the `worker` ACL user over
rediss:// consumes the intake queue; the test sends as the `gateway` user and reads the result."""

from __future__ import annotations

import os

from quorum.broker.app import make_app

app = make_app(os.environ["QUORUM_REDIS_URL"])
app.conf.include = []  # not the real stages: no models to load


@app.task(name="quorum.intake.echo")
def echo(value: str) -> str:
    return f"echo {value}"
