"""Accountability: who may search, and the record of every action.

``registry`` (member agencies, certified users, offence codes, purposes; the database in ``db`` with
Alembic ``migrations``), ``policy`` (the rules as one pure function, checked before any computation),
``audit`` (the append-only, hash-chained trail and its anchors), ``dispositions`` (what happened after
a search), ``retention`` (case holds, probe purge) and ``report`` (the public usage report).
"""
