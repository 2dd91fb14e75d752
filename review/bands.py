"""Score bands a person can read: the fused score placed against measured FPIR thresholds.

The fused score of the default method (``logit``) is the log-odds a logistic model gives that the
candidate is the probe's mate; on its own a number like 2.93 means little. The bands say what the
benchmark measured at that height: the *threshold at FPIR p* is the lowest fused score at which at
most a share p of searches for people **not** in the gallery returned any candidate scoring that
high or higher (BENCHMARKS.md, "FNIR at FPIR p"). A candidate at or above the FPIR 0.1 % threshold
is *strong*, at or above the FPIR 1 % threshold *moderate*, below it *weak*.

The thresholds are not invented here: :func:`derive` reads them from the accuracy report that
``quorum eval`` wrote (``bench/results/lfw-dev/report.json``, the held-out *test* part, which the
calibration never saw) for the method the calibration made the default, and ``bands.json`` is its
output, with where each number came from. ``python -m quorum.review.bands`` writes it again after a new
``quorum eval``; a unit test keeps the file equal to what :func:`derive` computes from the report.

A band is only given for a candidate list fused with the method the thresholds were measured for;
any other method (``zsum`` when the calibration does not match the running engines, ``rrf``) gets
no band, and the sheet says why. The thresholds were measured on one gallery (lfw-dev, 3,564
identities): the false-positive rate at a threshold grows with the gallery and changes with its
population, so a band is a guide to reading the score, never a probability of identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BANDS_FILE = Path(__file__).resolve().parent / "bands.json"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = REPO / "bench" / "results" / "lfw-dev" / "report.json"
DEFAULT_CALIBRATION = REPO / "workers" / "calibration.json"
REPORT_PART = "test"  # held out from fitting: the honest part to read thresholds from
STRONG_FPIR = 0.001
MODERATE_FPIR = 0.01


@dataclass(frozen=True)
class Band:
    name: str  # strong | moderate | weak
    label: str  # what the sheet prints
    min_score: float | None  # lowest fused score in the band (None: no lower bound)
    fpir: float | None  # the FPIR target whose threshold is the band's floor
    explain: str


@dataclass(frozen=True)
class Bands:
    method: str
    calibration_fitted: str
    source: str  # one line: where the thresholds were measured
    bands: tuple[Band, ...]  # highest first

    def band_for(self, score: float, method: str) -> Band | None:
        """The band of a fused ``score`` from a list fused with ``method`` (None: not measured for it)."""
        if method != self.method:
            return None
        for band in self.bands:
            if band.min_score is None or score >= band.min_score:
                return band
        return None


def _pct(p: float) -> str:
    v = p * 100
    return f"{v:.0f} %" if v >= 10 else f"{v:.2g} %"


def derive(report: dict[str, Any], calibration: dict[str, Any], *, report_name: str) -> dict[str, Any]:
    """``bands.json`` from an accuracy report (``quorum eval``) and the calibration it evaluated."""
    method = calibration["default_method"]
    part = report["parts"][REPORT_PART][method]
    points = {round(p["fpir_target"], 6): p for p in part["fnir_at_fpir"] if p.get("resolvable", True)}
    proto = report["protocol"]
    fitted = calibration.get("meta", {}).get("fitted", "")
    report_fitted = report.get("calibration", {}).get("fitted", {}).get("fitted", "")
    if fitted != report_fitted:
        raise ValueError(f"the report evaluated the calibration fitted {report_fitted!r}, not {fitted!r}")
    nonmated, mated = part["nonmated_probes"], part["mated_probes"]
    source = (
        f"{report_name}, part {REPORT_PART!r} (held out from calibration), method {method!r}: "
        f"{mated} mated and {nonmated} non-mated searches of a {proto['gallery_identities']}-identity gallery "
        f"({report.get('data', '')}, {report.get('created', '')})"
    )
    bands: list[dict[str, Any]] = []
    for name, label, fpir in (("strong", "Strong", STRONG_FPIR), ("moderate", "Moderate", MODERATE_FPIR)):
        p = points[round(fpir, 6)]
        bands.append(
            {
                "name": name,
                "label": label,
                "min_score": round(p["threshold"], 6),
                "fpir": fpir,
                "measured_fpir": p["fpir"],
                "fnir": p["fnir"],
                "explain": (
                    f"score {p['threshold']:+.2f} or higher: in the benchmark, {_pct(p['fpir'])} of searches for "
                    f"people not in the gallery returned a candidate this high; {_pct(1 - p['fnir'])} of mates "
                    "scored this high"
                ),
            }
        )
    floor = bands[-1]["min_score"]
    bands.append(
        {
            "name": "weak",
            "label": "Weak",
            "min_score": None,
            "fpir": None,
            "measured_fpir": None,
            "fnir": None,
            "explain": (
                f"score under {floor:+.2f}: more than {_pct(MODERATE_FPIR)} of searches for people not in the gallery "
                "returned a candidate this high; the rank orders candidates, the score says little"
            ),
        }
    )
    return {
        "format": 1,
        "method": method,
        "calibration_fitted": fitted,
        "source": source,
        "report": report_name,
        "report_part": REPORT_PART,
        "caveat": (
            "Measured on one gallery. The false-positive rate at a threshold grows with the gallery's size and "
            "changes with its population: a band is a guide to reading the score, not a probability of identity."
        ),
        "bands": bands,
    }


def load(path: Path = BANDS_FILE) -> Bands:
    doc = json.loads(path.read_text())
    return Bands(
        method=doc["method"],
        calibration_fitted=doc["calibration_fitted"],
        source=doc["source"],
        bands=tuple(Band(b["name"], b["label"], b["min_score"], b["fpir"], b["explain"]) for b in doc["bands"]),
    )


def main() -> None:  # python -m quorum.review.bands: rewrite bands.json from the report and calibration
    doc = derive(
        json.loads(DEFAULT_REPORT.read_text()),
        json.loads(DEFAULT_CALIBRATION.read_text()),
        report_name=str(DEFAULT_REPORT.relative_to(REPO)),
    )
    BANDS_FILE.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {BANDS_FILE}")


if __name__ == "__main__":
    main()
