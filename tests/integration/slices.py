"""Which rows of the ci split each module enrols into the shared session stack (``disk_stack``).

The modules share one gallery, and an engine keeps one template per (subject, image): a module that
enrols a row another module enrolled first gets "already held" for it, not "added", and its count
checks fail. So every module that enrols into the shared stack takes its rows from here, and
``tests/unit/test_layout.py`` checks that the slices are disjoint and inside the split (120 gallery
rows, 200 distractor rows). Stacks of their own (``own_stack``) may use any rows.
"""

from __future__ import annotations

from pathlib import Path

GALLERY: dict[str, tuple[int, int]] = {
    "bad_input": (0, 20),
    "nist_stack": (20, 30),
    "accountability": (30, 36),
    "review": (36, 45),
    "cli": (45, 60),
    "metrics": (60, 66),
    "clients": (66, 75),
    "hostile_input": (75, 85),
    "sheet": (90, 100),
    "agency_isolation": (100, 110),
    "load": (110, 120),
}
DISTRACTORS: dict[str, tuple[int, int]] = {
    "review": (120, 150),
    "sheet": (150, 200),
}
SPLIT_SIZES = {"gallery": 120, "distractor_gallery": 200}


def rows(data_dir: Path, module: str, role: str = "gallery") -> list:
    """The split's rows of ``role`` that ``module`` may enrol into the shared stack."""
    from quorum.evaluation.ci_split import read_split

    start, stop = (GALLERY if role == "gallery" else DISTRACTORS)[module]
    return [r for r in read_split(data_dir / "ci") if r.role == role][start:stop]
