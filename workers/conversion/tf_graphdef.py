"""A minimal reader for frozen TensorFlow ``GraphDef`` files, without TensorFlow.

Why a hand-written protobuf wire-format reader rather than the compat protos vendored in the
``tensorboard`` wheel: a frozen graph needs only five messages (``GraphDef``, ``NodeDef``,
``AttrValue``, ``TensorProto``, ``TensorShapeProto``) and the wire format is four rules (varint,
64-bit, length-delimited, 32-bit), so the reader is ~150 lines with no dependency beyond numpy. The
tensorboard route would add a 5 MB wheel installed ``--no-deps`` whose generated ``*_pb2`` modules
are pinned to a protobuf runtime version that ``onnx`` also pins (two packages pulling protobuf in
different directions), for the sake of five message definitions. Field numbers are those of
tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,types}.proto; unknown
fields (``versions``, ``library``, ``device``, debug info) are skipped as the wire format allows.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# tensorflow/core/framework/types.proto DataType -> numpy dtype (the ones a frozen float graph uses)
DTYPES: dict[int, Any] = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    19: np.float16,
}


class GraphDefError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphDefError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise GraphDefError("varint too long")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) for every field of one message: value is an int (varint),
    bytes (length-delimited, 64-bit and 32-bit kept raw)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
            yield num, wt, val
        elif wt == 1:
            yield num, wt, buf[pos : pos + 8]
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise GraphDefError("truncated length-delimited field")
            yield num, wt, buf[pos : pos + n]
            pos += n
        elif wt == 5:
            yield num, wt, buf[pos : pos + 4]
            pos += 4
        else:
            raise GraphDefError(f"unsupported wire type {wt} (field {num})")


def _packed_varints(wt: int, val: Any) -> list[int]:
    if wt == 0:
        return [_signed64(val)]
    out, pos = [], 0
    while pos < len(val):
        v, pos = _varint(val, pos)
        out.append(_signed64(v))
    return out


def _packed_fixed(wt: int, val: bytes, fmt: str) -> list[float]:
    size = struct.calcsize(fmt)
    return list(struct.unpack(f"<{len(val) // size}{fmt}", val))


@dataclass
class TFNode:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attr: dict[str, Any] = field(default_factory=dict)


def parse_shape(buf: bytes) -> list[int] | None:
    """TensorShapeProto -> list of sizes (-1 unknown), or None for an unknown rank."""
    dims: list[int] = []
    for num, _wt, val in fields(buf):
        if num == 2:
            size = -1
            for n2, _w2, v2 in fields(val):
                if n2 == 1:
                    size = _signed64(v2)
            dims.append(size)
        elif num == 3 and val:
            return None
    return dims


def parse_tensor(buf: bytes) -> np.ndarray:
    """TensorProto -> numpy array (raw ``tensor_content`` or the typed ``*_val`` fields, a single value
    broadcast to the shape as TensorFlow does)."""
    dtype_enum, shape, content = 1, [], None
    vals: list[Any] = []
    for num, wt, val in fields(buf):
        if num == 1:
            dtype_enum = val
        elif num == 2:
            shape = parse_shape(val) or []
        elif num == 4:
            content = val
        elif num == 5:  # float_val
            vals.extend(_packed_fixed(wt, val, "f"))
        elif num == 6:  # double_val
            vals.extend(_packed_fixed(wt, val, "d"))
        elif num in (7, 10, 11):  # int_val, int64_val, bool_val
            vals.extend(_packed_varints(wt, val))
        elif num == 13:  # half_val (as int32 bit patterns)
            vals.extend(np.array(_packed_varints(wt, val), np.uint16).view(np.float16).tolist())
    if dtype_enum not in DTYPES:
        raise GraphDefError(f"unsupported tensor dtype {dtype_enum}")
    dtype = np.dtype(DTYPES[dtype_enum])
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype=dtype.newbyteorder("<")).astype(dtype)
    elif vals:
        arr = np.array(vals, dtype=dtype)
        if arr.size == 1 and count != 1:
            arr = np.full(count, arr[0], dtype=dtype)
    else:
        arr = np.zeros(count, dtype=dtype)
    if arr.size != count:
        raise GraphDefError(f"tensor has {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def parse_attr(buf: bytes) -> Any:
    """AttrValue -> python value: bytes (s), int (i, type), float (f), bool (b), list[int] (shape),
    ndarray (tensor), or a list of those (list)."""
    for num, _wt, val in fields(buf):
        if num == 1:  # ListValue
            out: list[Any] = []
            for n2, w2, v2 in fields(val):
                if n2 == 2:
                    out.append(bytes(v2))
                elif n2 in (3, 6):
                    out.extend(_packed_varints(w2, v2))
                elif n2 == 4:
                    out.extend(_packed_fixed(w2, v2, "f"))
                elif n2 == 5:
                    out.extend(bool(x) for x in _packed_varints(w2, v2))
                elif n2 == 7:
                    out.append(parse_shape(v2))
                elif n2 == 8:
                    out.append(parse_tensor(v2))
            return out
        if num == 2:
            return bytes(val)
        if num in (3, 6):
            return _signed64(val)
        if num == 4:
            return struct.unpack("<f", val)[0]
        if num == 5:
            return bool(val)
        if num == 7:
            return parse_shape(val)
        if num == 8:
            return parse_tensor(val)
        if num == 9:
            return bytes(val).decode()
    return None


def parse_node(buf: bytes) -> TFNode:
    node = TFNode("", "")
    for num, _wt, val in fields(buf):
        if num == 1:
            node.name = bytes(val).decode()
        elif num == 2:
            node.op = bytes(val).decode()
        elif num == 3:
            node.inputs.append(bytes(val).decode())
        elif num == 5:  # map<string, AttrValue> entry
            key, value = "", None
            for n2, _w2, v2 in fields(val):
                if n2 == 1:
                    key = bytes(v2).decode()
                elif n2 == 2:
                    value = parse_attr(v2)
            node.attr[key] = value
    return node


def parse_graphdef(data: bytes) -> list[TFNode]:
    """The nodes of a serialized GraphDef, in file order."""
    nodes = [parse_node(val) for num, _wt, val in fields(data) if num == 1]
    if not nodes:
        raise GraphDefError("no nodes: not a GraphDef")
    return nodes
