"""CMC and DET plots (matplotlib, Agg backend, imported lazily) of several systems' outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .metrics import det_curve

if TYPE_CHECKING:
    from .runs import Outcome


def plot_cmc(outcomes: Mapping[str, Outcome], mi: np.ndarray, top_n: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ranks = np.arange(1, top_n + 1)
    for name, o in outcomes.items():
        r = o.mate_rank[mi]
        hit = [np.mean((r >= 1) & (r <= k)) if r.size else np.nan for k in ranks]
        ax.plot(ranks, hit, label=name, lw=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("hit rate (mated probes)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_det(outcomes: Mapping[str, Outcome], mi: np.ndarray, ni: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    floor_x = 1.0 / max(1, ni.size) / 2
    floor_y = 1.0 / max(1, mi.size) / 2
    for name, o in outcomes.items():
        fp, fn, _ = det_curve(o.mate_score[mi], o.top_score[ni])
        if fp.size:
            ax.step(np.maximum(fp, floor_x), np.maximum(fn, floor_y), where="post", label=name, lw=1.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FPIR (non-mated searches with a candidate >= T)")
    ax.set_ylabel("FNIR (mate not returned with score >= T)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
