"""Lua scripts sent to Redis once per client and then called by their SHA (``EVALSHA``; redis-py loads the
text again on ``NOSCRIPT``, after a restart or a failover), so a script's text is not sent with each call."""

from __future__ import annotations

import threading
import weakref
from typing import Any

_scripts: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def call(redis: Any, text: str, keys: list[str], args: list[Any]) -> Any:
    """Run the script ``text`` on ``redis`` with ``keys`` and ``args``."""
    with _lock:
        per_client = _scripts.setdefault(redis, {})
        script = per_client.get(text)
        if script is None:
            script = per_client[text] = redis.register_script(text)
    return script(keys=keys, args=args)
