"""Reading the agencies' intake streams so that no agency can slow, block or swell the gateway.

Every member agency may write what it likes to its own stream (``XADD`` is all its Redis user may do),
so the gateway never takes an entry at its word before it has measured it:

* One Lua script (registered with ``register_script``, sent once and then called by its SHA) reads, for
  each stream in the order given, up to ``per_stream`` entries of the consumer group (new ones with
  ``>``, this consumer's pending ones after a given id) and returns each entry whole only when its field
  count and its bytes are within the limits. An entry over them comes back as its id, its size and its
  field count only (:class:`Entry` with ``whole=False``): the gateway answers it ``PAYLOAD_TOO_LARGE``
  without ever holding it, however large the entries an agency wrote. What one read brings into the
  gateway is therefore at most ``streams x per_stream x max_entry_bytes``, and the script stops reading
  further streams once ``max_batch_bytes`` have been gathered.
* The caller rotates the order of the streams on every read (:func:`rotated`), so each agency's stream is
  read first in turn, and hands the entries out interleaved, one per stream at a time
  (:func:`interleave`): one agency's backlog delays another's entry by at most ``per_stream`` entries of
  its own, each measured and refused before it is parsed.

A script cannot block, so the gateway polls: at once again after a read that found entries, else after
a short pause (``IDLE_S``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .keys import as_str

IDLE_S = 0.02  # the pause after a read that found nothing: an entry waits at most this long to be read

# KEYS: the streams. ARGV: group, consumer, count, max_entry_bytes, max_fields, max_batch_bytes, then one
# start id per stream (">" for new entries, an id for this consumer's pending ones after it).
_READ = """
local group, consumer, count = ARGV[1], ARGV[2], ARGV[3]
local max_bytes, max_fields, max_batch = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out, total = {}, 0
for i, stream in ipairs(KEYS) do
  if total >= max_batch then break end
  local res = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, ARGV[6 + i])
  if type(res) == 'table' and res.err then
    out[#out + 1] = {stream, res.err}
  elseif res and res[1] then
    local entries = {}
    local got = res[1][2]
    if type(res[1]) == 'string' then got = res[2] end  -- fakeredis (unit tests) flattens the reply
    for _, e in ipairs(got) do
      local id, f = e[1], e[2]
      if not f then
        entries[#entries + 1] = {id, 0, 0, 0, {}}  -- pending, but deleted from the stream since
      else
        local size = 0
        for _, v in ipairs(f) do size = size + #v end
        local n = #f / 2
        if size > max_bytes or n > max_fields then
          entries[#entries + 1] = {id, size, n, 0, {}}
        else
          total = total + size
          entries[#entries + 1] = {id, size, n, 1, f}
        end
      end
    end
    out[#out + 1] = {stream, entries}
  end
end
return out
"""


@dataclass(frozen=True)
class Entry:
    """One intake entry as read: ``fields`` only when ``whole`` (within the limits); an entry deleted
    from the stream while it was pending has no fields and ``size`` 0."""

    stream: str
    id: str
    size: int
    n_fields: int
    whole: bool
    fields: dict[bytes | str, Any] = field(default_factory=dict)

    @property
    def deleted(self) -> bool:
        return self.whole is False and self.size == 0 and self.n_fields == 0


@dataclass(frozen=True)
class Limits:
    max_entry_bytes: int
    max_fields: int
    per_stream: int
    max_batch_bytes: int


class StreamError(Exception):
    """Redis refused the read of one stream (e.g. its consumer group is gone)."""

    def __init__(self, stream: str, message: str) -> None:
        super().__init__(f"{stream}: {message}")
        self.stream = stream


class IntakeReader:
    def __init__(self, redis: Any, group: str, consumer: str, limits: Limits) -> None:
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.limits = limits
        self._read = redis.register_script(_READ)

    def read(self, starts: Sequence[tuple[str, str]]) -> tuple[list[list[Entry]], list[StreamError]]:
        """Read ``(stream, start id)`` pairs in the order given: the entries per stream, and the streams
        Redis refused to read."""
        if not starts:
            return [], []
        lim = self.limits
        raw = self._read(
            keys=[s for s, _ in starts],
            args=[
                self.group,
                self.consumer,
                lim.per_stream,
                lim.max_entry_bytes,
                lim.max_fields,
                lim.max_batch_bytes,
                *(start for _, start in starts),
            ],
        )
        per_stream: list[list[Entry]] = []
        errors: list[StreamError] = []
        for stream_raw, body in raw or []:
            stream = as_str(stream_raw)
            if isinstance(body, (bytes, str)):
                errors.append(StreamError(stream, as_str(body)))
                continue
            per_stream.append([_entry(stream, e) for e in body])
        return per_stream, errors


def _entry(stream: str, e: Sequence[Any]) -> Entry:
    entry_id, size, n, whole, flat = e
    fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)} if whole else {}
    return Entry(stream, as_str(entry_id), int(size), int(n), bool(whole), fields)


def rotated(streams: Iterable[str], turn: int) -> list[str]:
    """The streams in a fixed order, started at ``turn`` (mod their number): each is first in turn."""
    ordered = sorted(streams)
    if not ordered:
        return []
    k = turn % len(ordered)
    return ordered[k:] + ordered[:k]


def interleave(per_stream: Sequence[Sequence[Entry]]) -> Iterator[Entry]:
    """One entry of each stream at a time: the first of every stream, then the second, ..."""
    longest = max((len(batch) for batch in per_stream), default=0)
    for i in range(longest):
        for batch in per_stream:
            if i < len(batch):
                yield batch[i]
