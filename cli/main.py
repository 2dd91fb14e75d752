"""The ``quorum`` command: the root group, and every command group registered on it.

Each group lives in its own module: ``processes`` (gateway, worker), ``local`` (up, down, status),
``gallery`` (enroll, gallery), ``search``, ``sheet``, ``review``, ``demo``, ``db``, ``deploy``, ``registry``,
``audit`` (audit, report), ``dispositions``, ``retention`` (case, probes), ``models`` (convert-facenet) and
``evaluate`` (eval, calibrate, eval-subsets). Errors a user can act on are turned into messages by
:class:`cli.common.QuorumGroup`.
"""

from __future__ import annotations

import click

from ..core.logs import configure_logging
from . import (
    audit,
    db,
    demo,
    deploy,
    dispositions,
    gallery,
    local,
    models,
    processes,
    registry,
    retention,
    review,
    search,
    sheet,
)
from .common import QuorumGroup, load_settings_or_fail
from .evaluate import calibrate_command, eval_command, eval_subsets_command


@click.group(cls=QuorumGroup)
def main() -> None:
    """Quorum: multi-engine face search. Every candidate list is an investigative lead only."""
    s = load_settings_or_fail()
    configure_logging(s.log_level, s.log_json)
    _log_local_redis_user(s)


def _log_local_redis_user(s) -> None:
    """Say so when this command logs in to the local stack's Redis as its admin user (core.local_redis)."""
    from ..core import local_redis

    if local_redis.url_user(s.redis_url) == local_redis.ADMIN and local_redis.owns(s.home, s.redis_url):
        import structlog

        structlog.get_logger().info(
            "redis.local_admin",
            user=local_redis.ADMIN,
            server=local_redis.server_address(s.redis_url),
            passwords=str(local_redis.passwords_file(s.home)),
        )


for _module in (
    processes,
    local,
    gallery,
    search,
    sheet,
    review,
    demo,
    db,
    deploy,
    registry,
    audit,
    dispositions,
    retention,
    models,
):
    for _command in _module.COMMANDS:
        main.add_command(_command)
main.add_command(eval_command)
main.add_command(calibrate_command)
main.add_command(eval_subsets_command)

if __name__ == "__main__":
    main()
