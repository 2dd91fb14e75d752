"""Publishing results onto an agency's result stream (and reading one back).

A request's result is published exactly once: a Lua script sets the request's result key only if
it is absent and, in the same atomic step, appends the result to the agency's stream. A redelivered
fusion task, or the fusion deadline firing after the normal fusion, therefore publishes nothing.
"""

from __future__ import annotations

from ..schemas import CandidateList, ErrorResult, parse_result
from . import keys

_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[3], 'request_id', ARGV[4],
                    'payload', ARGV[1])
end
return false
"""


# The results stream is how agencies hear of answers, not where answers are kept (the result key is,
# for ``result_ttl_s``): it keeps about this many of the newest entries per agency.
RESULTS_STREAM_MAXLEN = 10_000


def publish(
    redis, result: CandidateList | ErrorResult, *, ttl_s: int, keyed: bool = True, maxlen: int = RESULTS_STREAM_MAXLEN
) -> str | None:
    """Publish ``result``; returns the stream entry id, or None if this request was already answered.

    ``keyed=False`` appends to the stream without claiming the request's result key: used for
    answers that are not *the* result of the request id they carry (a duplicate submission, or a
    message with no usable request id).
    """
    body = result.model_dump_json()
    stream = keys.results_stream(result.agency_id)
    fields = {"type": result.type, "request_id": result.request_id or "", "payload": body}
    if keyed and result.request_id:
        entry = redis.eval(
            _PUBLISH_ONCE,
            2,
            keys.result_key(result.agency_id, result.request_id),
            stream,
            body,
            ttl_s,
            result.type,
            result.request_id,
            maxlen,
        )
        if entry is None:
            return None
    else:
        entry = redis.xadd(stream, fields, maxlen=maxlen, approximate=True)
    return entry.decode() if isinstance(entry, bytes) else entry


def fetch(redis, agency: str, request_id: str) -> CandidateList | ErrorResult | None:
    raw = redis.get(keys.result_key(agency, request_id))
    return parse_result(raw) if raw else None
