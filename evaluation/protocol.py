"""The data and the seeded 1:N split protocol (:func:`make_protocol`, :class:`SplitProtocol`).

Data: a folder of ``<identity>/<image>`` (:func:`list_dataset`). In it, identities with two or more
images are *multi*, the others *singles*. A seeded fraction of the multi identities is held out of
the gallery; every image of theirs is a *non-mated* probe. Each remaining multi identity enrols one
seeded-random image; every single-image identity is enrolled as a distractor. Every other image of
an enrolled multi identity is a *mated* probe. Probe identities (mated and non-mated) are then split,
seeded and identity-disjoint, into a ``fit`` half (used to learn score normalisation and fusion) and
a ``test`` half (reported). The gallery is the same for both halves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


@dataclass(frozen=True)
class Image:
    identity: str
    rel: str  # "<identity>/<file>", the image's name in reports and label files
    path: Path


def list_dataset(root: Path | str) -> list[Image]:
    """Every image of a folder of ``<identity>/<image>``, sorted (files at the top level are ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    images: list[Image] = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for f in sorted(ident.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                images.append(Image(ident.name, f"{ident.name}/{f.name}", f))
    if not images:
        raise ValueError(f"no <identity>/<image> files under {root}")
    return images


def default_data_dir() -> Path:
    import os

    env = os.environ.get("QUORUM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass
class SplitProtocol:
    seed: int
    holdout: float
    gallery: list[Image]  # one template per enrolled identity
    mated: list[Image]  # probes whose identity is enrolled
    nonmated: list[Image]  # probes whose identity is not enrolled
    split: dict[str, str]  # probe identity -> "fit" | "test"
    distractors: int  # how many gallery identities have no probe

    def probes(self, part: str | None = None) -> tuple[list[Image], list[Image]]:
        """(mated, non-mated) probes of one split part (``None``: all)."""
        if part is None:
            return self.mated, self.nonmated
        return (
            [p for p in self.mated if self.split[p.identity] == part],
            [p for p in self.nonmated if self.split[p.identity] == part],
        )

    def summary(self) -> dict:
        out: dict[str, Any] = {
            "seed": self.seed,
            "holdout_fraction": self.holdout,
            "gallery_identities": len(self.gallery),
            "gallery_distractors": self.distractors,
        }
        for part in ("fit", "test", None):
            m, n = self.probes(part)
            key = part or "all"
            out[key] = {
                "mated_probes": len(m),
                "mated_identities": len({p.identity for p in m}),
                "nonmated_probes": len(n),
                "nonmated_identities": len({p.identity for p in n}),
            }
        return out


def make_protocol(
    images: Sequence[Image],
    *,
    seed: int = 0,
    holdout: float = 0.4,
    gallery_size: int | None = None,
    fit_fraction: float = 0.5,
    max_identities: int | None = None,
    max_images_per_identity: int | None = None,
) -> SplitProtocol:
    """The seeded 1:N protocol described in the module docstring.

    ``gallery_size`` caps the number of enrolled identities: distractors (single-image identities)
    are dropped first (seeded), then enrolled multi identities (whose probes go with them).
    ``max_identities`` first keeps a seeded sample of the identities and ``max_images_per_identity``
    a seeded sample of each one's images (both for quick runs, e.g. tests).
    """
    rng = np.random.default_rng(seed)
    by_id: dict[str, list[Image]] = {}
    for im in images:
        by_id.setdefault(im.identity, []).append(im)
    ids = sorted(by_id)
    if max_identities is not None and max_identities < len(ids):
        ids = sorted(ids[j] for j in rng.permutation(len(ids))[:max_identities])
    if max_images_per_identity is not None:
        for i in ids:
            if len(by_id[i]) > max_images_per_identity:
                keep = sorted(rng.permutation(len(by_id[i]))[:max_images_per_identity])
                by_id[i] = [by_id[i][j] for j in keep]
    multi = [i for i in ids if len(by_id[i]) >= 2]
    singles = [i for i in ids if len(by_id[i]) == 1]
    multi_perm = [multi[j] for j in rng.permutation(len(multi))]
    n_hold = round(holdout * len(multi))
    if len(multi) >= 2 and holdout > 0:
        n_hold = min(max(n_hold, 1), len(multi) - 1)
    held = sorted(multi_perm[:n_hold])
    enrolled = sorted(multi_perm[n_hold:])
    singles_perm = [singles[j] for j in rng.permutation(len(singles))]
    if gallery_size is not None:
        if gallery_size < 1:
            raise ValueError("gallery_size must be >= 1")
        keep_d = max(0, gallery_size - len(enrolled))
        singles_perm = singles_perm[:keep_d]
        if len(enrolled) > gallery_size:
            sub = rng.permutation(len(enrolled))[:gallery_size]
            enrolled = sorted(enrolled[j] for j in sub)
    distractors = sorted(singles_perm)
    gallery: list[Image] = []
    mated: list[Image] = []
    for ident in enrolled:
        imgs = by_id[ident]
        g = int(rng.integers(len(imgs)))
        gallery.append(imgs[g])
        mated.extend(im for j, im in enumerate(imgs) if j != g)
    gallery.extend(by_id[i][0] for i in distractors)
    nonmated = [im for i in held for im in by_id[i]]
    # Identity-disjoint fit/test split of the probe identities, stratified by mated / non-mated.
    split: dict[str, str] = {}
    for group in (enrolled, held):
        perm = [group[j] for j in rng.permutation(len(group))]
        n_fit = round(fit_fraction * len(perm))
        for j, ident in enumerate(perm):
            split[ident] = "fit" if j < n_fit else "test"
    return SplitProtocol(seed, holdout, gallery, mated, nonmated, split, len(distractors))
