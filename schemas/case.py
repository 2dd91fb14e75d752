"""The case context of one search: who searched, for which agency and case, why, and which probe.

One value, built once where a search enters (``workers.admission``) and carried from there: into the
job (:meth:`Job.case <quorum.schemas.job.Job.case>`), into every audit record of the search
(``accountability.audit.AuditEvent.of_case``), and onto the candidate sheet. An empty field means
"not known" (a refused request may not say who sent it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaseContext:
    agency_id: str = ""
    user_id: str = ""
    request_id: str = ""
    case_number: str = ""
    offence_code: str = ""
    purpose: str = ""
    probe_sha256: str = ""
