"""FaceNet on cv2.dnn (the frozen TF graph) vs the converted ONNX on onnxruntime (CPU), side by side.

Usage:  python bench/facenet_runtimes.py [--data DIR] [--faces 48] [--rounds 15] [--threads 1] [--out F.json]

Records the conversion (time, file size, TF ops -> ONNX ops), the equality of the two runtimes on real
ci faces (cosine per face on the same crops, no flip: min / median), and the model-call time per face
(prewhitening and the NCHW blob included, detection and alignment not) at batch 1 and batch 16. The
four configurations are timed in interleaved rounds in one process, so background load on a shared
machine hits all of them alike; medians over rounds. cv2.dnn cannot batch this graph (batch 1 is
hard-coded in a Reshape), so its "batch 16" is 16 forwards in one ``_forward`` call.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.workers.conversion.tf_to_onnx import convert_graphdef
from quorum.workers.detect import Detector
from quorum.workers.engines.facenet import FaceNetEngine, pb_path
from quorum.workers.images import decode_image
from quorum.workers.ort import ort_session


def default_data() -> Path:
    return Path(os.environ.get("QUORUM_DATA_DIR", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))


def ci_faces(data: Path, n: int) -> list:
    det = Detector()
    out = []
    with open(data / "ci" / "split.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["role"] in ("gallery", "probe")]
    for r in rows:
        img = decode_image(
            (data / "ci" / "faces" / r["identity"] / r["file"]).read_bytes(), max_bytes=15 << 20, max_pixels=40_000_000
        )
        faces = det.detect(img)
        if not faces:
            continue
        h, w = img.shape[:2]
        out.append(
            (img, min(faces, key=lambda f: abs(f.box[0] + f.box[2] / 2 - w / 2) + abs(f.box[1] + f.box[3] / 2 - h / 2)))
        )
        if len(out) == n:
            break
    return out


def main() -> None:
    import cv2
    import onnxruntime as ort

    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=default_data())
    p.add_argument("--faces", type=int, default=48)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both runtimes")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    t0 = time.perf_counter()
    model, report = convert_graphdef(Path(pb_path()).read_bytes())
    conversion = {**report.as_dict(), "wall_s": round(time.perf_counter() - t0, 2), "bytes": model.ByteSize()}

    cv2.setNumThreads(a.threads)
    onnx_eng = FaceNetEngine("cpu", runtime="onnx")
    onnx_eng._session = ort_session(onnx_eng.onnx_file, "cpu", threads=a.threads)
    cv2_eng = FaceNetEngine("cpu", runtime="cv2")
    faces = ci_faces(a.data, a.faces)
    crops = [onnx_eng._crop(img, face) for img, face in faces]

    ours, ref = onnx_eng._forward(crops), cv2_eng._forward(crops)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    batch = onnx_eng._forward(crops[:16])
    single = np.concatenate([onnx_eng._forward([c]) for c in crops[:16]])
    batch_cos = (batch * single).sum(1) / np.linalg.norm(batch, axis=1) / np.linalg.norm(single, axis=1)

    configs = [(name, eng, bs) for bs in (1, 16) for name, eng in (("cv2.dnn", cv2_eng), ("onnxruntime", onnx_eng))]
    for _name, eng, bs in configs:  # warm-up
        eng._forward(crops[:bs])
    times: dict[str, list[float]] = {f"{n}/batch{bs}": [] for n, _e, bs in configs}
    for r in range(a.rounds):
        for name, eng, bs in configs:
            start = (r * 16) % (len(crops) - 16)
            chunk = crops[start : start + bs]
            t = time.perf_counter()
            eng._forward(chunk)
            times[f"{name}/batch{bs}"].append((time.perf_counter() - t) * 1000 / bs)
    speed = {k: round(statistics.median(v), 2) for k, v in times.items()}

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), shared",
        "threads": a.threads,
        "versions": {"onnxruntime": ort.__version__, "opencv": cv2.__version__},
        "conversion": conversion,
        "faces": len(crops),
        "cosine_onnx_vs_cv2": {"min": float(cos.min()), "median": float(np.median(cos)), "max": float(cos.max())},
        "cosine_batch16_vs_single_min": float(batch_cos.min()),
        "ms_per_face_median": speed,
        "rounds": a.rounds,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
