"""dlib's ResNet face descriptor (128-d), via the face_recognition_models weights and dlib-bin.

dlib aligns with its own 5-point shape predictor (eye corners + nose base, a different point set from
YuNet's), run inside the detector's box; ``get_face_chip`` then produces the 150x150 chip
(padding 0.25) that the network was trained on. dlib works in RGB.

The predictor was trained on boxes from dlib's HOG/MMOD detectors, which sit a little differently on
the face than YuNet's; ``box_scale`` lets the bench try a grown box (kept at the measured best).
"""

from __future__ import annotations

import threading

import dlib
import numpy as np

from ..faces import Face
from ..weights import package_dir, package_version
from . import BaseEngine

RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"


class DlibEngine(BaseEngine):
    name = "dlib"
    dim = 128

    # Measured on 400 LFW dev pairs (10-fold): YuNet box 98.25%, flipped 98.75%; box grown 1.15x
    # 98.75%, flipped 99.00%, so both are on (flip doubles the ~100 ms/face cost).
    @staticmethod
    def version_for(*, flip: bool = True, box_scale: float = 1.15) -> str:
        """The version an engine built with these arguments runs (no model is loaded)."""
        return f"dlib-resnet-v1/sp5-yunetbox{box_scale:g}-chip150-pad0.25/flip{int(flip)}"

    def __init__(self, device: str = "auto", *, flip: bool = True, box_scale: float = 1.15) -> None:
        models = package_dir("face_recognition_models") / "models"
        self.weights_file = str(models / "dlib_face_recognition_resnet_model_v1.dat")
        self.flip = flip
        self.box_scale = box_scale
        self.version = self.version_for(flip=flip, box_scale=box_scale)
        self.provenance = (
            f"{RECOGNITION_FILE} + {PREDICTOR_FILE} from face_recognition_models=="
            f"{package_version('face_recognition_models')} (Davis King, dlib ResNet-29, trained on ~3M "
            "faces from face scrub/VGG/web images; weights CC0/Boost), run by dlib-bin=="
            f"{package_version('dlib-bin')}"
        )
        self._predictor = dlib.shape_predictor(str(models / PREDICTOR_FILE))
        self._model = dlib.face_recognition_model_v1(str(models / RECOGNITION_FILE))
        self._lock = threading.Lock()

    def _rect(self, face: Face) -> dlib.rectangle:
        x, y, w, h = face.box
        cx, cy = x + w / 2, y + h / 2
        w, h = w * self.box_scale, h * self.box_scale
        return dlib.rectangle(round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2))

    def _crop(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        rgb = np.ascontiguousarray(image_bgr[..., ::-1])
        shape = self._predictor(rgb, self._rect(face))
        return np.asarray(dlib.get_face_chip(rgb, shape, size=150, padding=0.25))

    def _forward(self, crops: list[np.ndarray]) -> np.ndarray:
        chips = [np.ascontiguousarray(c) for c in crops]
        with self._lock:
            vecs = self._model.compute_face_descriptor(chips)
        return np.asarray([np.asarray(v) for v in vecs], dtype=np.float32)
