"""The pipeline's stages as plain functions, one module a stage: intake, search (with its shards),
fusion, enrolment; ``context`` is what each is given and gives back, ``answer`` how a request is answered.

A probe's life: the gateway admits it and sends ``prepare``; :func:`~.intake.prepare` finds the face and
asks for one ``search`` per engine plus a backstop ``fuse`` at ``search_timeout_s``;
:func:`~.search.search` records one engine's result (a sharded engine embeds once and scatters to its
shards, :func:`~.shards.shard_search`) and, when it is the first in, asks for a ``fuse`` at
``fusion_deadline_s``, and when it is the last, for a ``fuse`` now; :func:`~.fusion.fuse` publishes the
candidate list exactly once (``broker.results``).

Every stage is idempotent, so late acknowledgement and redelivery after a worker dies are safe: an
engine result is a hash field that a rerun does not recompute, enrolment skips templates already
logged, and publication is guarded by the request's result key. The stages are unit-tested with a
context built from fakes (``tests/unit/test_stages.py``); integration tests run them through real workers.
"""

from .answer import AUDIT_RETRY_S, AnswerHeld, answer
from .context import Outcome, Send, StageContext, StageResult
from .enrolment import enrol, enrol_detect, snapshot
from .fusion import assemble, fuse
from .intake import prepare
from .search import engine_list_length, run_engine, search
from .shards import merge_shard_answers, shard_search

__all__ = [
    "AUDIT_RETRY_S",
    "AnswerHeld",
    "Outcome",
    "Send",
    "StageContext",
    "StageResult",
    "answer",
    "assemble",
    "engine_list_length",
    "enrol",
    "enrol_detect",
    "fuse",
    "merge_shard_answers",
    "prepare",
    "run_engine",
    "search",
    "shard_search",
    "snapshot",
]
