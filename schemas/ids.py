"""The id grammar: what an agency id, a user id, a subject id and a request id may be. One place,
used by the schemas (``ProbeRequest``), the registry (agency and user ids, the Redis ACL rendered from
them) and enrolment (subject ids).

Why each rule:

* **Agency ids** name Redis keys and ACL key patterns (``quorum:result:<agency>:*``) and the agency's
  Redis user (``agency-<agency>``). Lower-case ASCII letters, digits, ``-`` and ``_``, starting with a
  letter or digit, at most 32: no ``:`` (``lasd:east`` would fall under ``lasd``'s
  ``quorum:result:lasd:*``), no glob character (``* ? [ ] \\``), no space or control character (an ACL
  line that ``ACL SETUSER`` and ``redis-server --aclfile`` refuse), and one spelling per agency.
* **User and subject ids**: printable ASCII letters, digits, ``-``, ``_`` and ``.``, starting with a
  letter or digit, at most 64. Mixed case (booking numbers, SIDs). ASCII only, so no control, bidi
  (a right-to-left override that shows ``gnp.exe`` as ``exe.png``) or look-alike character (a Cyrillic
  ``а`` in a real name), no markup (``"><script>``) and no path (``../../``). Every LFW identity
  (``../shared/data``: ``Aaron_Peirsol``, ``Jean-Claude_Van_Damme``, at most 35 characters) fits.
* **Request ids**, chosen by the agency's software, keep the grammar they had (``:`` and ``.``
  allowed): they only ever follow the agency in a key, so they cannot reach another agency's keys.

The patterns are written for JSON Schema (ECMA-262) and pydantic alike; :func:`problem` checks a value
in Python (``re.fullmatch``: a trailing newline does not pass).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final

AGENCY_ID_MAX: Final = 32
PERSON_ID_MAX: Final = 64  # user and subject ids
REQUEST_ID_MAX: Final = 128

AGENCY_ID_PATTERN: Final = rf"^[a-z0-9][a-z0-9_-]{{0,{AGENCY_ID_MAX - 1}}}$"
USER_ID_PATTERN: Final = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{PERSON_ID_MAX - 1}}}$"
SUBJECT_ID_PATTERN: Final = USER_ID_PATTERN
REQUEST_ID_PATTERN: Final = rf"^[A-Za-z0-9][A-Za-z0-9._:-]{{0,{REQUEST_ID_MAX - 1}}}$"


class IdKind(StrEnum):
    AGENCY = "agency id"
    USER = "user id"
    SUBJECT = "subject id"
    REQUEST = "request id"


_RULES: Final = {
    IdKind.AGENCY: (
        re.compile(AGENCY_ID_PATTERN[1:-1]),
        AGENCY_ID_MAX,
        "lower-case ASCII letters, digits, '-' and '_', starting with a letter or digit",
    ),
    IdKind.USER: (
        re.compile(USER_ID_PATTERN[1:-1]),
        PERSON_ID_MAX,
        "ASCII letters, digits, '-', '_' and '.', starting with a letter or digit",
    ),
    IdKind.SUBJECT: (
        re.compile(SUBJECT_ID_PATTERN[1:-1]),
        PERSON_ID_MAX,
        "ASCII letters, digits, '-', '_' and '.', starting with a letter or digit",
    ),
    IdKind.REQUEST: (
        re.compile(REQUEST_ID_PATTERN[1:-1]),
        REQUEST_ID_MAX,
        "ASCII letters, digits, '-', '_', '.' and ':', starting with a letter or digit",
    ),
}


def problem(kind: IdKind, value: object) -> str | None:
    """Why ``value`` is not a valid id of ``kind`` (one sentence naming it safely: ``ascii()``, so a
    bidi or control character is shown escaped, never rendered), or None when it is valid."""
    pattern, longest, allowed = _RULES[kind]
    if not isinstance(value, str):
        return f"{kind} must be a string, not {type(value).__name__}"
    if pattern.fullmatch(value):
        return None
    shown = ascii(value) if len(value) <= 80 else ascii(value[:77]) + "..."
    if not value:
        return f"{kind} is empty"
    if len(value) > longest:
        return f"{kind} {shown} is {len(value)} characters long; at most {longest}"
    return f"{kind} {shown} is not valid: {allowed}, at most {longest} characters"


def is_valid(kind: IdKind, value: object) -> bool:
    return problem(kind, value) is None
