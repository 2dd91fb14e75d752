"""LFW verification accuracy and speed of each engine (and preprocessing variant).

Usage:  python bench/verify_engines.py [--data DIR] [--limit N] [--engines sface,dlib,facenet] [--variants]

Reads ``lfw-dev/_pairsDevTrain.txt`` (LFW format: a count line, then ``name i j`` for a same pair or
``name1 i name2 j`` for a different pair), detects faces with YuNet (the face nearest the image centre,
since LFW's subject is centred), embeds every image once per variant, and reports cosine-similarity
verification accuracy by 10-fold cross-validation (threshold chosen on 9 folds, tested on the 10th),
the best single threshold, and milliseconds per face. Flip-averaging is evaluated from the same pass
(the crop and its mirror are both embedded), so every variant prints with and without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.workers.detect import Detector
from quorum.workers.engines import l2_normalise
from quorum.workers.faces import Face
from quorum.workers.images import decode_image

VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "sface": [("rgb", {"rgb": True}), ("bgr", {"rgb": False})],
    "dlib": [("box1.0", {"box_scale": 1.0}), ("box1.15", {"box_scale": 1.15})],
    "facenet": [
        ("mtcnn-sim", {"align": "mtcnn-sim"}),
        ("mtcnn-sim-square", {"align": "mtcnn-sim-square"}),
        ("box", {"align": "box"}),
        ("mtcnn-sim-bgr", {"align": "mtcnn-sim", "rgb": False}),
    ],
}


def default_data() -> Path:
    env = os.environ.get("QUORUM_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def read_pairs(path: Path) -> list[tuple[str, str, bool]]:
    lines = path.read_text().splitlines()[1:]
    out = []
    for line in lines:
        p = line.split()
        if len(p) == 3:
            out.append((f"{p[0]}/{p[0]}_{int(p[1]):04d}.jpg", f"{p[0]}/{p[0]}_{int(p[2]):04d}.jpg", True))
        elif len(p) == 4:
            out.append((f"{p[0]}/{p[0]}_{int(p[1]):04d}.jpg", f"{p[2]}/{p[2]}_{int(p[3]):04d}.jpg", False))
    return out


def subsample(pairs: list[tuple[str, str, bool]], limit: int) -> list[tuple[str, str, bool]]:
    """Evenly spread over same and different pairs so the subset stays balanced."""
    if not limit or limit >= len(pairs):
        return pairs
    same = [p for p in pairs if p[2]]
    diff = [p for p in pairs if not p[2]]
    k = limit // 2
    return same[:: max(1, len(same) // k)][:k] + diff[:: max(1, len(diff) // k)][:k]


def central_face(faces: list[Face], shape: tuple[int, ...]) -> Face | None:
    if not faces:
        return None
    h, w = shape[:2]
    return min(faces, key=lambda f: (f.box[0] + f.box[2] / 2 - w / 2) ** 2 + (f.box[1] + f.box[3] / 2 - h / 2) ** 2)


def accuracy(scores: np.ndarray, labels: np.ndarray, folds: int = 10) -> tuple[float, float, float]:
    """(10-fold CV accuracy, best-threshold accuracy, that threshold)."""
    cands = np.unique(scores)

    def best(idx: np.ndarray) -> tuple[float, float]:
        s, lab = scores[idx], labels[idx]
        accs = [((s >= t) == lab).mean() for t in cands]
        i = int(np.argmax(accs))
        return float(accs[i]), float(cands[i])

    n = len(scores)
    order = np.arange(n)
    rng = np.random.default_rng(0)
    rng.shuffle(order)
    parts = np.array_split(order, folds)
    correct = 0
    for k in range(folds):
        train = np.concatenate([parts[j] for j in range(folds) if j != k])
        _, t = best(train)
        correct += int(((scores[parts[k]] >= t) == labels[parts[k]]).sum())
    acc_all, t_all = best(order)
    return correct / n, acc_all, t_all


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--limit", type=int, default=0, help="use this many pairs (balanced); 0 = all")
    ap.add_argument("--engines", default="sface,dlib,facenet")
    ap.add_argument("--variants", action="store_true", help="all preprocessing variants, not just the default")
    args = ap.parse_args()

    root = args.data / "lfw-dev"
    pairs = subsample(read_pairs(root / "_pairsDevTrain.txt"), args.limit)
    files = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    det = Detector()
    images, faces = {}, {}
    t0 = time.perf_counter()
    for f in files:
        img = decode_image((root / f).read_bytes(), max_bytes=1 << 26, max_pixels=1 << 26)
        face = central_face(det.detect(img), img.shape)
        if face is not None:
            images[f], faces[f] = img, face
    det_ms = (time.perf_counter() - t0) / len(files) * 1000
    print(
        f"{len(pairs)} pairs, {len(files)} images, {len(files) - len(faces)} without a face; "
        f"YuNet {det_ms:.1f} ms/image (incl. decode)"
    )

    from quorum.workers.engines.dlib_resnet import DlibEngine
    from quorum.workers.engines.facenet import FaceNetEngine
    from quorum.workers.engines.sface import SFaceEngine

    classes = {"sface": SFaceEngine, "dlib": DlibEngine, "facenet": FaceNetEngine}
    rows = []
    for name in args.engines.split(","):
        variants = VARIANTS[name] if args.variants else [("default", {})]
        for vname, kwargs in variants:
            eng = classes[name](device="cpu", **kwargs)
            eng.flip = False
            emb, embf = {}, {}
            t_crop = t_fwd = 0.0
            keys = list(images)
            for i in range(0, len(keys), 16):
                chunk = keys[i : i + 16]
                t = time.perf_counter()
                crops = [eng._crop(images[k], faces[k]) for k in chunk]
                t_crop += time.perf_counter() - t
                t = time.perf_counter()
                a = l2_normalise(eng._forward(crops))
                t_fwd += time.perf_counter() - t
                b = l2_normalise(eng._forward([c[:, ::-1].copy() for c in crops]))
                for k, va, vb in zip(chunk, a, b, strict=False):
                    emb[k], embf[k] = va, l2_normalise(va + vb)
            ms = (t_crop + t_fwd) / len(keys) * 1000
            for flip, table in ((0, emb), (1, embf)):
                scores, labels = [], []
                for a_, b_, same in pairs:
                    if a_ in table and b_ in table:
                        scores.append(float(table[a_] @ table[b_]))
                    else:
                        scores.append(-1.0)  # no face: counts as a "different" decision
                    labels.append(same)
                cv, best, thr = accuracy(np.array(scores), np.array(labels))
                rows.append((name, vname, flip, cv, best, thr, ms * (1 + flip)))
                print(
                    f"{name:8s} {vname:18s} flip{flip}  acc10f {cv * 100:6.2f}%  best {best * 100:6.2f}% "
                    f"@ {thr:.3f}  {ms * (1 + flip):6.1f} ms/face",
                    flush=True,
                )

    print("\nengine   variant            flip  10-fold  best-thr  ms/face")
    for name, vname, flip, cv, best, _thr, ms in rows:
        print(f"{name:8s} {vname:18s} {flip:4d}  {cv * 100:6.2f}%  {best * 100:6.2f}%  {ms:6.1f}")


if __name__ == "__main__":
    main()
