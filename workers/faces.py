"""A detected face, and the ArcFace-style alignment every engine crops it with (a leaf: no Quorum import
but the errors).

:class:`Face` is what a detector returns (YuNet in ``workers.detect``, SCRFD in ``workers.scrfd``),
what intake stores with the job and what an engine embeds; the alignment maps its five landmarks onto
the ArcFace template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..core.errors import Code, InputError

# The five ArcFace reference points on a 112x112 crop (insightface / OpenCV FaceRecognizerSF), in
# YuNet's landmark order: right eye, left eye, nose tip, right mouth corner, left mouth corner
# ("right" is the subject's right, which appears on the left of the picture).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixel coordinates of the decoded image.

    ``landmarks`` are in YuNet order: right eye, left eye, nose tip, right mouth corner, left mouth
    corner (subject's right/left).
    """

    box: tuple[float, float, float, float]  # x, y, w, h
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]

    def landmark_array(self) -> np.ndarray:
        return np.asarray(self.landmarks, dtype=np.float64).reshape(5, 2)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (plain floats and lists) for queue messages."""
        return {
            "box": [float(v) for v in self.box],
            "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
            "score": float(self.score),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Face:
        try:
            box = tuple(float(v) for v in d["box"])
            lms = tuple((float(p[0]), float(p[1])) for p in d["landmarks"])
            score = float(d.get("score", 1.0))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(Code.INVALID_MESSAGE, f"bad face record: {exc}") from exc
        if len(box) != 4 or len(lms) != 5:
            raise InputError(Code.INVALID_MESSAGE, "face needs a 4-value box and 5 landmarks")
        return cls(box=box, landmarks=lms, score=score)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) src -> dst, 2x3.

    Closed form (Umeyama 1991), deterministic: unlike cv2.estimateAffinePartial2D it uses no RANSAC,
    so the same landmarks always give the same crop (embeddings must be reproducible).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (sc**2).sum() / n
    scale = (s * d).sum() / var_s if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def arcface_template(size: int = 112) -> np.ndarray:
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def arcface_transform(landmarks: np.ndarray | Sequence[Sequence[float]], size: int = 112) -> np.ndarray:
    """2x3 similarity matrix mapping the 5 landmarks onto the ArcFace template scaled to ``size``."""
    return umeyama(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), arcface_template(size))


def warp(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    dsize = (size, size) if isinstance(size, int) else size
    return cv2.warpAffine(image, matrix, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_arcface(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """The face warped to the ArcFace 5-point template: a ``size``x``size`` crop, same channel order."""
    return warp(image, arcface_transform(face.landmark_array(), size), size)
