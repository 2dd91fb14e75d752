"""Publishing results onto an agency's result stream (and reading one back).

A request's result is published exactly once: a Lua script sets the request's result key only if
it is absent and, in the same atomic step, appends the result to the agency's stream. A redelivered
fusion task, or the fusion deadline firing after the normal fusion, therefore publishes nothing.
"""

from __future__ import annotations

import time
from typing import Any

from ..schemas import CandidateList, ErrorResult, parse_result
from . import keys, scripts

_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[3], 'request_id', ARGV[4],
                        'payload', ARGV[1])
  redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[6])
  return id
end
return false
"""


# The results stream is how agencies hear of answers, not where answers are kept: it keeps the answers
# of the last ``result_hold_s`` (trimmed by age, MINID), and at most about this many per agency (about
# 50 KB each: 50 MB per agency, 3.2 GB for 64 agencies at the worst).
RESULTS_STREAM_MAXLEN = 1_000


def publish(
    redis,
    result: CandidateList | ErrorResult,
    *,
    ttl_s: int,
    keyed: bool = True,
    maxlen: int = RESULTS_STREAM_MAXLEN,
    stream_age_s: float | None = None,
) -> str | None:
    """Publish ``result``; returns the stream entry id, or None if this request was already answered.

    ``keyed=False`` appends to the stream without claiming the request's result key: used for
    answers that are not *the* result of the request id they carry (a duplicate submission, or a
    message with no usable request id).
    """
    body = result.model_dump_json()
    stream = keys.results_stream(result.agency_id)
    min_id = f"{int((time.time() - (stream_age_s if stream_age_s is not None else ttl_s)) * 1000)}-0"
    fields = {"type": result.type, "request_id": result.request_id or "", "payload": body}
    if keyed and result.request_id:
        entry = scripts.call(
            redis,
            _PUBLISH_ONCE,
            [keys.result_key(result.agency_id, result.request_id), stream],
            [body, ttl_s, result.type, result.request_id, maxlen, min_id],
        )
        if entry is None:
            return None
    else:
        entry = redis.xadd(stream, fields, maxlen=maxlen, approximate=True)
        redis.xtrim(stream, minid=min_id, approximate=True)
    return entry.decode() if isinstance(entry, bytes) else entry


def fetch(redis, agency: str, request_id: str, store: Any = None) -> CandidateList | ErrorResult | None:
    """A request's published result: from Redis while it holds it, then from ``store`` (the object store),
    where :func:`archive` put it for ``result_ttl_s``."""
    raw = redis.get(keys.result_key(agency, request_id))
    if raw:
        return parse_result(raw)
    if store is None:
        return None
    if store.size(keys.result_object(agency, request_id)) is None:
        return None
    return parse_result(store.get(keys.result_object(agency, request_id)))


def archive(store: Any, result: CandidateList | ErrorResult) -> None:
    """Keep a published result in the object store (``keys.result_object``) for lookups after Redis has
    let it go. Raises the store's error when it cannot."""
    if result.request_id:
        store.put(keys.result_object(result.agency_id, result.request_id), result.model_dump_json().encode())
