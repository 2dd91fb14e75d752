"""Fit a Gaussian model of real face templates, for bench/index_1m.py's ``--data fitted`` (issue 12).

Embeds every face of the ci set (``../shared/data/ci``, 862 LFW images of 420 people) with the
project's own code (YuNet ``Detector`` + ``get_engine``), then fits, per engine:

* the between-person distribution: mean and covariance of the people's mean templates, with the
  within-person part taken off (``cov(person means) - mean(W / n_images)``, eigenvalues clipped at 0);
* the within-person distribution: covariance of each template's deviation from its person's mean
  (people with 2+ images, scaled by n/(n-1)), i.e. what changes between two photos of one person.

Both are stored as eigen-decompositions (``{engine}_between_vals/_vecs``, ``{engine}_within_vals/_vecs``)
with ``{engine}_mean``, plus the real cosine similarities of same-person and different-person pairs as a
check on what the sampled vectors should look like. Where the sample cannot estimate all directions
(ArcFace's 512-d within-person covariance has fewer degrees of freedom than dimensions), the missing
eigenvalues are filled by extending the power-law decay of the estimated spectrum (fitted on its
middle half), so no direction is exactly zero and none is inflated to isotropic noise.

    .venv/bin/python bench/fit_templates.py --engines sface arcface --out bench/results/fitted-templates.npz

The images are read where they are; nothing is copied into the repository, only the fitted model
(a few MB of numbers, no images, no per-person templates).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
from pathlib import Path

import numpy as np


def _faces(data: Path) -> list[tuple[str, Path]]:
    root = data / "ci" / "faces"
    return [
        (d.name, img)
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for img in sorted(d.iterdir())
        if img.suffix.lower() in {".jpg", ".jpeg", ".png"}
    ]


def embed_all(engines: list[str], items: list[tuple[str, Path]]) -> tuple[list[str], dict[str, np.ndarray]]:
    from quorum.workers.detect import Detector, choose_face
    from quorum.workers.engines import get_engine
    from quorum.workers.images import decode_image

    det = Detector()
    faced, who = [], []
    for person, path in items:
        img = decode_image(path.read_bytes(), max_bytes=15 << 20, max_pixels=40_000_000)
        try:
            faced.append((img, choose_face(det.detect(img), None, min_face_pixels=20)[1]))
            who.append(person)
        except Exception:
            continue
    out = {}
    for name in engines:
        eng = get_engine(name, device="cpu")
        t0 = time.perf_counter()
        out[name] = np.concatenate([eng.embed_batch(faced[i : i + 16]) for i in range(0, len(faced), 16)])
        print(f"# {name}: {len(faced)} faces of {len(set(who))} people in {time.perf_counter() - t0:.0f} s", flush=True)
    return who, out


def _fill_spectrum(vals: np.ndarray, rank: int) -> np.ndarray:
    """Eigenvalues (descending) with those beyond ``rank`` (not estimable) extended by a power law."""
    vals = np.clip(vals, 0, None).astype(np.float64)
    rank = min(rank, len(vals))
    if rank >= len(vals):
        return vals
    i = np.arange(rank // 4, rank * 3 // 4) + 1
    slope, icpt = np.polyfit(np.log(i), np.log(np.maximum(vals[i - 1], 1e-12)), 1)
    tail = np.exp(icpt + slope * np.log(np.arange(rank, len(vals)) + 1))
    vals[rank:] = np.minimum(tail, vals[rank - 1])
    return vals


def fit(who: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float64)
    people = sorted(set(who))
    idx = {p: [i for i, w in enumerate(who) if w == p] for p in people}
    means = np.stack([x[idx[p]].mean(0) for p in people])
    dev, inv_n = [], []
    for p in people:
        rows = idx[p]
        if len(rows) >= 2:
            dev.append((x[rows] - x[rows].mean(0)) * np.sqrt(len(rows) / (len(rows) - 1)))
        inv_n.append(1.0 / len(rows))
    dev = np.concatenate(dev)
    dof_w = sum(len(r) - 1 for r in idx.values())
    w = dev.T @ dev / len(dev)
    wv, wu = np.linalg.eigh(w)
    wv, wu = wv[::-1], wu[:, ::-1]
    wv = _fill_spectrum(wv, dof_w)
    w = (wu * wv) @ wu.T
    mu = means.mean(0)
    b = np.cov(means, rowvar=False) - w * float(np.mean(inv_n))  # a person's mean still carries W/n of noise
    bv, bu = np.linalg.eigh(b)
    bv, bu = bv[::-1], bu[:, ::-1]
    bv = _fill_spectrum(bv, len(people) - 1)
    # Real pair similarities (templates are unit length): same person, and one image each of two people.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    same = [float(xn[r[i]] @ xn[r[j]]) for r in idx.values() for i in range(len(r)) for j in range(i + 1, len(r))]
    first = np.stack([xn[idx[p][0]] for p in people])
    diff = (first @ first.T)[np.triu_indices(len(people), 1)]
    return {
        "mean": mu.astype(np.float32),
        "between_vals": bv.astype(np.float32),
        "between_vecs": bu.astype(np.float32),
        "within_vals": wv.astype(np.float32),
        "within_vecs": wu.astype(np.float32),
        "real_same_cos": np.asarray(same, dtype=np.float32),
        "real_diff_cos": np.asarray(diff, dtype=np.float32),
        "n_images": np.asarray(len(x)),
        "n_people": np.asarray(len(people)),
        "within_dof": np.asarray(dof_w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("QUORUM_DATA_DIR", "../shared/data")))
    ap.add_argument("--engines", nargs="+", default=["sface", "arcface"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/fitted-templates.npz"))
    args = ap.parse_args()
    who, emb = embed_all(args.engines, _faces(args.data))
    model: dict[str, np.ndarray] = {}
    for name, x in emb.items():
        f = fit(who, x)
        ev = f["between_vals"] / f["between_vals"].sum()
        print(
            f"# {name}: dim {x.shape[1]}; between-person spectrum: top 10 eigenvalues carry {ev[:10].sum():.2f}, "
            f"participation dim {1 / (ev**2).sum():.1f}; within/between "
            f"variance {f['within_vals'].sum() / f['between_vals'].sum():.2f}; "
            f"real cosine same-person median {np.median(f['real_same_cos']):.3f}, "
            f"different {np.median(f['real_diff_cos']):.3f}",
            flush=True,
        )
        model.update({f"{name}_{k}": v for k, v in f.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **model)
    print(f"# wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
