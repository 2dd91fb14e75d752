"""``quorum review``: the reviewers' web app (``review.app``), on loopback unless told otherwise."""

from __future__ import annotations

import ipaddress

import click

from ..core.config import settings
from ..core.logs import relay_foreign_output


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("review")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8470, show_default=True, type=click.IntRange(1, 65535))
@click.option("--allow-remote", is_flag=True, help="listen on a non-loopback address (put TLS in front of it)")
def review(host: str, port: int, allow_remote: bool) -> None:
    """Serve the agency's searches to its certified users, who sign in with a one-time token
    (quorum registry user review-token USER) and record a disposition per candidate."""
    import uvicorn

    from ..review.app import create_app

    if not _loopback(host) and not allow_remote:
        raise click.UsageError(f"{host} is not a loopback address: pass --allow-remote (and put TLS in front)")
    s = _review_settings()
    if s.log_json:
        relay_foreign_output()
    click.echo(f"quorum review on http://{host}:{port}/  (sign in with: quorum registry user review-token USER)")
    if not _loopback(host):
        click.echo("its cookies are Secure and __Host- prefixed: reach it through the TLS proxy (https://) only")
    # log_config=None: uvicorn's records go to the process's one log stream (core.logs), not its own format
    app = create_app(s, remote=not _loopback(host))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, log_config=None)


def _review_settings():
    """The settings, logged in as the ``review`` user (its rights only) on the local stack's own Redis."""
    from ..core import local_redis

    s = settings()
    url = local_redis.service_url(s.home, s.redis_url, "review")
    return s.model_copy(update={"redis_url": url}) if url else s


COMMANDS = (review,)
