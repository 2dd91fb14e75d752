"""The usage (transparency) report, built from the audit trail alone: ``quorum report usage``.

For a period ``[from, to)`` (UTC), it counts

* submissions (``search.submitted``) per agency, purpose, offence code and outcome (``accepted`` or
  ``refused:<CODE>``);
* published results (``search.result``) per agency and outcome (``ok``, ``degraded``, ``error:<CODE>``);
* an accepted search or a result once per request id: a request an agency submitted again under the same
  id because Redis lost it (``QuorumClient.resubmit_lost``) has a second ``accepted`` record in the
  trail (the trail keeps every event), but it is one search;
* dispositions recorded in the period, per agency, disposition and status (``final``, ``pending``,
  ``confirmed``),

and renders them as Markdown (the annual public report) or CSV (one long table:
``section,agency,purpose,offence_code,outcome,count``).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from ..schemas import INVESTIGATIVE_LEAD_NOTICE
from . import audit, db

CSV_HEADER = ("section", "agency", "purpose", "offence_code", "outcome", "count")


@dataclass
class UsageReport:
    since: str
    until: str
    searches: Counter = field(default_factory=Counter)  # (agency, purpose, offence, outcome) -> n
    results: Counter = field(default_factory=Counter)  # (agency, outcome) -> n
    dispositions: Counter = field(default_factory=Counter)  # (agency, disposition, status) -> n

    def by(self, index: int, *, accepted_only: bool = False) -> Counter:
        out: Counter = Counter()
        for key, n in self.searches.items():
            if not accepted_only or key[3] == "accepted":
                out[key[index]] += n
        return out


def usage(eng: Engine, since: str, until: str) -> UsageReport:
    t, d = db.audit_log, db.dispositions
    lo, hi = audit._ts_bound(since), audit._ts_bound(until)
    rep = UsageReport(lo, hi)
    with eng.connect() as conn:
        q = (
            select(
                t.c.action,
                t.c.agency,
                t.c.purpose,
                t.c.offence_code,
                t.c.outcome,
                t.c.code,
                func.count().label("n"),
                func.count(func.distinct(t.c.request_id)).label("requests"),
            )
            .where(t.c.ts >= lo, t.c.ts < hi, t.c.action.in_([audit.SEARCH_SUBMITTED, audit.SEARCH_RESULT]))
            .group_by(t.c.action, t.c.agency, t.c.purpose, t.c.offence_code, t.c.outcome, t.c.code)
        )
        for r in conn.execute(q):
            outcome = r.outcome if not r.code else f"{r.outcome}:{r.code}"
            if r.action == audit.SEARCH_SUBMITTED:
                # Refusals count every attempt (a replay refused twice was tried twice); an accepted
                # request counts once however often it was resubmitted.
                n = r.requests if r.outcome == "accepted" else r.n
                rep.searches[(r.agency, r.purpose, r.offence_code, outcome)] += n
            else:
                rep.results[(r.agency, outcome)] += r.requests
        q = (
            select(d.c.agency_id, d.c.outcome, d.c.status, func.count().label("n"))
            .where(d.c.recorded_at >= lo, d.c.recorded_at < hi)
            .group_by(d.c.agency_id, d.c.outcome, d.c.status)
        )
        for r in conn.execute(q):
            rep.dispositions[(r.agency_id, r.outcome, r.status)] += r.n
    return rep


def to_csv(rep: UsageReport) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for (agency, purpose, offence, outcome), n in sorted(rep.searches.items()):
        w.writerow(("search", agency, purpose, offence, outcome, n))
    for (agency, outcome), n in sorted(rep.results.items()):
        w.writerow(("result", agency, "", "", outcome, n))
    for (agency, disposition, status), n in sorted(rep.dispositions.items()):
        w.writerow(("disposition", agency, "", "", f"{disposition}/{status}", n))
    return buf.getvalue()


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) if c != "" else "(none)" for c in row) + " |" for row in rows]
    return out if rows else [*out, "| " + " | ".join(["-"] * len(header)) + " |"]


def to_markdown(rep: UsageReport) -> str:
    agencies = sorted({k[0] for k in rep.searches} | {k[0] for k in rep.results})
    lines = [
        f"# Quorum usage report, {rep.since} to {rep.until} (UTC)",
        "",
        f"> {INVESTIGATIVE_LEAD_NOTICE}",
        "",
        f"Searches submitted: {sum(rep.searches.values())}; accepted: "
        f"{sum(n for k, n in rep.searches.items() if k[3] == 'accepted')}; refused: "
        f"{sum(n for k, n in rep.searches.items() if k[3] != 'accepted')}.",
        "",
        "## Searches per agency",
        "",
    ]
    rows = []
    for a in agencies:
        sub = {k: n for k, n in rep.searches.items() if k[0] == a}
        res = {k: n for k, n in rep.results.items() if k[0] == a}
        rows.append(
            (
                a,
                sum(sub.values()),
                sum(n for k, n in sub.items() if k[3] == "accepted"),
                sum(n for k, n in sub.items() if k[3] != "accepted"),
                res.get((a, "ok"), 0),
                res.get((a, "degraded"), 0),
                sum(n for k, n in res.items() if k[1].startswith("error")),
            )
        )
    lines += _table(("agency", "submitted", "accepted", "refused", "lists", "degraded lists", "errors"), rows)
    for title, idx in (("purpose", 1), ("offence code", 2)):
        lines += ["", f"## Searches per {title}", ""]
        keys = sorted({k[idx] for k in rep.searches})
        lines += _table(
            (title, "accepted", "refused"),
            [
                (
                    k,
                    sum(n for kk, n in rep.searches.items() if kk[idx] == k and kk[3] == "accepted"),
                    sum(n for kk, n in rep.searches.items() if kk[idx] == k and kk[3] != "accepted"),
                )
                for k in keys
            ],
        )
    lines += ["", "## Refusals by reason", ""]
    refusals: Counter[str] = Counter()
    for k, n in rep.searches.items():
        if k[3] != "accepted":
            refusals[k[3].split(":", 1)[-1]] += n
    lines += _table(("code", "refused"), sorted(refusals.items()))
    lines += ["", "## Results", ""]
    lines += _table(("agency", "outcome", "count"), [(a, o, n) for (a, o), n in sorted(rep.results.items())])
    lines += ["", "## Dispositions", ""]
    lines += _table(
        ("agency", "disposition", "status", "count"),
        [(a, d, s, n) for (a, d, s), n in sorted(rep.dispositions.items())],
    )
    return "\n".join(lines) + "\n"
