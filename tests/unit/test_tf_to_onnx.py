"""The TF GraphDef reader and the TF -> ONNX converter on small hand-built graphs, checked against numpy
implementations of TensorFlow's NHWC semantics: layout (NHWC -> NCHW), SAME/VALID padding, concat
axes, the batch-1 Reshape made symbolic, and a slim-style batch norm behind ``phase_train``
Switch/Merge folded to inference. (FaceNet's real graph against cv2.dnn: tests/unit/test_engines.py.)"""

from __future__ import annotations

import struct

import numpy as np
import onnxruntime as ort
import pytest

from quorum.workers.conversion.tf_graphdef import GraphDefError, parse_graphdef, parse_tensor
from quorum.workers.conversion.tf_to_onnx import ConversionError, convert_graphdef


# -- a minimal protobuf writer (the inverse of the reader under test) ------------------------------
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _f(num: int, wt: int, payload: bytes | int) -> bytes:
    key = _varint(num << 3 | wt)
    if wt == 0:
        assert isinstance(payload, int)
        return key + _varint(payload)
    assert isinstance(payload, bytes)
    return key + (_varint(len(payload)) + payload if wt == 2 else payload)


DT = {np.dtype(np.float32): 1, np.dtype(np.int32): 3, np.dtype(np.bool_): 10}


def _shape(dims: list[int]) -> bytes:
    return b"".join(_f(2, 2, _f(1, 0, d)) for d in dims)


def _tensor(arr: np.ndarray, packed_vals: bool = False) -> bytes:
    arr = np.asarray(arr)
    body = _f(1, 0, DT[arr.dtype]) + _f(2, 2, _shape(list(arr.shape)))
    if packed_vals and arr.dtype == np.float32:
        return body + _f(5, 2, arr.astype("<f4").tobytes())
    if arr.dtype == np.bool_:
        return body + b"".join(_f(11, 0, int(x)) for x in arr.reshape(-1))
    return body + _f(4, 2, arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def _attr(v: object) -> bytes:
    if isinstance(v, np.ndarray):
        return _f(8, 2, _tensor(v))
    if isinstance(v, bool):
        return _f(5, 0, int(v))
    if isinstance(v, int):
        return _f(3, 0, v)
    if isinstance(v, float):
        return _f(4, 5, struct.pack("<f", v))
    if isinstance(v, bytes):
        return _f(2, 2, v)
    if isinstance(v, tuple) and v[0] == "type":
        return _f(6, 0, v[1])
    if isinstance(v, tuple) and v[0] == "shape":
        return _f(7, 2, _shape(v[1]))
    if isinstance(v, list):  # list(int), packed
        return _f(1, 2, _f(3, 2, b"".join(_varint(x) for x in v)))
    raise TypeError(v)


def _node(name: str, op: str, inputs: list[str] = (), **attrs: object) -> bytes:  # type: ignore[assignment]
    body = _f(1, 2, name.encode()) + _f(2, 2, op.encode())
    body += b"".join(_f(3, 2, i.encode()) for i in inputs)
    for k, v in attrs.items():
        body += _f(5, 2, _f(1, 2, k.encode()) + _f(2, 2, _attr(v)))
    return _f(1, 2, body)


def _const(name: str, arr: np.ndarray) -> bytes:
    return _node(name, "Const", value=arr, dtype=("type", DT[np.asarray(arr).dtype]))


# -- numpy references of the TF ops (NHWC) ---------------------------------------------------------
def _pad_same(size: int, k: int, s: int) -> tuple[int, int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def conv2d_nhwc(x: np.ndarray, w: np.ndarray, stride: int, padding: str) -> np.ndarray:
    n, h, wd, _ = x.shape
    kh, kw, _, co = w.shape
    if padding == "SAME":
        oh, pt, pb = _pad_same(h, kh, stride)
        ow, pl, pr = _pad_same(wd, kw, stride)
        x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    else:
        oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, oh, ow, co), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
    return out


def maxpool_nhwc(x: np.ndarray, k: int, s: int) -> np.ndarray:  # VALID
    _n, h, w, _c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    return np.stack(
        [
            np.stack([x[:, i * s : i * s + k, j * s : j * s + k, :].max(axis=(1, 2)) for j in range(ow)], 1)
            for i in range(oh)
        ],
        1,
    )


def _graph(
    rng: np.random.Generator, relu: str = "Relu", fed_phase_train: bool = False
) -> tuple[bytes, dict[str, np.ndarray]]:
    """input(1x9x9x3) -> Conv 3x3/2 SAME + BiasAdd + Relu -> [slim batch norm behind phase_train]
    -> {MaxPool 3x3/2 VALID, Conv 1x1 VALID * 0.5} -> ConcatV2(axis 3) -> Reshape [1,-1] -> MatMul
    -> L2 normalise (Square, Sum, Maximum, Rsqrt, Mul)."""
    p = {
        "w1": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
        "b1": rng.normal(size=4).astype(np.float32),
        "gamma": rng.uniform(0.5, 2, 4).astype(np.float32),
        "beta": rng.normal(size=4).astype(np.float32),
        "mean": rng.normal(size=4).astype(np.float32),
        "var": rng.uniform(0.5, 2, 4).astype(np.float32),
        "w2": rng.normal(size=(1, 1, 4, 2)).astype(np.float32),
        "fc/W": rng.normal(size=(2 * 2 * 6, 5)).astype(np.float32),
    }
    bn_in = ["gamma", "beta", "mean", "var"]
    g = b"".join(_const(k, v) for k, v in p.items())
    if fed_phase_train:  # a plain bool Placeholder, fed at run time in training
        g += _node("phase_train", "Placeholder", dtype=("type", 10))
    else:
        g += _const("phase_train/default", np.array(False))
        g += _node("phase_train", "PlaceholderWithDefault", ["phase_train/default"], dtype=("type", 10))
    g += _node("input", "Placeholder", dtype=("type", 1), shape=("shape", [1, 9, 9, 3]))
    g += _node("conv1", "Conv2D", ["input:0", "w1"], strides=[1, 2, 2, 1], padding=b"SAME", data_format=b"NHWC")
    g += _node("bias1", "BiasAdd", ["conv1", "b1"], data_format=b"NHWC")
    g += _node("relu1", relu, ["bias1"])
    # slim's batch_norm(is_training=phase_train): tf.cond -> Switch / two FusedBatchNorm / Merge
    g += _node("bn/cond/pred_id", "Identity", ["phase_train"])
    g += _node("bn/cond/Switch", "Switch", ["phase_train", "phase_train"])
    g += _node("bn/cond/switch_t", "Identity", ["bn/cond/Switch:1"])
    g += _node("bn/cond/FusedBatchNorm/Switch", "Switch", ["relu1", "bn/cond/pred_id"])
    g += _node(
        "bn/cond/FusedBatchNorm",
        "FusedBatchNorm",
        ["bn/cond/FusedBatchNorm/Switch:1", "gamma", "beta", "^bn/cond/switch_t"],
    )  # the training branch (batch statistics): must be dropped
    g += _node("bn/cond/FusedBatchNorm_1/Switch", "Switch", ["relu1", "bn/cond/pred_id"])
    g += _node(
        "bn/cond/FusedBatchNorm_1",
        "FusedBatchNorm",
        ["bn/cond/FusedBatchNorm_1/Switch", *bn_in],
        epsilon=0.001,
        is_training=False,
        data_format=b"NHWC",
    )
    g += _node("bn/cond/Merge", "Merge", ["bn/cond/FusedBatchNorm_1", "bn/cond/FusedBatchNorm"])
    g += _node("pool", "MaxPool", ["bn/cond/Merge"], ksize=[1, 3, 3, 1], strides=[1, 2, 2, 1], padding=b"VALID")
    g += _node("conv2", "Conv2D", ["pool", "w2"], strides=[1, 1, 1, 1], padding=b"VALID")
    g += _const("half", np.array(0.5, np.float32))
    g += _node("scaled", "Mul", ["half", "conv2"])
    g += _const("axis", np.array(3, np.int32))
    g += _node("concat", "ConcatV2", ["pool", "scaled", "axis"], N=2)
    g += _const("flat/shape", np.array([1, -1], np.int32))
    g += _node("flat", "Reshape", ["concat", "flat/shape"])
    g += _node("fc", "MatMul", ["flat", "fc/W"])
    g += _node("sq", "Square", ["fc"])
    g += _const("sum/axis", np.array(1, np.int32))
    g += _node("sum", "Sum", ["sq", "sum/axis"], keep_dims=True)
    g += _const("eps", np.array(1e-10, np.float32))
    g += _node("max", "Maximum", ["sum", "eps"])
    g += _node("rsqrt", "Rsqrt", ["max"])
    g += _node("embeddings", "Mul", ["fc", "rsqrt"])
    return g, p


def _reference(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    y = np.maximum(conv2d_nhwc(x, p["w1"], 2, "SAME") + p["b1"], 0)
    y = (y - p["mean"]) / np.sqrt(p["var"] + 0.001) * p["gamma"] + p["beta"]
    pool = maxpool_nhwc(y, 3, 2)
    cat = np.concatenate([pool, 0.5 * conv2d_nhwc(pool, p["w2"], 1, "VALID")], axis=3)
    fc = cat.reshape(len(x), -1) @ p["fc/W"]
    return fc / np.sqrt(np.maximum((fc**2).sum(1, keepdims=True), 1e-10))


def test_reader_tensors_and_attrs() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    np.testing.assert_array_equal(parse_tensor(_tensor(arr)), arr)
    np.testing.assert_array_equal(parse_tensor(_tensor(arr, packed_vals=True)), arr)
    one = _f(1, 0, 1) + _f(2, 2, _shape([2, 2])) + _f(5, 5, struct.pack("<f", 1.5))  # one value broadcast
    np.testing.assert_array_equal(parse_tensor(one), np.full((2, 2), 1.5, np.float32))
    neg = _f(1, 0, 3) + _f(2, 2, _shape([2])) + _f(7, 0, -1) + _f(7, 0, 7)  # negative int_val as varint
    np.testing.assert_array_equal(parse_tensor(neg), np.array([-1, 7], np.int32))
    nodes = parse_graphdef(_node("c", "Conv2D", ["x:0", "^y"], strides=[1, 2, 2, 1], padding=b"SAME", f=0.25, b=True))
    assert nodes[0].name == "c" and nodes[0].op == "Conv2D" and nodes[0].inputs == ["x:0", "^y"]
    assert nodes[0].attr == {"strides": [1, 2, 2, 1], "padding": b"SAME", "f": 0.25, "b": True}
    with pytest.raises(GraphDefError):
        parse_graphdef(b"")
    with pytest.raises(GraphDefError):
        parse_graphdef(b"\x0a\x05ab")  # truncated


def test_converted_graph_matches_tf_semantics_with_a_symbolic_batch() -> None:
    rng = np.random.default_rng(7)
    data, params = _graph(rng)
    model, report = convert_graphdef(data)
    assert report.tf_ops["Switch"] == 3 and any("Merge" in f for f in report.folded)
    assert any("phase_train" in f and "False" in f for f in report.folded)
    assert "Switch" not in report.mapping and "Merge" not in report.mapping  # no op of the dead branch emitted
    assert report.mapping["BiasAdd"] == ["Conv(bias)"] and report.mapping["Conv2D"] == ["Conv"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["N", 3, 9, 9] and sess.get_outputs()[0].shape[0] == "N"
    x = rng.normal(size=(3, 9, 9, 3)).astype(np.float32)  # a batch of 3 through a graph frozen at batch 1
    out = sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(out, _reference(x.astype(np.float64), params), rtol=1e-4, atol=1e-5)


def test_unsupported_ops_are_refused_and_a_fed_phase_train_is_folded_too() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConversionError, match="Selu"):
        convert_graphdef(_graph(rng, relu="Selu")[0])
    data, params = _graph(rng, fed_phase_train=True)
    model, report = convert_graphdef(data)
    assert any("phase_train: Placeholder" in f for f in report.folded)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(1, 9, 9, 3)).astype(np.float32)
    out = sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(out, _reference(x.astype(np.float64), params), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConversionError, match="no node"):
        convert_graphdef(data, output_name="nope")
